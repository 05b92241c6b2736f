# DaViT-Base version of upernet_davit_512x512_160k_ade20k.py. Paper: 121M params, 49.4 mIoU.
_base_ = ['./upernet_davit_512x512_160k_ade20k.py']
model = dict(
    backbone=dict(arch='base', init_cfg=dict(checkpoint={{_base_.davit_base_in1k}})),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
