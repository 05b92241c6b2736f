# Mask R-CNN, DaViT-Tiny, COCO, 3x. Paper: 47.4 box / 42.9 mask AP.
_base_ = [
    './_base_/models/mask_rcnn_davit_fpn.py',
    './_base_/datasets/coco_instance_multiscale.py',
    './_base_/schedule_davit_3x.py',
]
model = dict(backbone=dict(drop_path_rate=0.2))
