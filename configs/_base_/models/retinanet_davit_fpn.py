# RetinaNet with a DaViT-Tiny backbone. Only stages 2-4 feed the FPN, so only they get output norms
# (no unused parameters under DDP); FPN builds P3-P5 from them plus P6/P7 on the input.
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', '../davit_runtime.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='DaViT',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint={{_base_.davit_tiny_in1k}})),
    neck=dict(in_channels=[192, 384, 768], start_level=0, num_outs=5))

# Test-time augmentation (`tools/test.py --tta`): the views of the dataset's tta_pipeline, boxes
# flipped back and merged by class-wise NMS (mmdet's DetTTAModel).
tta_model = dict(type='DetTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
