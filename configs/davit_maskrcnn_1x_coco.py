# Mask R-CNN, DaViT-Tiny, COCO, 1x. Paper: 47.8M params, 263G FLOPs at 800x1280, 45.0 box / 41.1 mask AP.
_base_ = [
    './_base_/models/mask_rcnn_davit_fpn.py',
    './_base_/datasets/coco_instance_multiscale.py',
    './_base_/schedule_davit_1x.py',
]
