"""Detection test-time augmentation: the merge of DetTTAModelWithMasks (boxes and masks flipped
back, duplicates removed by NMS) and the TTA settings of every detection config (`tools/test.py
--tta` on the mini RetinaNet and Mask R-CNN runs in test_detection.py)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config

import davit_mm  # noqa: F401  (registers DetTTAModelWithMasks into mmdet)
from helpers import CONFIGS, transform_of

HEIGHT, WIDTH = 20, 30
BOX = torch.tensor([2., 3., 10., 15.])  # x1, y1, x2, y2 in the original image


def box_mask(box: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
    x1, y1, x2, y2 = box.long().tolist()
    mask[y1:y2, x1:x2] = True
    return mask


class FakeDetector(torch.nn.Module):
    """Predicts, in each view's own (possibly flipped) frame at the original size, the one object
    at BOX, as a detector with rescale=True does."""

    def __init__(self, score_per_view, box_per_view=None):
        super().__init__()
        self.score_per_view = list(score_per_view)
        self.box_per_view = list(box_per_view or [BOX] * len(self.score_per_view))

    def test_step(self, data):
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData
        results = []
        for sample in data['data_samples']:
            seen = self.box_per_view.pop(0)
            box, mask = seen.clone(), box_mask(seen)
            if sample.flip:
                box = torch.tensor([WIDTH - seen[2], seen[1], WIDTH - seen[0], seen[3]])
                mask = mask.flip(-1)
            pred = InstanceData(bboxes=box[None], scores=torch.tensor([self.score_per_view.pop(0)]),
                                labels=torch.tensor([1]), masks=mask[None])
            result = DetDataSample(metainfo=sample.metainfo)
            result.pred_instances = pred
            results.append(result)
        return results


def tta_batch(flips):
    from mmdet.structures import DetDataSample
    samples = [[DetDataSample(metainfo=dict(ori_shape=(HEIGHT, WIDTH), img_shape=(HEIGHT, WIDTH),
                                            flip=flip, flip_direction='horizontal' if flip else None))]
               for flip in flips]
    return dict(inputs=[[torch.zeros(3, HEIGHT, WIDTH)] for _ in flips], data_samples=samples)


def build_tta(score_per_view, box_per_view=None):
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    tta_cfg = ConfigDict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)  # as in a config
    return MODELS.build(dict(type='mmdet.DetTTAModelWithMasks', module=FakeDetector(score_per_view, box_per_view),
                             tta_cfg=tta_cfg))


@pytest.mark.parametrize('flipped_view_scores_higher', [False, True])
def test_masks_of_flipped_views_are_flipped_back_and_duplicates_merged(flipped_view_scores_higher):
    scores = [0.6, 0.9] if flipped_view_scores_higher else [0.9, 0.6]
    merged, = build_tta(scores).test_step(tta_batch([False, True]))
    pred = merged.pred_instances
    assert len(pred) == 1  # the two views' predictions of the one object became one
    torch.testing.assert_close(pred.bboxes[0], BOX)
    assert pred.scores.tolist() == pytest.approx([0.9])
    assert torch.equal(pred.masks[0], box_mask(BOX))  # in the original frame, whichever view won


def test_each_kept_instance_keeps_the_mask_of_its_own_view():
    other = torch.tensor([18., 2., 27., 9.])  # no overlap with BOX: NMS keeps both
    merged, = build_tta([0.7, 0.8], [BOX, other]).test_step(tta_batch([False, True]))
    pred = merged.pred_instances
    assert pred.scores.tolist() == pytest.approx([0.8, 0.7])  # sorted by score: other first
    torch.testing.assert_close(pred.bboxes, torch.stack([other, BOX]))
    assert torch.equal(pred.masks[0], box_mask(other)) and torch.equal(pred.masks[1], box_mask(BOX))


def test_predictions_without_masks_are_merged_as_mmdets_det_tta_model_does():
    from mmdet.models.test_time_augs import DetTTAModel
    model = build_tta([0.6, 0.9, 0.6, 0.9])
    views = [model.module.test_step(dict(data_samples=tta_batch([flip])['data_samples'][0]))[0]
             for flip in (False, True)]
    for view in views:
        del view.pred_instances.masks
    ours = model._merge_single_sample([v.clone() for v in views]).pred_instances
    theirs = DetTTAModel._merge_single_sample(model, [v.clone() for v in views]).pred_instances
    assert 'masks' not in ours
    torch.testing.assert_close(ours.bboxes, theirs.bboxes)
    torch.testing.assert_close(ours.scores, theirs.scores)


NMS = dict(type='nms', iou_threshold=0.5)


@pytest.mark.parametrize('tta_cfg, error, message', [
    # before: built, then merging raised KeyError: 'nms' / dropped the last detection / a TypeError
    # from the slice / NameError / TypeError from mmcv's nms
    ({}, ValueError, r"^tta_cfg=\{\} lacks \['nms', 'max_per_img'\]; accepted a dict such as dict\(nms="),
    (None, TypeError, r'^tta_cfg=None \(NoneType\): accepted a dict such as'),
    (dict(nms=NMS, max_per_img=-1), ValueError,
     r'^tta_cfg.max_per_img=-1 \(int\): accepted an int >= 1 \(detections kept per image\), or None for all$'),
    (dict(nms=NMS, max_per_img=0), ValueError, r'^tta_cfg.max_per_img=0 \(int\)'),
    (dict(nms=NMS, max_per_img='5'), ValueError, r"^tta_cfg.max_per_img='5' \(str\)"),
    (dict(nms=NMS, max_per_img=True), ValueError, r'^tta_cfg.max_per_img=True \(bool\)'),
    (dict(nms='nms', max_per_img=5), ValueError,
     r"^tta_cfg.nms='nms' \(str\): accepted an mmcv NMS config such as dict\(type='nms', iou_threshold=0.5\)"),
    (dict(nms=dict(type='nsm', iou_threshold=0.5), max_per_img=5), ValueError,
     r"^tta_cfg.nms=\{'type': 'nsm', 'iou_threshold': 0.5\}: mmcv's batched_nms fails on it \(NameError: "
     r"name 'nsm' is not defined\); accepted an mmcv NMS config"),
    (dict(nms=dict(type='nms'), max_per_img=5), ValueError,
     r"^tta_cfg.nms=\{'type': 'nms'\}: mmcv's batched_nms fails on it \(TypeError: nms\(\) missing 1 "
     r"required positional argument: 'iou_threshold'\)"),
])
def test_a_tta_cfg_that_merging_would_fail_on_is_refused_when_built(tta_cfg, error, message):
    from mmdet.registry import MODELS
    with pytest.raises(error, match=message):
        MODELS.build(dict(type='mmdet.DetTTAModelWithMasks', module=FakeDetector([0.9]), tta_cfg=tta_cfg))


@pytest.mark.parametrize('tta_cfg, kept', [
    (dict(nms=NMS, max_per_img=1), 1),
    (dict(nms=dict(iou_threshold=0.5), max_per_img=100), 1),  # mmcv's batched_nms: type 'nms' by default
    (dict(nms=dict(type='soft_nms', iou_threshold=0.5), max_per_img=100), 1),  # the duplicate: score 0
    (dict(nms=None, max_per_img=None), 2),  # batched_nms without NMS; a slice [:None] keeps all
])
@pytest.mark.parametrize('masks', [True, False])
def test_tta_cfg_forms_that_mmdets_det_tta_model_takes_merge_as_it_does(tta_cfg, kept, masks):
    from davit_mm.tta import DetTTAModelWithMasks
    model = DetTTAModelWithMasks(module=FakeDetector([0.6, 0.9]), tta_cfg=tta_cfg)  # a plain dict
    views = [model.module.test_step(dict(data_samples=tta_batch([flip])['data_samples'][0]))[0]
             for flip in (False, True)]
    for view in views if not masks else ():
        del view.pred_instances.masks  # DetTTAModel's own merge, which reads tta_cfg.nms
    assert len(model._merge_single_sample(views).pred_instances) == kept


DETECTION_CONFIGS = {
    'davit_retinanet_1x_coco.py': ('DetTTAModel', (1333, 800)),
    'davit_base_retinanet_3x_coco.py': ('DetTTAModel', (1333, 800)),
    'davit_maskrcnn_3x_coco.py': ('DetTTAModelWithMasks', (1333, 800)),
    'davit_small_maskrcnn_1x_coco.py': ('DetTTAModelWithMasks', (1333, 800)),
    'quickstart/davit_mini_retinanet_synthetic_coco.py': ('DetTTAModel', (160, 128)),
    'quickstart/davit_mini_maskrcnn_synthetic_coco.py': ('DetTTAModelWithMasks', (160, 128)),
}


@pytest.mark.parametrize('name', sorted(DETECTION_CONFIGS))
def test_detection_configs_define_flip_and_multi_scale_tta(name):
    cfg = Config.fromfile(osp.join(CONFIGS, name))
    tta_type, test_scale = DETECTION_CONFIGS[name]
    assert cfg.tta_model.type == tta_type
    resizes, flips = transform_of(cfg.tta_pipeline, 'TestTimeAug')['transforms'][:2]
    scales = [t['scale'] for t in resizes]
    assert len(scales) == 3 and scales[0] == test_scale  # the single-scale test size, and two more
    assert [t['prob'] for t in flips] == [1.0, 0.0]


def test_tta_at_none_of_the_test_scales_is_warned_of(monkeypatch):
    """A config that changed the test scale but inherited the tta_pipeline ran --tta at the
    paper's scales (mAP 0.228 single-scale, 0.000 with --tta, exit 0)."""
    import mmengine.logging

    from davit_mm.cli import enable_tta
    warnings = []
    monkeypatch.setattr(mmengine.logging, 'print_log', lambda message, **kwargs: warnings.append(message))
    cfg = Config.fromfile(osp.join(CONFIGS, 'davit_retinanet_1x_coco.py'))
    enable_tta(cfg, 'mmdet')
    assert warnings == []  # 1333 x 800 is among its scales
    cfg = Config.fromfile(osp.join(CONFIGS, 'davit_retinanet_1x_coco.py'))
    transform_of(cfg.test_dataloader.dataset.pipeline, 'Resize').scale = (800, 1333)
    enable_tta(cfg, 'mmdet')
    assert warnings == []  # the same scale for an image whose aspect ratio is kept
    cfg = Config.fromfile(osp.join(CONFIGS, 'davit_retinanet_1x_coco.py'))
    transform_of(cfg.test_dataloader.dataset.pipeline, 'Resize').scale = (160, 128)
    enable_tta(cfg, 'mmdet')
    assert warnings == ["davit_mm: --tta: the tta_pipeline resizes to [(666, 400), (1333, 800), (2000, 1200)], "
                        "none of them the test pipeline's [(160, 128)]: a config that changes the test scale "
                        "sets its tta_pipeline too (else the inherited one runs)"]
