# UperNet, DaViT-Tiny, ADE20K, 512x512 crops, 160k iterations. Paper: 60M params, 940G FLOPs at
# 512x2048, 46.3 mIoU (protocol not stated); `tools/test.py --tta` gives the multi-scale + flip number.
_base_ = [
    './_base_/models/upernet_davit.py',
    './_base_/datasets/ade20k.py',
    './_base_/schedule_davit_160k.py',
]
crop_size = (512, 512)
model = dict(data_preprocessor=dict(size=crop_size))
train_dataloader = dict(batch_size=2)  # x 8 GPUs = the paper's batch of 16

# `tools/test.py --tta` evaluates as the official code's `--aug-test` (mmseg 0.11): each image is
# resized to fit (2048, 512) x ratio, keeping its aspect ratio, for ratios 0.5..1.75, each with and
# without a horizontal flip, and the softmax outputs are averaged. (mmseg 1.x's default ADE20K TTA
# scales each image's own size by the ratio instead, which differs for images whose short side is
# not 512.) Without --tta: one scale, fit to (2048, 512), no flip, as the official test pipeline.
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=scale, keep_ratio=True)
         for scale in [(1024, 256), (1536, 384), (2048, 512), (2560, 640), (3072, 768), (3584, 896)]],
        [dict(type='RandomFlip', prob=0., direction='horizontal'),
         dict(type='RandomFlip', prob=1., direction='horizontal')],
        [dict(type='LoadAnnotations')],
        [{{_base_.check_seg_map}}],
        [dict(type='PackSegInputs')],
    ])
]
