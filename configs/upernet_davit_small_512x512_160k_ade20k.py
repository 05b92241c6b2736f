# DaViT-Small version of upernet_davit_512x512_160k_ade20k.py. Paper: 81M params, 48.8 mIoU.
_base_ = ['./upernet_davit_512x512_160k_ade20k.py']
model = dict(backbone=dict(arch='small', init_cfg=dict(checkpoint={{_base_.davit_small_in1k}})))
