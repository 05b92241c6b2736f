# Speed baseline only: davit_retinanet_1x_coco.py with mmdet's Swin-T in DaViT-T's place (stages
# 2-4 feed the FPN, as for DaViT; the same widths). No pretrained weights: for timing only.
_base_ = ['../davit_retinanet_1x_coco.py']

model = dict(
    backbone=dict(_delete_=True, type='SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
                  num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4, qkv_bias=True,
                  drop_path_rate=0.2, patch_norm=True, out_indices=(1, 2, 3), init_cfg=None))
