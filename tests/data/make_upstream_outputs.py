"""Write ``tests/data/upstream_outputs.pt``: features of small DaViTs computed by the upstream
implementations themselves, for ``tests/test_upstream_outputs.py`` to compare davit_mm against.

``davit_mm.models.reference.ReferenceDaViT`` restates the official code, and the tests compare the
fast backbone with it; this file pins both, and the checkpoint converters, to the upstream code
itself. For each
case the script builds the upstream model, gives it random weights (scaled so that every attention
is far from uniform, with non-trivial norms; rounded to float16 so that storing them in float16
loses nothing), runs it on a few odd-sized inputs and stores the state dict in that codebase's
own key layout, the inputs, the outputs and where they came from. The cases:

* ``official``: the DaViT authors' detection backbone (github dingmyu/davit,
  ``mmdet/mmdet/models/backbones/davit.py``), outputs with its per-stage norms;
* ``timm``: ``timm.models.davit.DaVit`` as ``davit_tiny`` builds it (stage outputs, no norms);
* ``timm_florence2``: ``DaVit`` as ``davit_base_fl`` builds it (Florence-2's vision tower:
  channel attention v2, overlapped 3 x 3 downsampling, named blocks);
* ``florence2``: a file in Microsoft's Florence-2 layout, with the features timm computes after
  reading it with its own converter (see :func:`florence2_case`);
* ``mmpretrain``: mmpretrain's ``DaViT`` backbone with all four output norms, its stem padded
  as the official one's (see :func:`mmpretrain_case`).

Run from the repository root, with timm and mmpretrain importable (torchvision is not needed)::

    python tests/data/make_upstream_outputs.py --official PATH/TO/davit/mmdet/mmdet/models/backbones/davit.py \
        --official-commit fc79470d99babab23e45e0087790fa23cfd10a02

The official file is executed with its three framework imports (timm layers, mmcv_custom,
mmdet's registry) replaced by the few names it uses; nothing else in it is changed.
"""
import argparse
import importlib.abc
import importlib.machinery
import math
import os.path as osp
import sys
import types

import torch
import torch.nn as nn

ARCH = dict(embed_dims=(8, 16, 16, 24), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=3)
SIZES = ((1, 3, 45, 67), (1, 3, 64, 96), (2, 3, 33, 19))
# timm's settings for Florence-2's tower (as davit_base_fl), and davit_mm's for the same model.
TIMM_FLORENCE2 = dict(down_kernel_size=3, channel_attn_v2=True, named_blocks=True)
FLORENCE2 = dict(overlapped_downsample=True, channel_attention='v2')
OUT = osp.join(osp.dirname(osp.abspath(__file__)), 'upstream_outputs.pt')


def randomise(model: nn.Module, seed: int) -> None:
    """Weights with unit-scale activations and sharp attention, exactly representable in float16."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                is_norm_weight = 'norm' in name and name.endswith('weight')
                p.copy_(1 + 0.3 * noise if is_norm_weight else 0.2 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise * 1.5 / math.sqrt(fan_in))
            p.copy_(p.half().float())


def features(model: nn.Module, inputs, which) -> list:
    """The model's outputs (eval mode) for ``inputs[i]``, ``i`` in ``which``."""
    model.eval()
    with torch.no_grad():
        return [[t.contiguous() for t in model(inputs[i].float())] for i in which]


def run(model: nn.Module, inputs, seed: int, which=range(len(SIZES))) -> dict:
    """The model's state dict (float16) and its outputs for ``inputs[i]``, ``i`` in ``which``."""
    randomise(model, seed)
    outputs = features(model, inputs, which)
    return dict(state_dict={k: v.half() for k, v in model.state_dict().items()}, outputs=outputs,
                inputs=list(which))


def official_case(path: str, commit: str, inputs) -> dict:
    with open(path) as f:
        source = f.read()
    replaced = {
        'from timm.models.layers import DropPath, to_2tuple, trunc_normal_\n':
            'DropPath, trunc_normal_ = None, nn.init.trunc_normal_\n'
            'to_2tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)\n',
        'from mmcv_custom import load_checkpoint\n': '',
        'from mmdet.utils import get_root_logger\n': '',
        'from ..builder import BACKBONES\n': '',
        '@BACKBONES.register_module()\n': '',
    }
    for old, new in replaced.items():
        if old not in source:
            raise SystemExit(f'error: {path} does not contain {old!r}; is it the official detection backbone?')
        source = source.replace(old, new)
    module = types.ModuleType('official_davit')
    exec(compile(source, path, 'exec'), module.__dict__)
    model = module.DaViT(embed_dims=ARCH['embed_dims'], depths=ARCH['depths'], num_heads=ARCH['num_heads'],
                         window_size=ARCH['window_size'], drop_path_rate=0.)
    case = run(model, inputs, seed=1)
    case.update(source=f'github dingmyu/davit@{commit} mmdet/mmdet/models/backbones/davit.py',
                arch=dict(ARCH), output_norms=True)
    return case


class _NoTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """timm and mmpretrain import torchvision for data and other models, never for DaViT: give
    them empty modules when it is not installed."""

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith('__'):
                raise AttributeError(name)
            return _NoTorchvision._Placeholder(name, (), {'__init__': lambda self, *a, **k: None})

    class _Placeholder(type):
        def __getattr__(cls, name):
            if name.startswith('__'):
                raise AttributeError(name)
            return name

    def find_spec(self, fullname, path, target=None):
        if fullname.split('.')[0] == 'torchvision':
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = self._Module(spec.name)
        module.__path__, module.__version__ = [], '0.0'
        return module

    def exec_module(self, module):
        pass


