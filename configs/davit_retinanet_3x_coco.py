# RetinaNet, DaViT-Tiny, COCO, 3x (36 epochs). Paper: 46.5 box AP.
_base_ = [
    './_base_/models/retinanet_davit_fpn.py',
    './_base_/datasets/coco_detection_multiscale.py',
    './_base_/schedule_davit_3x.py',
]
model = dict(backbone=dict(drop_path_rate=0.2))
