# COCO boxes and masks with the multi-scale + crop training pipeline.
_base_ = ['mmdet::_base_/datasets/coco_instance.py', './multiscale_crop.py', './coco_tta.py']

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='CheckAnnotationSize'),  # davit_mm: the image has the size its annotation gives
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    {{_base_.multiscale_crop}},
    dict(type='PackDetInputs'),
]
# mmdet's test pipeline with the size check
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='CheckAnnotationSize'),
    dict(type='Resize', scale=(1333, 800), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
