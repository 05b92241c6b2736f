# Mask R-CNN with a "mini" DaViT on the generated dataset: the DaViT-Tiny Mask R-CNN's model and
# recipe (configs/davit_maskrcnn_1x_coco.py) with slimmer RPN/RoI heads and fewer proposals
# (mmdet's default RoI heads cost seconds per iteration on a CPU).
_base_ = [
    '../_base_/models/mask_rcnn_davit_fpn.py',
    '../_base_/datasets/synthetic_coco.py',
    '../_base_/schedule_quickstart.py',
]
channels = 64
model = dict(
    backbone=dict(arch={{_base_.davit_mini_arch}}, drop_path_rate=0.0, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=channels),
    rpn_head=dict(in_channels=channels, feat_channels=channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, fc_out_channels=128, num_classes=3),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(in_channels=channels, conv_out_channels=32, num_convs=2, num_classes=3)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=400, max_per_img=100),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=400, max_per_img=100)))
