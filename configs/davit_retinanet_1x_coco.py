# RetinaNet, DaViT-Tiny, COCO, 1x (12 epochs), multi-scale + crop training. Paper: 38.5M params,
# 244G FLOPs at 800x1280, 44.0 box AP.
_base_ = [
    './_base_/models/retinanet_davit_fpn.py',
    './_base_/datasets/coco_detection_multiscale.py',
    './_base_/schedule_davit_1x.py',
]
