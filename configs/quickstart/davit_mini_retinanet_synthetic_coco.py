# RetinaNet with a "mini" DaViT on the generated dataset, with a slimmer head: the DaViT-Tiny
# RetinaNet's model and recipe (configs/davit_retinanet_1x_coco.py) shrunk for a CPU.
_base_ = [
    '../_base_/models/retinanet_davit_fpn.py',
    '../_base_/datasets/synthetic_coco.py',
    '../_base_/schedule_quickstart.py',
]
model = dict(
    backbone=dict(arch={{_base_.davit_mini_arch}}, drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256], out_channels=64),
    bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2))
val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
