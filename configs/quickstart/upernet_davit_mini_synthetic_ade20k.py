# UperNet with a "mini" DaViT on the generated ADE20K-layout dataset: the DaViT-Tiny UperNet's model
# and recipe (configs/upernet_davit_512x512_160k_ade20k.py) with 64-channel heads (mmseg's 512-channel
# UPerHead costs seconds per iteration on a CPU) and a short schedule from scratch.
_base_ = [
    '../_base_/models/upernet_davit.py',
    '../_base_/datasets/synthetic_ade20k.py',
    '../_base_/schedule_davit_160k.py',
]
model = dict(
    data_preprocessor=dict(size={{_base_.crop_size}}),
    backbone=dict(arch={{_base_.davit_mini_arch}}, drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=64),
    auxiliary_head=dict(in_channels=128, channels=32))

max_iters = 120
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=10, end=max_iters),
]
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(by_epoch=False, interval=40, max_keep_ckpts=2))
randomness = dict(seed=0)
