# Example: davit_mm from your own project. DaViT-Tiny RetinaNet 1x on a COCO-format dataset of your
# own with three classes, initialised from a DaViT checkpoint on disk (any public format: official,
# timm, mmpretrain, Florence-2 or davit_mm). Copy this file next to your project and point _base_ at
# davit_mm's configs folder, or, with davit_mm installed, at 'davit_mm::davit_retinanet_1x_coco.py'
# (README: "Use DaViT from your own configs"); run it with davit_mm's tools/train.py or mmdet's.
_base_ = ['../davit_retinanet_1x_coco.py']

classes = ('cat', 'dog', 'bird')
data_root = 'data/my_dataset/'

model = dict(
    backbone=dict(
        frozen_stages=1,  # keep the stem and stage 1 at their pretrained values
        with_cp=True,  # gradient checkpointing: about half the activation memory
        init_cfg=dict(checkpoint='checkpoints/davit_tiny.pth')),
    bbox_head=dict(num_classes=len(classes)))

train_dataloader = dict(
    batch_size=4,
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                 ann_file='annotations/train.json', data_prefix=dict(img='images/')))
val_dataloader = dict(
    dataset=dict(data_root=data_root, metainfo=dict(classes=classes),
                 ann_file='annotations/val.json', data_prefix=dict(img='images/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator
