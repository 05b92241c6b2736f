"""davit_mm against the upstream code itself: weights in the official code's, timm's, Florence-2's and
mmpretrain's own layouts, loaded as a user loads them, must give the features that upstream code
computed.

``data/upstream_outputs.pt`` was written by ``data/make_upstream_outputs.py`` running the official
detection backbone (github dingmyu/davit), timm's ``DaVit`` (as ``davit_tiny`` and as the Florence-2
tower ``davit_base_fl`` build it, the latter also fed a file in Microsoft's Florence-2 layout through
timm's own converter) and mmpretrain's ``DaViT`` on odd-sized inputs; see that script. The other tests
compare davit_mm with ``ReferenceDaViT``; these pin both to the upstream code.
"""
import contextlib
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from davit_mm import ops
from davit_mm.checkpoint import CheckpointError, detect_format, load_pretrained
from davit_mm.models import DaViT
from davit_mm.models.reference import ReferenceDaViT

DATA = osp.join(osp.dirname(osp.abspath(__file__)), 'data', 'upstream_outputs.pt')
# The layout each case's state dict must be recognised as. timm's Florence-2 towers name their
# blocks (spatial_block/channel_block) as davit_mm does, so they read as davit_mm's layout.
LAYOUT = {'official': 'official', 'timm': 'timm', 'timm_florence2': 'davit_mm', 'florence2': 'florence2',
          'mmpretrain': 'mmpretrain'}


@pytest.fixture(scope='module')
def upstream():
    return torch.load(DATA)


def _state_dict(case):
    return {key: value.float() for key, value in case['state_dict'].items()}


def _expected(case, outputs):
    """The upstream outputs as davit_mm gives them: timm's stage outputs have no per-stage norms,
    which davit_mm builds at their init (weight 1, bias 0) when a checkpoint has none."""
    if case['output_norms']:
        return outputs
    return [F.layer_norm(out.permute(0, 2, 3, 1), out.shape[1:2]).permute(0, 3, 1, 2) for out in outputs]


def _pairs(upstream, case):
    """(input, upstream outputs) for each input the case was run on."""
    return [(upstream['inputs'][i].float(), outputs) for i, outputs in zip(case['inputs'], case['outputs'])]


def _relative_error(got, want):
    return max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def test_the_stored_cases_are_the_upstream_ones(upstream):
    cases = upstream['cases']
    assert sorted(cases) == sorted(LAYOUT)
    assert cases['official']['source'].startswith('github dingmyu/davit@')
    assert cases['timm_florence2']['arch']['channel_attention'] == 'v2'
    assert len(upstream['inputs']) == 3
    for name, case in cases.items():
        assert case['inputs'] == ([1] if name == 'mmpretrain' else [0, 1, 2])
        for x, outs in _pairs(upstream, case):
            assert [tuple(o.shape[2:]) for o in outs] == [
                (-(-x.shape[2] // 2 ** (i + 2)), -(-x.shape[3] // 2 ** (i + 2))) for i in range(4)]


@pytest.mark.parametrize('name', sorted(LAYOUT))
@pytest.mark.parametrize('kernels', ['fast', 'plain'])
def test_upstream_weights_give_the_upstream_features(upstream, name, kernels):
    case = upstream['cases'][name]
    state_dict = _state_dict(case)
    assert detect_format(state_dict)[0] == LAYOUT[name]
    model = DaViT(case['arch']).eval()
    report = load_pretrained(model, state_dict)
    assert report['missing'] == ([] if case['output_norms'] else
                                 [f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')])
    assert sorted(report['classifier']) == sorted(k for k in state_dict if k.startswith('head.'))
    plain = ops.plain_kernels() if kernels == 'plain' else contextlib.nullcontext()
    with torch.no_grad(), plain:
        if kernels == 'plain':
            model.set_fused_attention(False)
        for x, outputs in _pairs(upstream, case):
            assert _relative_error(model(x), _expected(case, outputs)) < 5e-5


def test_the_reference_restates_the_official_code(upstream):
    """The official code's outputs, stored as computed with AVX-512 kernels: there the reference
    gives them bit for bit (0.0); torch's AVX2 and default kernels round differently (up to
    2.4e-6 relative), a fraction of what nudging one weight by 1% moves (below)."""
    case = upstream['cases']['official']
    reference = ReferenceDaViT(case['arch']).eval()
    reference.load_state_dict(_state_dict(case), strict=True)
    with torch.no_grad():
        for x, outputs in _pairs(upstream, case):
            assert _relative_error(reference(x), outputs) < 1e-5


def test_the_comparison_sees_a_one_percent_change_in_one_weight(upstream):
    """The weights are scaled so that every block matters: nudging one channel attention's
    projection moves the features by far more than the tolerance above."""
    case = upstream['cases']['official']
    state_dict = _state_dict(case)
    state_dict['main_blocks.2.0.1.attn.qkv.weight'] *= 1.01
    model = DaViT(case['arch']).eval()
    load_pretrained(model, state_dict)
    with torch.no_grad():
        x = upstream['inputs'][0].float()
        assert _relative_error(model(x)[2:], case['outputs'][0][2:]) > 1e-3


def test_a_timm_florence2_tower_in_a_plain_davit_is_refused_with_the_arch_to_use(upstream):
    case = upstream['cases']['timm_florence2']
    plain_arch = {k: v for k, v in case['arch'].items() if k not in ('overlapped_downsample', 'channel_attention')}
    model = DaViT(plain_arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"overlapped 3 x 3 downsampling .*arch='florence2-base'"):
        load_pretrained(model, _state_dict(case))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
