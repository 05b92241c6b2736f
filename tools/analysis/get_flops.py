"""Parameters and FLOPs of a config's model, counted the way the DaViT paper reports them.

    python tools/analysis/get_flops.py CONFIG [--shape H W] [--cfg-options ...]

FLOPs are multiply-adds (one fused multiply-add = one FLOP, as the paper and most detection papers
count) of one forward pass of backbone + neck + heads on a 1 x 3 x H x W input, measured by
torch's FlopCounterMode (matrix multiplies, convolutions and attention; normalisation and
activation layers are not counted, as usual), with DaViT's attention computed in the paper's steps
(``set_fused_attention(False)``). Default shapes are the paper's: 800 x 1280 for mmdet
configs and 512 x 2048 for mmseg configs.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from davit_mm.cli import adapt_config_to_machine, library_of, load_config, run_tool  # noqa: E402

DEFAULT_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 2048)}


def count(config: str, shape=None, cfg_options=None):
    """Returns ``(params, multiply_adds, (H, W))`` of the config's model."""
    cfg = load_config(config, cfg_options)
    library = library_of(cfg)
    adapt_config_to_machine(cfg)
    init_default_scope(library)
    from mmengine.registry import MODELS
    model = MODELS.build(cfg.model).eval()  # random init: weights do not change the count
    for module in model.modules():
        if hasattr(module, 'set_fused_attention'):
            # The paper's steps: the fused channel attention folds its projections into one
            # product per image and does fewer multiply-adds at detection sizes.
            module.set_fused_attention(False)
    shape = tuple(shape or DEFAULT_SHAPES[library])
    params = sum(p.numel() for p in model.parameters())
    inputs = torch.randn(1, 3, *shape)
    args = (inputs, )
    if library == 'mmdet':
        # Two-stage detectors need image metadata to turn RPN outputs into RoIs.
        from mmdet.structures import DetDataSample
        meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
                    scale_factor=(1., 1.))
        args = (inputs, [DetDataSample(metainfo=meta)])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model._forward(*args)  # tensor mode: backbone, neck and heads, no post-processing
    return params, counter.get_total_flops() // 2, shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: 800 1280 for detection, 512 2048 for segmentation)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    params, flops, shape = count(args.config, args.shape, args.cfg_options)
    print(f'config: {args.config}')
    print(f'input: 1x3x{shape[0]}x{shape[1]}')
    print(f'params: {params / 1e6:.2f}M')
    print(f'FLOPs (multiply-adds): {flops / 1e9:.1f}G')


if __name__ == '__main__':
    sys.exit(run_tool(main))
