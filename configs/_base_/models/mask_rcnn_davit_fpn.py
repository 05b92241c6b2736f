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

# Test-time augmentation (`tools/test.py --tta`): mmdet's DetTTAModel merges boxes only and refuses
# masks; davit_mm's DetTTAModelWithMasks is the same merge (boxes flipped back, class-wise NMS) with
# each kept instance's mask flipped back too.
tta_model = dict(type='DetTTAModelWithMasks',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
