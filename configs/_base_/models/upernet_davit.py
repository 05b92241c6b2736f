# UperNet with a DaViT-Tiny backbone (all four stages), UPerHead 512 channels with pool scales
# (1, 2, 3, 6) and an auxiliary FCNHead on stage 3 (loss weight 0.4), BN in the heads as the
# official config sets it (mmseg's UperNet bases have SyncBN; the official config names it in a
# comment only). For SyncBN: --cfg-options model.decode_head.norm_cfg.type=SyncBN
# model.auxiliary_head.norm_cfg.type=SyncBN (davit_mm's tools turn it into BN where it cannot run).
_base_ = ['mmseg::_base_/models/upernet_swin.py', '../davit_runtime.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='DaViT',
        arch='tiny',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint={{_base_.davit_tiny_in1k}})),
    decode_head=dict(in_channels=[96, 192, 384, 768], channels=512, num_classes=150,
                     norm_cfg=dict(type='BN', requires_grad=True)),
    auxiliary_head=dict(in_channels=384, in_index=2, num_classes=150, loss_decode=dict(loss_weight=0.4),
                        norm_cfg=dict(type='BN', requires_grad=True)))
