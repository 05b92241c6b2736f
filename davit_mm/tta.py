"""Detection test-time augmentation with instance masks.

mmdet 3.3's ``DetTTAModel`` merges the boxes of the augmented views (flip back, then NMS) but
refuses predictions that carry masks ("TTA of instance segmentation does not support now"), so
Mask R-CNN cannot use it as is. :class:`DetTTAModelWithMasks` is ``DetTTAModel`` plus the masks:
each view's masks (already at the original image size, since mmdet rescales them) are flipped back
like its boxes, and the instances NMS keeps keep their masks.
"""
from typing import List

import torch
from mmdet.models.test_time_augs import DetTTAModel
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData
from mmcv.ops import batched_nms

_FLIP_DIMS = {'horizontal': (-1, ), 'vertical': (-2, ), 'diagonal': (-2, -1)}


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
    """

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
