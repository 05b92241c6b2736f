# The generated ADE20K-layout dataset (python tools/dataset/make_synthetic_ade20k.py
# data/synthetic_ade20k): 150-class label maps (0 = "other", ignored), small images whose sizes are
# not multiples of 32. ADE20K's own pipelines at a small scale; the multi-scale + flip TTA is kept.
_base_ = ['./ade20k.py']

data_root = 'data/synthetic_ade20k/ADEChallengeData2016'
crop_size = (96, 96)
image_scale = (160, 128)  # (w, h)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    {{_base_.check_seg_map}},
    dict(type='RandomResize', scale=image_scale, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    {{_base_.check_seg_map}},
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
