# The official DaViT detection recipe: AdamW lr 1e-4, weight decay 0.05, batch 16 (8 GPUs x 2),
# 12 epochs with the lr divided by 10 after epochs 8 and 11, linear warmup over 500 iterations.
# `--auto-scale-lr` rescales lr for other total batch sizes from base_batch_size=16.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py']

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Checkpoints are written under a temporary name and renamed into place: a run killed while saving
# never leaves a truncated checkpoint behind (davit_mm.engine.AtomicLocalBackend).
default_hooks = dict(checkpoint=dict(backend_args=dict(backend='davit_mm_atomic')))
