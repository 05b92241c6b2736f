# Speed baseline only: davit_maskrcnn_1x_coco.py with mmdet's Swin-T in DaViT-T's place (the same
# stage widths, 96..768, so the neck and heads are unchanged). No pretrained weights: for timing
# training and evaluation against the DaViT config (docs/benchmark.md), not for accuracy.
_base_ = ['../davit_maskrcnn_1x_coco.py']

model = dict(
    backbone=dict(_delete_=True, type='SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
                  num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4, qkv_bias=True,
                  drop_path_rate=0.2, patch_norm=True, out_indices=(0, 1, 2, 3), init_cfg=None))
