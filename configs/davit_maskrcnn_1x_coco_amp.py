# davit_maskrcnn_1x_coco.py with automatic mixed precision (fp16, dynamic loss scale); same as passing --amp.
# DaViT's channel attention computes its token-summed logits in fp32, so fp16 does not overflow.
_base_ = ['./davit_maskrcnn_1x_coco.py']
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
