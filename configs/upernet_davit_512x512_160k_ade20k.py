# UperNet, DaViT-Tiny, ADE20K, 512x512 crops, 160k iterations. Paper: 60M params, 940G FLOPs at
# 512x2048, 46.3 mIoU (protocol not stated); `tools/test.py --tta` gives the multi-scale + flip number.
_base_ = [
    './_base_/models/upernet_davit.py',
    'mmseg::_base_/datasets/ade20k.py',
    './_base_/schedule_davit_160k.py',
]
crop_size = (512, 512)
model = dict(data_preprocessor=dict(size=crop_size))
train_dataloader = dict(batch_size=2)  # x 8 GPUs = the paper's batch of 16
