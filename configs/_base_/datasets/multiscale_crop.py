# The official DaViT/Swin detection augmentation in mmdet 3 transforms: after a random flip, either
# resize the short side to one of 480..800 (step 32, long side <= 1333), or resize to 400/500/600,
# crop a random 384..600 box and resize to one of 480..800.
_short_sides = list(range(480, 801, 32))
multiscale_crop = dict(
    type='RandomChoice',
    transforms=[
        [dict(type='RandomChoiceResize', scales=[(1333, s) for s in _short_sides], keep_ratio=True)],
        [
            dict(type='RandomChoiceResize', scales=[(1333, 400), (1333, 500), (1333, 600)],
                 keep_ratio=True),
            dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                 allow_negative_crop=True),
            dict(type='RandomChoiceResize', scales=[(1333, s) for s in _short_sides], keep_ratio=True),
        ],
    ])
