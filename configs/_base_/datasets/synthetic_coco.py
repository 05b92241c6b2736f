# The generated COCO-layout dataset (python tools/dataset/make_synthetic_coco.py data/synthetic_coco):
# three shape classes with boxes and polygon masks, small images. Masks are loaded for every
# detector: polygons cost nothing until a mask head rasterises them.
_base_ = ['mmdet::_base_/datasets/coco_instance.py']

data_root = 'data/synthetic_coco/'
metainfo = dict(classes=('square', 'disk', 'triangle'))
image_scale = (160, 128)  # (w, h), as mmdet writes scales

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='CheckAnnotationSize'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomResize', scale=image_scale, ratio_range=(0.8, 1.2), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='CheckAnnotationSize'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'), filter_cfg=dict(filter_empty_gt=True, min_size=4),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val2017.json',
                 data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# `tools/test.py --tta`: the COCO TTA (configs/_base_/datasets/coco_tta.py) at this dataset's scale:
# 1x, 0.5x and 1.5x x horizontal flip.
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='CheckAnnotationSize'),
    dict(type='TestTimeAug',
         transforms=[[dict(type='Resize', scale=s, keep_ratio=True)
                      for s in [(160, 128), (80, 64), (240, 192)]],
                     [dict(type='RandomFlip', prob=1.0), dict(type='RandomFlip', prob=0.0)],
                     [dict(type='LoadAnnotations', with_bbox=True)],
                     [dict(type='PackDetInputs',
                           meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                      'scale_factor', 'flip', 'flip_direction'))]]),
]
