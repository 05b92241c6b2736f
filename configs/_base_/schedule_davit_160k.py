# The official DaViT segmentation recipe: AdamW lr 6e-5, weight decay 0.01, linear warmup over 1500
# iterations from 1e-6 x lr, poly (power 1) to 0 at 160k iterations. As in the official code
# (mmcv's poly with warmup), the poly decay counts from iteration 0 and the warmup multiplies it:
# both schedulers start at 0 (mmengine chains them by multiplying). mmseg's own configs start the
# poly after the warmup, which leaves the lr about 1% higher from then on. `--auto-scale-lr`
# rescales lr for total batch sizes other than 16 (8 GPUs x 2, set by the leaf configs).
_base_ = ['mmseg::_base_/schedules/schedule_160k.py', 'mmseg::_base_/default_runtime.py']

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=0, end=160000),
]
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Checkpoints are written under a temporary name and renamed into place: a run killed while saving
# never leaves a truncated checkpoint behind (davit_mm.engine.AtomicLocalBackend).
default_hooks = dict(checkpoint=dict(backend_args=dict(backend='davit_mm_atomic')))
