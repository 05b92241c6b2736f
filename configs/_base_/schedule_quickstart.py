# A short CPU schedule for training from scratch on a few dozen generated images: the davit recipe
# (AdamW) with a higher lr, a short warmup, frequent logging and evaluation at the end.
_base_ = ['./schedule_davit_1x.py']

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[9, 11], gamma=0.1),
]
default_hooks = dict(logger=dict(interval=4), checkpoint=dict(interval=4, max_keep_ckpts=2))
log_processor = dict(window_size=4)
randomness = dict(seed=0)
