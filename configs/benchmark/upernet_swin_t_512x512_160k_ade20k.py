# Speed baseline only: upernet_davit_512x512_160k_ade20k.py with mmseg's Swin-T in DaViT-T's place
# (the same stage widths, so the heads are unchanged). No pretrained weights: for timing only.
_base_ = ['../upernet_davit_512x512_160k_ade20k.py']

model = dict(
    backbone=dict(_delete_=True, type='SwinTransformer', embed_dims=96, depths=[2, 2, 6, 2],
                  num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4, qkv_bias=True,
                  drop_path_rate=0.3, patch_norm=True, out_indices=(0, 1, 2, 3), init_cfg=None))
