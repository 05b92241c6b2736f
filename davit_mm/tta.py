"""Detection test-time augmentation with instance masks.

mmdet 3.3's ``DetTTAModel`` merges the boxes of the augmented views (flip back, then NMS) but
refuses predictions that carry masks ("TTA of instance segmentation does not support now"), so
Mask R-CNN cannot use it as is. :class:`DetTTAModelWithMasks` is ``DetTTAModel`` plus the masks:
each view's masks (already at the original image size, since mmdet rescales them) are flipped back
like its boxes, and the instances NMS keeps keep their masks.
"""
from typing import List, Optional

import torch
from mmdet.models.test_time_augs import DetTTAModel
from mmdet.structures import DetDataSample
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData
from mmcv.ops import batched_nms

_FLIP_DIMS = {'horizontal': (-1, ), 'vertical': (-2, ), 'diagonal': (-2, -1)}


def _check_tta_cfg(tta_cfg: object) -> None:
    """Refuse a ``tta_cfg`` that ``DetTTAModel`` would fail on at the first merged image (a key
    missing, an NMS config mmcv's ``batched_nms`` cannot run) or that would silently drop
    detections (``max_per_img`` 0 or negative is a slice end)."""
    example = "dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)"
    if not isinstance(tta_cfg, dict):
        raise TypeError(f'tta_cfg={tta_cfg!r} ({type(tta_cfg).__name__}): accepted a dict such as '
                        f'{example}')
    missing = [key for key in ('nms', 'max_per_img') if key not in tta_cfg]
    if missing:
        raise ValueError(f'tta_cfg={tta_cfg!r} lacks {missing}; accepted a dict such as {example}')
    nms, max_per_img = tta_cfg['nms'], tta_cfg['max_per_img']
    if nms is not None:
        accepted = ("accepted an mmcv NMS config such as dict(type='nms', iou_threshold=0.5) "
                    "(type 'nms' or 'soft_nms'), or None for no NMS")
        if not isinstance(nms, dict):
            raise ValueError(f'tta_cfg.nms={nms!r} ({type(nms).__name__}): {accepted}')
        try:  # one box through mmcv, as merging will: it resolves the type and takes the arguments
            batched_nms(torch.tensor([[0., 0., 1., 1.]]), torch.ones(1), torch.zeros(1).long(), nms)
        except Exception as exc:  # NameError for an unknown type, TypeError for the arguments
            raise ValueError(f"tta_cfg.nms={nms!r}: mmcv's batched_nms fails on it "
                             f'({type(exc).__name__}: {exc}); {accepted}') from exc
    if max_per_img is not None and (not isinstance(max_per_img, int) or isinstance(max_per_img, bool)
                                    or max_per_img < 1):
        raise ValueError(f'tta_cfg.max_per_img={max_per_img!r} ({type(max_per_img).__name__}): '
                         f'accepted an int >= 1 (detections kept per image), or None for all')


def _unflip_masks(masks: torch.Tensor, metainfo: dict) -> torch.Tensor:
    """Undo the view's flip on masks of shape (N, H, W) at the original image size."""
    if not metainfo.get('flip', False):
        return masks
    # (an unknown direction has already been refused by mmdet's bbox_flip)
    return masks.flip(_FLIP_DIMS[metainfo['flip_direction']])


class DetTTAModelWithMasks(DetTTAModel):
    """``DetTTAModel`` that also merges instance masks (Mask R-CNN flip / multi-scale TTA).

    Boxes are merged exactly as ``DetTTAModel`` does (flipped back per view, class-wise NMS with
    ``tta_cfg.nms``, ``tta_cfg.max_per_img`` kept); each kept instance takes the mask its own view
    predicted, flipped back. Predictions without masks are merged by ``DetTTAModel`` itself.

    Args:
        tta_cfg (dict): ``nms`` (an mmcv NMS config) and ``max_per_img``, as for ``DetTTAModel``.
        **kwargs: ``module`` (the detector config) and the rest of ``BaseTTAModel``'s arguments.

    Raises:
        TypeError, ValueError: when built, a ``tta_cfg`` that is not a dict, lacks ``nms`` or
            ``max_per_img``, has an NMS config mmcv cannot run, or a ``max_per_img`` that is not
            an int >= 1 (or None).
    """

    def __init__(self, tta_cfg: Optional[dict] = None, **kwargs) -> None:
        _check_tta_cfg(tta_cfg)
        # DetTTAModel reads tta_cfg.nms: a plain dict (built in Python) needs to be a ConfigDict
        super().__init__(tta_cfg=ConfigDict(tta_cfg), **kwargs)

    def _merge_single_sample(self, data_samples: List[DetDataSample]) -> DetDataSample:
        if data_samples[0].pred_instances.get('masks', None) is None:
            return super()._merge_single_sample(data_samples)
        preds = [sample.pred_instances for sample in data_samples]
        metas = [sample.metainfo for sample in data_samples]
        bboxes, scores = self.merge_aug_bboxes([p.bboxes for p in preds], [p.scores for p in preds],
                                               metas)
        labels = torch.cat([p.labels for p in preds])
        masks = torch.cat([_unflip_masks(torch.as_tensor(p.masks), meta)
                           for p, meta in zip(preds, metas)])
        merged = data_samples[0]
        if bboxes.numel() == 0:
            return merged
        dets, keep = batched_nms(bboxes, scores, labels, self.tta_cfg['nms'])
        keep = keep[:self.tta_cfg['max_per_img']]
        dets = dets[:self.tta_cfg['max_per_img']]
        results = InstanceData()
        results.bboxes = dets[:, :-1]
        results.scores = dets[:, -1]
        results.labels = labels[keep]
        results.masks = masks[keep]
        merged.pred_instances = results
        return merged
