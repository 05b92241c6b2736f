# Mask R-CNN with a DaViT-Tiny backbone: all four stages feed the FPN.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', '../davit_runtime.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='DaViT',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint={{_base_.davit_tiny_in1k}})),
    neck=dict(in_channels=[96, 192, 384, 768]))
