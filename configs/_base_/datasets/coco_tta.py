# Detection test-time augmentation on COCO (`tools/test.py --tta`; the paper's numbers are single
# scale 1333x800 without flip): three scales (mmdet's RetinaNet TTA scales) x horizontal flip.
tta_scales = [(1333, 800), (666, 400), (2000, 1200)]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='CheckAnnotationSize'),  # davit_mm: the image has the size its annotation gives
    dict(type='TestTimeAug',
         transforms=[[dict(type='Resize', scale=s, keep_ratio=True) for s in tta_scales],
                     [dict(type='RandomFlip', prob=1.0), dict(type='RandomFlip', prob=0.0)],
                     [dict(type='LoadAnnotations', with_bbox=True)],
                     [dict(type='PackDetInputs',
                           meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                      'scale_factor', 'flip', 'flip_direction'))]]),
]
