"""mmdet's DetInferencer and mmseg's MMSegInferencer with davit_mm configs and checkpoints, as
docs/getting_started.md shows them, agree with the libraries' plain inference functions."""
import os.path as osp
import pickle

import numpy as np
import pytest
import torch

from davit_mm.compat import needed, runner_checkpoints_readable
from helpers import CONFIGS, save_runner_checkpoint

MASKRCNN = osp.join(CONFIGS, 'quickstart', 'davit_mini_maskrcnn_synthetic_coco.py')
UPERNET = osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py')


def build_inferencer(cls, **kwargs):
    """As docs/getting_started.md builds one: inside ``runner_checkpoints_readable()``, without
    which torch >= 2.6 refuses the runner's checkpoint (weights_only) in mmengine's loader."""
    if needed('runner_checkpoint_globals'):
        with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
            cls(**kwargs)
    with runner_checkpoints_readable():
        return cls(**kwargs)


def image(height=100, width=140):
    return (np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8)


def test_det_inferencer_predicts_what_inference_detector_predicts(tmp_path):
    from mmdet.apis import DetInferencer, inference_detector, init_detector
    weights = save_runner_checkpoint(MASKRCNN, tmp_path / 'det.pth', ('square', 'disk', 'triangle'))
    inferencer = build_inferencer(DetInferencer, model=MASKRCNN, weights=weights, device='cpu')
    result = inferencer(image(), return_datasamples=True)
    pred = result['predictions'][0].pred_instances
    with runner_checkpoints_readable():
        detector = init_detector(MASKRCNN, weights, device='cpu')
    reference = inference_detector(detector, image()).pred_instances
    assert len(pred) == len(reference) > 0
    torch.testing.assert_close(pred.bboxes, reference.bboxes)
    torch.testing.assert_close(pred.scores, reference.scores)
    assert torch.equal(pred.labels, reference.labels)
    assert pred.masks.shape == (len(pred), 100, 140) and torch.equal(pred.masks, reference.masks)
    assert inferencer.model.dataset_meta['classes'] == ('square', 'disk', 'triangle')


def test_mmseg_inferencer_predicts_what_inference_model_predicts(tmp_path):
    from mmseg.apis import MMSegInferencer, inference_model, init_model
    classes = tuple(f'class{i}' for i in range(150))
    weights = save_runner_checkpoint(UPERNET, tmp_path / 'seg.pth', classes)
    inferencer = build_inferencer(MMSegInferencer, model=UPERNET, weights=weights, device='cpu')
    result = inferencer(image(77, 61), return_datasamples=True)
    with runner_checkpoints_readable():
        segmentor = init_model(UPERNET, weights, device='cpu')
    reference = inference_model(segmentor, image(77, 61))
    assert result.pred_sem_seg.data.shape == (1, 77, 61)
    assert torch.equal(result.pred_sem_seg.data, reference.pred_sem_seg.data)
    torch.testing.assert_close(result.seg_logits.data, reference.seg_logits.data)
