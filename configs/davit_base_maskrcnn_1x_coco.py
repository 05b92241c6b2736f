# DaViT-Base version of davit_maskrcnn_1x_coco.py (widths 128..1024, 9 layers in stage 3).
_base_ = ['./davit_maskrcnn_1x_coco.py']
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.3,
                  init_cfg=dict(checkpoint={{_base_.davit_base_in1k}})),
    neck=dict(in_channels=[128, 256, 512, 1024]))
