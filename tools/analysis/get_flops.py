"""Parameters and FLOPs of a config's model, counted the way the DaViT paper reports them.

    python tools/analysis/get_flops.py CONFIG [--shape H W] [--cfg-options ...]

FLOPs are multiply-adds (one fused multiply-add = one FLOP, as the paper and most detection papers
count) of one forward pass of backbone + neck + heads on a 1 x 3 x H x W input. Default shapes are
the paper's: 800 x 1280 for mmdet configs and 512 x 2048 for mmseg configs.

What is counted, as the paper counts it: the multiply-adds of every convolution and linear layer.
The official code measured its tables with mmcv's ``get_model_complexity_info`` (its
tools/get_flops.py), which counts ``nn.Conv*``/``nn.Linear`` modules and does not see the
attentions' matrix products of two activations (``q k^T`` and ``A v`` in the windows, ``k^T v``
and ``A q^T`` in the channel groups); they are printed on a line of their own. The count is
torch's FlopCounterMode (normalisation, activation, softmax, pooling and resizing layers are not
counted), taken with DaViT's plain kernels (``davit_mm.ops.set_fast_kernels(False)``: the fused
oneDNN convolution that runs the position encodings at CPU inference has no FLOP formula) and its
attention in the paper's steps (``set_fused_attention(False)``), so it is the same on every
machine and every kernel setting.
"""
import argparse
import os.path as osp
import sys
from typing import NamedTuple, Optional, Sequence, Tuple

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from davit_mm import ops  # noqa: E402
from davit_mm.checks import check_channels  # noqa: E402
from davit_mm.cli import (adapt_config_to_machine, build_model, cfg_options_action,  # noqa: E402
                          library_of, load_config, run_tool)

DEFAULT_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 2048)}
# With the plain kernels, linear layers count as addmm/mm and convolutions as convolution; the
# only batched products of these models are the attentions' products of two activations.
ATTENTION_PRODUCTS = (torch.ops.aten.bmm, )


class Count(NamedTuple):
    params: int
    layers: int  # multiply-adds of the convolutions and linear layers: the paper's count
    attention_products: int  # multiply-adds of the attentions' activation x activation products
    shape: Tuple[int, int]
    channels: int = 3  # the backbone's in_channels


def count(config: str, shape: Optional[Sequence[int]] = None, cfg_options=None) -> Count:
    """Parameters and multiply-adds of the config's model (random init: weights do not change
    the count; seeded, so a two-stage detector's proposals are the same every run)."""
    cfg = load_config(config, cfg_options)
    library = library_of(cfg)
    check_channels(cfg)
    adapt_config_to_machine(cfg, training=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for module in model.modules():
        if hasattr(module, 'set_fused_attention'):
            # The paper's steps: the fused channel attention folds its projections into one
            # product per image and does fewer multiply-adds at detection sizes.
            module.set_fused_attention(False)
    shape = tuple(shape or DEFAULT_SHAPES[library])
    params = sum(p.numel() for p in model.parameters())
    channels = getattr(model.backbone, 'in_channels', 3)
    inputs = torch.randn(1, channels, *shape)
    args = (inputs, )
    if library == 'mmdet':
        # Two-stage detectors need image metadata to turn RPN outputs into RoIs.
        from mmdet.structures import DetDataSample
        meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
                    scale_factor=(1., 1.))
        args = (inputs, [DetDataSample(metainfo=meta)])
    with ops.plain_kernels(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model._forward(*args)  # tensor mode: backbone, neck and heads, no post-processing
    by_op = counter.get_flop_counts()['Global']
    attention = sum(by_op.get(op, 0) for op in ATTENTION_PRODUCTS) // 2
    return Count(params, counter.get_total_flops() // 2 - attention, attention, shape, channels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help='input size (default: 800 1280 for detection, 512 2048 for segmentation)')
    parser.add_argument('--cfg-options', nargs='+', action=cfg_options_action())
    args = parser.parse_args(argv)
    if args.shape is not None and min(args.shape) < 1:
        parser.error('--shape {} {}: both sides must be 1 or more'.format(*args.shape))
    result = count(args.config, args.shape, args.cfg_options)
    print(f'config: {args.config}')
    print(f'input: 1x{result.channels}x{result.shape[0]}x{result.shape[1]}')
    print(f'params: {result.params / 1e6:.2f}M')
    print(f'FLOPs (multiply-adds): {result.layers / 1e9:.1f}G  (convolutions and linear layers, '
          f'as the paper counts)')
    print(f'attention products (multiply-adds): {result.attention_products / 1e9:.1f}G  (not in '
          f'the paper\'s count)')


if __name__ == '__main__':
    sys.exit(run_tool(main))