def _allow_missing_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        if not any(isinstance(finder, _NoTorchvision) for finder in sys.meta_path):
            sys.meta_path.insert(0, _NoTorchvision())


def timm_cases(inputs) -> dict:
    _allow_missing_torchvision()
    import timm
    from timm.models.davit import DaVit

    class Stages(DaVit):
        def forward(self, x):
            return self.forward_intermediates(x, intermediates_only=True)

    def build(num_classes, **extra):
        return Stages(embed_dims=ARCH['embed_dims'], depths=ARCH['depths'], num_heads=ARCH['num_heads'],
                      window_size=ARCH['window_size'], num_classes=num_classes, **extra)

    cases = {}
    for name, seed, extra, switches in (('timm', 2, {}, {}),
                                        ('timm_florence2', 3, TIMM_FLORENCE2, FLORENCE2)):
        case = run(build(5, **extra), inputs, seed)
        case.update(source=f'timm {timm.__version__} timm.models.davit.DaVit({extra})',
                    arch=dict(ARCH, **switches), output_norms=False)
        cases[name] = case
    cases['florence2'] = florence2_case(inputs, build(0, **TIMM_FLORENCE2), timm.__version__)
    return cases


def florence2_case(inputs, model: nn.Module, timm_version: str) -> dict:
    """A whole Florence-2 file in Microsoft's remote-code layout, as ``tests/formats.py`` writes
    one, read by timm's own converter for those files (``checkpoint_filter_fn``) into ``DaVit`` as
    ``davit_base_fl`` builds it. timm must take every tower key (it lacks only its classifier
    norm), so timm's reading of the layout and davit_mm's are checked against each other.
    ``model``: timm's model with davit_base_fl's settings, its weights to be read from the file."""
    from timm.models.davit import checkpoint_filter_fn

    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
    import formats
    from davit_mm.models.reference import ReferenceDaViT

    tower = ReferenceDaViT(ARCH, **FLORENCE2)
    randomise(tower, seed=5)
    torch.manual_seed(5)  # the writer draws the projector/language-model tensors from torch's generator
    file = formats.florence2(tower.state_dict())
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn(file, model), strict=False)
    if unexpected or sorted(missing) != ['head.norm.bias', 'head.norm.weight']:
        raise SystemExit(f'error: timm did not read the Florence-2 file as a whole tower: '
                         f'missing {missing}, unexpected {unexpected}')
    which = range(len(inputs))
    return dict(state_dict={k: v.half() for k, v in file.items()}, outputs=features(model, inputs, which),
                inputs=list(which),
                source=f"tests/formats.py florence2() file, read by timm {timm_version}'s checkpoint_filter_fn "
                       f'into DaVit(davit_base_fl settings)',
                arch=dict(ARCH, **FLORENCE2), output_norms=False)


def mmpretrain_case(inputs) -> dict:
    """mmpretrain's DaViT, its stem padded as the official one's (3 pixels, not 'same'), on the
    one input it runs at (its downsampling pads the token axes, so odd maps fail): its weight
    names and the meaning behind them, not its stem, are what is checked."""
    _allow_missing_torchvision()
    import mmpretrain
    from mmpretrain.models.backbones import DaViT

    arch = dict(embed_dims=4, depths=list(ARCH['depths']), num_heads=list(ARCH['num_heads']))  # doubling widths
    model = DaViT(arch=arch, window_size=ARCH['window_size'], drop_path_rate=0., pad_small_map=True,
                  out_indices=(0, 1, 2, 3))
    model.patch_embed.adaptive_padding = None
    model.patch_embed.projection.padding = (3, 3)
    case = run(model, inputs, seed=4, which=[1])
    case['state_dict'] = {f'backbone.{k}': v for k, v in case['state_dict'].items()}
    case.update(source=f'mmpretrain {mmpretrain.__version__} DaViT(pad_small_map=True), stem padding 3',
                arch=dict(ARCH, embed_dims=(4, 8, 16, 32)),
                output_norms=True)
    return case


def _one_storage(tensors):
    """The tensors as views of one flat tensor: torch.save then writes one record, not one each."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


def _packed(case: dict) -> dict:
    names = list(case['state_dict'])
    values = _one_storage([case['state_dict'][k] for k in names])
    outputs = _one_storage([t for outs in case['outputs'] for t in outs])
    per_input = len(case['outputs'][0])
    return dict(case, state_dict=dict(zip(names, values)),
                outputs=[outputs[i:i + per_input] for i in range(0, len(outputs), per_input)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--official', required=True, help="the official code's mmdet davit.py")
    parser.add_argument('--official-commit', required=True, help='the commit that file is from')
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(size, generator=gen).half() for size in SIZES]  # upcast exactly when used
    cases = dict(official=official_case(args.official, args.official_commit, inputs), **timm_cases(inputs),
                 mmpretrain=mmpretrain_case(inputs))
    cases = {name: _packed(case) for name, case in cases.items()}
    torch.save(dict(inputs=_one_storage(inputs), cases=cases, torch=str(torch.__version__)), OUT)
    print(f'wrote {OUT}: ' + ', '.join(f'{k} ({v["source"]})' for k, v in cases.items()))


if __name__ == '__main__':
    main()
