# DaViT-Small version of davit_retinanet_3x_coco.py (same widths as Tiny, 9 layers in stage 3).
_base_ = ['./davit_retinanet_3x_coco.py']
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.3,
                  init_cfg=dict(checkpoint={{_base_.davit_small_in1k}})))
