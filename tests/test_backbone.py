"""The DaViT backbone: shapes, official numerics, fast paths, freezing, checkpointing, bad input."""
import contextlib
import os.path as osp
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from davit_mm import ops
from davit_mm.checkpoint import convert_state_dict
from davit_mm.models import DaViT
from davit_mm.models.reference import ReferenceDaViT
from davit_mm.models import davit as davit_module
from davit_mm.models.davit import ChannelAttention, DualAttentionBlock, WindowAttention
from helpers import CONFIGS, weighted_sum

ODD_SIZES = [(1, 45, 67), (2, 50, 50), (1, 33, 19), (1, 8, 8)]


def build_pair(arch, **kwargs):
    """A reference (official layout) and a DaViT holding the same random weights, in eval mode."""
    ref = ReferenceDaViT(arch, **kwargs).eval()
    with torch.no_grad():  # non-trivial LayerNorms, so a swapped norm would show
        for name, p in ref.named_parameters():
            if 'norm' in name:
                p.add_(torch.randn_like(p) * 0.2)
    ours = DaViT(arch, **kwargs).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), 'official').state_dict)
    return ref, ours


def max_diff(outs_a, outs_b):
    return max((a - b).abs().max().item() for a, b in zip(outs_a, outs_b))


@pytest.mark.parametrize('batch,height,width', ODD_SIZES)
def test_output_shapes_are_ceil_divided_strides(tiny_arch, batch, height, width):
    model = DaViT(tiny_arch).eval()
    with torch.no_grad():
        outs = model(torch.randn(batch, 3, height, width))
    assert len(outs) == 4
    for i, out in enumerate(outs):
        stride = 2 ** (i + 2)
        expected = (batch, 16 * 2 ** i, -(-height // stride), -(-width // stride))
        assert tuple(out.shape) == expected
        assert out.is_contiguous()


@pytest.mark.parametrize('batch,height,width', ODD_SIZES)
def test_matches_official_reference_at_odd_sizes(tiny_arch, batch, height, width):
    ref, ours = build_pair(tiny_arch)
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) < 1e-5


def test_real_tiny_matches_reference_at_225x309():
    ref, ours = build_pair('tiny')
    x = torch.randn(1, 3, 225, 309)
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) < 1e-4


@pytest.mark.parametrize('overlapped,version', [(True, 'v2'), (False, 'v2'), (True, 'v1')])
def test_florence2_switches_match_reference(tiny_arch, overlapped, version):
    ref, ours = build_pair(tiny_arch, overlapped_downsample=overlapped, channel_attention=version)
    x = torch.randn(2, 3, 41, 29)
    with torch.no_grad():
        assert max_diff(ours(x), ref(x)) < 1e-5


def test_florence2_arch_uses_window_12_overlapped_downsample_and_v2():
    model = DaViT('florence2-base')
    assert (model.window_size, model.overlapped_downsample, model.channel_attention) == (12, True, 'v2')
    assert model.stages[1].downsample.conv.kernel_size == (3, 3)
    explicit = DaViT('florence2-base', window_size=7)
    assert explicit.window_size == 7


def test_fused_and_reference_attention_paths_agree(tiny_arch):
    model = DaViT(tiny_arch).eval()
    x = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attention(False)
        plain = model(x)
    assert max_diff(fused, plain) < 1e-5


@pytest.mark.parametrize('attn', [WindowAttention(16, 2, 3), ChannelAttention(16, 2, version='v1'),
                                  ChannelAttention(16, 2, version='v2')],
                         ids=['window', 'channel-v1', 'channel-v2'])
def test_each_attention_fast_path_matches_its_reference_path_with_gradients(attn):
    x = torch.randn(2, 7, 8, 16, requires_grad=True)
    attn.fused = True
    out_fast = attn(x)
    grad_fast, = torch.autograd.grad(out_fast.square().sum(), x)
    attn.fused = False
    out_ref = attn(x)
    grad_ref, = torch.autograd.grad(out_ref.square().sum(), x)
    assert (out_fast - out_ref).abs().max() < 1e-5
    assert (grad_fast - grad_ref).abs().max() < 1e-4


@pytest.mark.parametrize('version', ['v1', 'v2'])
@pytest.mark.parametrize('qkv_bias', [True, False])
@pytest.mark.parametrize('hw', [(3, 4), (9, 10)], ids=['N<C', 'N>=C'])  # C = 32
def test_channel_attention_fold_matches_the_reference_path(version, qkv_bias, hw):
    """The fused path folds the attended and output projections into one weight per image (the
    output projection only where N >= C): outputs and every gradient as the official steps."""
    torch.manual_seed(0)
    attn = ChannelAttention(32, 4, qkv_bias, version)
    x = torch.randn(2, *hw, 32, requires_grad=True)
    residual = torch.randn(2, *hw, 32, requires_grad=True)
    weights = torch.linspace(-1, 1, x.numel()).view(x.shape)
    results = []
    for fused in (True, False):
        attn.fused = fused
        attn.zero_grad()
        out = attn(x, residual=residual)
        grads = torch.autograd.grad((out * weights).sum(), [x, residual, *attn.parameters()])
        results.append([out] + list(grads))
    for fast, expected in zip(*results):
        assert torch.allclose(fast, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('hw', [(3, 4), (9, 10)], ids=['N<C', 'N>=C'])
def test_float64_channel_attention_computes_in_float64(hw):
    """The fused path computes its logits and folded weights in float32 at least, not at most: a
    float64 module keeps float64 (first-order gradcheck passes, as on the reference path)."""
    torch.manual_seed(0)
    attn = ChannelAttention(32, 4).double()
    x = torch.randn(1, *hw, 32, dtype=torch.float64, requires_grad=True)
    attn.fused = False
    expected = attn(x)
    attn.fused = True
    assert (attn(x) - expected).abs().max() < 1e-12
    assert torch.autograd.gradcheck(attn, (x,), fast_mode=True)


def test_float64_model_matches_the_float64_reference(tiny_arch):
    ref, ours = build_pair(tiny_arch)
    x = torch.randn(2, 3, 45, 38, dtype=torch.float64)
    with torch.no_grad():
        assert max_diff(ours.double()(x), ref.double()(x)) < 1e-10


@pytest.mark.parametrize('hw,saved', [((16, 20), True), ((4, 5), False)])
def test_channel_attention_fold_skips_a_projection_per_token_where_it_pays(hw, saved):
    """Where N >= C the fused path does one C x C product per token fewer than the official steps
    (the attended projection and the output projection become one); below, it folds only the
    attended projection, at C^2 d per image against N C d."""
    from torch.utils.flop_counter import FlopCounterMode
    attn = ChannelAttention(64, 2).eval()
    x = torch.randn(1, *hw, 64)
    counts = []
    for fused in (True, False):
        attn.fused = fused
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            attn(x, residual=x)
        counts.append(counter.get_total_flops() // 2)
    N, C, d = hw[0] * hw[1], 64, 32
    # Both: no (N x d) @ (d x d) per group, but the folded weight and bias, (d x d) @ (d x C).
    folded = counts[1] - N * C * d + C * C * d + C * d
    if saved:  # and no attended projection, for the output projection folded in, C x C @ C x C
        assert counts[0] == folded - N * C * C + C * C * C + C * C
    else:
        assert counts[0] == folded


def test_channel_attention_folds_the_projection_under_compile_but_not_in_exported_graphs():
    """torch.compile guards on sizes, so it gets the folded projection; torch.export's graph must
    hold at every size, so it keeps the projection (N >= C here, and not at all sizes)."""
    attn = ChannelAttention(32, 2).eval()
    x = torch.randn(2, 8, 9, 32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == 'call_function'])
        return gm.forward

    with torch.no_grad():
        expected = attn(x, residual=x)
        compiled = torch.compile(attn, backend=backend)(x, residual=x)
    exported = torch.export.export(attn, (x, ), {'residual': x})
    exported_ops = [str(node.target) for node in exported.graph.nodes if node.op == 'call_function']
    assert torch.allclose(compiled, expected, atol=1e-5)
    assert sum('linear' in op for op in graphs[0]) == 1  # only the logits' projections
    assert sum('linear' in op for op in exported_ops) == 2  # and the output projection
    assert torch.allclose(exported.module()(x, residual=x), expected, atol=1e-5)


def test_channel_attention_fold_under_autocast_matches_fp32():
    torch.manual_seed(0)
    attn = ChannelAttention(64, 2).eval()
    x = torch.randn(2, 12, 10, 64)
    with torch.no_grad():
        expected = attn(x, residual=x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = attn(x, residual=x)
    assert (low.float() - expected).abs().max() < 3e-2 * expected.abs().max()


def test_drop_path_rates_rise_over_twice_the_number_of_layers(tiny_arch):
    model = DaViT(tiny_arch, drop_path_rate=0.5)
    rates = []
    for stage in model.stages:
        for layer in stage.blocks:
            for block in (layer.spatial_block, layer.channel_block):
                rates.append(block.drop_path.drop_prob if hasattr(block.drop_path, 'drop_prob') else 0.)
    expected = torch.linspace(0, 0.5, 2 * sum(tiny_arch['depths'])).tolist()
    assert rates == pytest.approx(expected)


def test_drop_path_applies_to_both_residuals_of_the_channel_block():
    block = DualAttentionBlock(8, ChannelAttention(8, 2), drop_path=0.5).train()
    for module in (block.attn, block.mlp):  # each residual branch outputs ones
        module.forward = lambda x: torch.ones_like(x)
    for cpe in (block.cpe1, block.cpe2):
        cpe.forward = lambda x: x
    torch.manual_seed(0)
    out = block(torch.zeros(64, 2, 2, 8))
    per_sample = out[:, 0, 0, 0]
    # Each branch contributes 0 or 1 / keep_prob = 2, independently: sums of {0, 2, 4} occur.
    assert set(per_sample.unique().tolist()) == {0., 2., 4.}


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_drop_path_with_its_addition_in_one_pass_is_mmcvs_drop_path(dtype):
    """Training blocks add their dropped branches in one pass (one ``addcmul``, no whole-map
    division and product first): same random draws as mmcv's ``DropPath``, same outputs (to the
    rounding of ``x / keep_prob`` against ``x * (1 / keep_prob)``) and gradients, and with a
    bf16 branch added to a float32 map the result is float32, as the plain addition's."""
    from mmcv.cnn.bricks import DropPath
    torch.manual_seed(0)
    x = torch.randn(16, 5, 6, 8, requires_grad=True)
    branch = torch.randn(16, 5, 6, 8, dtype=dtype, requires_grad=True)
    drop = DropPath(0.3).train()
    torch.manual_seed(1)
    fused = ops.add_dropped_path(x, branch, 0.3)
    torch.manual_seed(1)
    plain = x + drop(branch)
    kept = (fused - x).flatten(1).abs().amax(1) > 0
    assert 0 < kept.sum() < 16  # both kinds of sample occur at this seed
    assert fused.dtype == plain.dtype == torch.float32
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(fused, plain, atol=tolerance, rtol=tolerance)
    grads = [torch.autograd.grad(weighted_sum(out), (x, branch)) for out in (fused, plain)]
    for a, b in zip(*grads):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), atol=tolerance,
                                                     rtol=tolerance)
    with ops.plain_kernels():  # the switch off: mmcv's DropPath itself
        torch.manual_seed(1)
        assert torch.equal(ops.add_dropped_path(x, branch, 0.3), plain)


def test_init_follows_official_scheme(tiny_arch):
    """Every Linear: weights trunc_normal(std=.02), biases 0; every LayerNorm: weight 1, bias 0
    (the official _init_weights). Everything is first set to other values."""
    model = DaViT(tiny_arch)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    model.init_weights()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert linears and norms
    for linear in linears:
        assert linear.bias is None or linear.bias.abs().max() == 0
        assert 0.015 < linear.weight.std().item() < 0.025 and abs(linear.weight.mean()) < 0.01
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert 0.019 < weights.std().item() < 0.021  # trunc_normal(std=.02), cut at +-2 (100 std)
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_out_indices_build_only_the_norms_and_stages_they_need(tiny_arch):
    model = DaViT(tiny_arch, out_indices=(1, 2))
    names = {n.split('.')[0] for n, _ in model.named_parameters()}
    assert {'norm1', 'norm2'} <= names and not {'norm0', 'norm3'} & names
    assert len(model.stages) == 3
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 64] == model.out_channels
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing unused under DDP


def test_negative_out_indices_count_from_the_end(tiny_arch):
    assert DaViT(tiny_arch, out_indices=(-1, -2)).out_indices == (2, 3)


@pytest.mark.parametrize('frozen_stages', [0, 1, 2, 4])
def test_frozen_stages_get_no_gradient_and_stay_in_eval(tiny_arch, frozen_stages):
    model = DaViT(tiny_arch, frozen_stages=frozen_stages, drop_path_rate=0.2)
    model.train()
    frozen = [model.stem] + list(model.stages[:frozen_stages])
    frozen += [getattr(model, f'norm{i}') for i in range(frozen_stages)]
    trainable = list(model.stages[frozen_stages:])
    trainable += [getattr(model, f'norm{i}') for i in range(frozen_stages, 4)]
    for module in frozen:
        assert not module.training
        assert all(not p.requires_grad for p in module.parameters())
    for module in trainable:
        assert module.training
        assert all(p.requires_grad for p in module.parameters())
    outs = model(torch.randn(1, 3, 32, 32))
    if trainable:
        sum(o.sum() for o in outs).backward()
        assert all(p.grad is not None for m in trainable for p in m.parameters())
    else:
        assert not any(o.requires_grad for o in outs)
    assert all(p.grad is None for m in frozen for p in m.parameters())


def test_frozen_stages_survive_init_weights(tiny_arch):
    model = DaViT(tiny_arch, frozen_stages=1)
    model.init_weights()
    model.train()
    assert not model.stages[0].training and not any(p.requires_grad for p in model.stem.parameters())


@pytest.fixture
def checkpointed(monkeypatch):
    """The blocks whose forward went through torch.utils.checkpoint.checkpoint (the function
    davit.py calls, as ``cp.checkpoint``), one entry per call."""
    calls = []
    original = davit_module.cp.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(function.__self__)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(davit_module.cp, 'checkpoint', spy)
    return calls


def all_blocks(model):
    return [block for stage in model.stages for layer in stage.blocks
            for block in (layer.spatial_block, layer.channel_block)]


def test_with_cp_gives_same_outputs_and_gradients(tiny_arch, checkpointed):
    plain = DaViT(tiny_arch, drop_path_rate=0.).train()
    ckpt = DaViT(tiny_arch, drop_path_rate=0., with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 40, 36)
    grads = []
    outs = []
    for model in (plain, ckpt):
        out = model(x)
        sum((o * o).mean() for o in out).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # every block of the with_cp model, and only those, ran under checkpoint, once each
    assert len(checkpointed) == 2 * sum(tiny_arch['depths'])
    assert set(map(id, checkpointed)) == set(map(id, all_blocks(ckpt)))
    assert max_diff(*outs) < 1e-6
    assert grads[0].keys() == grads[1].keys() == dict(plain.named_parameters()).keys()
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0, name  # a real gradient, not two zeros agreeing
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_with_cp_is_a_no_op_without_grad(tiny_arch, checkpointed):
    plain = DaViT(tiny_arch).eval()
    ckpt = DaViT(tiny_arch, with_cp=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected, outs = plain(x), ckpt(x)
    assert checkpointed == []  # no checkpoint call without grad
    assert len(outs) == 4 and all(torch.equal(a, b) for a, b in zip(outs, expected))
    ckpt(x)  # the same model with grad enabled does checkpoint every block
    assert len(checkpointed) == 2 * sum(tiny_arch['depths'])


class _ChannelsLastBatchNorm(nn.Module):
    """A BatchNorm2d on DaViT's (B, H, W, C) maps, as a user might swap in for a LayerNorm."""

    def __init__(self, channels):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@pytest.mark.parametrize('norm_eval', [True, False])
def test_norm_eval_keeps_batchnorm_in_eval(tiny_arch, norm_eval):
    model = DaViT(tiny_arch, norm_eval=norm_eval)
    model.stem.norm = _ChannelsLastBatchNorm(16)  # DaViT has none of its own: in the forward path
    bn = model.stem.norm.bn
    model.train()
    assert bn.training is not norm_eval
    assert all(m.training for m in model.modules() if m is not bn)  # only BatchNorm is affected
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    model(torch.randn(2, 3, 32, 32) * 3 + 1)
    stats = ('running_mean', 'running_var', 'num_batches_tracked')
    changed = [k for k in stats if not torch.equal(before[k], bn.state_dict()[k])]
    assert changed == ([] if norm_eval else list(stats))


# ------------------------------------------------------------------------------ fp16 / AMP
def test_channel_attention_in_fp16_matches_fp32_at_detection_resolution():
    """The logits sum over every token: at 800x1216 (200x304 stage-1 tokens) they reach ~1.5e5
    here, past fp16's 65504, unless computed in fp32; the fast path does, the plain reference
    path shows the overflow."""
    torch.manual_seed(0)
    attn = ChannelAttention(96, 3).eval()
    torch.nn.init.normal_(attn.qkv.weight, std=0.1)
    x = torch.randn(1, 200, 304, 96) * 0.5 + 1.5  # correlated tokens, as real features are
    with torch.no_grad():
        expected = attn(x)
        half = attn.half()
        fast = half(x.half()).float()
        half.fused = False
        plain = half(x.half()).float()
    assert torch.isfinite(fast).all()
    assert (fast - expected).abs().max() < 5e-3 * expected.abs().max()
    assert not torch.isfinite(plain).all()  # what the fp32 logits prevent


# ------------------------------------------------------------------------- parameter counts
OFFICIAL_IMAGENET_PARAMS = {'tiny': 28_360_168, 'small': 49_745_896, 'base': 87_954_408}


@pytest.mark.parametrize('arch', sorted(OFFICIAL_IMAGENET_PARAMS))
def test_trunk_plus_imagenet_head_matches_official_parameter_count(arch):
    """The official classifiers (28.3M/49.7M/87.9M) are the trunk + LayerNorm + 1000-way fc."""
    model = DaViT(arch, out_indices=(3,))
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('norm'))
    width = model.embed_dims[-1]
    classifier = 2 * width + width * 1000 + 1000
    assert trunk + classifier == OFFICIAL_IMAGENET_PARAMS[arch]


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('kwargs,exc,words', [
    (dict(arch='tinyy'), ValueError, ["arch='tinyy'", 'tiny', 'florence2-base']),
    (dict(arch=7), TypeError, ['arch must be a str or a dict']),
    (dict(arch=dict(embed_dims=32, depths=(1, 1))), ValueError, ["missing keys ['num_heads']"]),
    (dict(arch=dict(embed_dims=32, depths=(1,), num_heads=(1,), mlp=2)), ValueError, ["unknown keys ['mlp']"]),
    (dict(arch=dict(embed_dims=30, depths=(1, 1), num_heads=(4, 4))), ValueError,
     ['embed_dims[0]=30', 'num_heads[0]=4']),
    (dict(arch=dict(embed_dims=(32, 64), depths=(1, 1, 1), num_heads=(1, 2, 4))), ValueError,
     ['has 2 entries', '3 stages']),
    (dict(out_indices=()), ValueError, ['out_indices=()', 'empty']),
    (dict(out_indices=(0, 4)), ValueError, ['out_indices=(0, 4)', '[4]', '[-4, 3]']),
    (dict(out_indices=(1, 1)), ValueError, ['twice']),
    (dict(out_indices=3), TypeError, ['out_indices must be a list/tuple']),
    (dict(frozen_stages=5), ValueError, ['frozen_stages=5', '-1', '4']),
    (dict(frozen_stages=-2), ValueError, ['frozen_stages=-2']),
    (dict(channel_attention='v3'), ValueError, ["channel_attention='v3'", "'v1', 'v2'"]),
    (dict(window_size=0), ValueError, ['window_size=0']),
    (dict(drop_path_rate=1.5), ValueError, ['drop_path_rate=1.5']),
    # a base config's ResNet merged into the DaViT dict without _delete_=True: Python's bare
    # "unexpected keyword argument 'depth'" before
    (dict(depth=50, norm_cfg=dict(type='BN')), TypeError,
     ["DaViT got unknown arguments ['depth', 'norm_cfg']; accepted: ['arch', 'in_channels'",
      'give the DaViT dict _delete_=True']),
    (dict(embed_dims=96, depths=(1, 1, 3, 1)), TypeError,
     ['depths go into arch=dict(embed_dims=..., depths=..., num_heads=...)']),
])
def test_bad_arguments_raise_naming_argument_value_and_accepted(kwargs, exc, words):
    with pytest.raises(exc) as info:
        DaViT(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_numpy_numbers_are_taken_as_the_numbers_they_are(tiny_arch):
    """np.int64/np.float32 (a sweep's values) were refused as 'expected a positive int' / 'a float
    in [0, 1)' (np.float64 passed, a float subclass)."""
    np_arch = dict(tiny_arch, embed_dims=np.int64(16), depths=tuple(np.int64(d) for d in tiny_arch['depths']))
    model = DaViT(np_arch, window_size=np.int64(3), drop_path_rate=np.float32(0.25), mlp_ratio=np.float32(2),
                  out_indices=(np.int64(1), np.int64(3)), frozen_stages=np.int64(1), in_channels=np.int64(3))
    plain = DaViT(dict(tiny_arch, embed_dims=16), window_size=3, drop_path_rate=0.25, mlp_ratio=2.,
                  out_indices=(1, 3), frozen_stages=1)
    assert (model.window_size, model.out_indices, model.frozen_stages, model.embed_dims) == \
        (plain.window_size, plain.out_indices, plain.frozen_stages, plain.embed_dims)
    assert all(type(v) is int for v in (model.window_size, model.frozen_stages, *model.out_indices,
                                        *model.embed_dims, *model.depths))
    assert model.state_dict().keys() == plain.state_dict().keys()


SMALL_ARCH = dict(embed_dims=16, depths=(1, 1), num_heads=(1, 2))
INIT_TYPES = "'TruncNormal'"  # one of mmengine's weight-init types the message lists


@pytest.mark.parametrize('argument,value,exc,accepted', [
    ('mlp_ratio', -1, ValueError, 'finite number > 0'),
    ('mlp_ratio', 0, ValueError, 'at least one hidden channel'),
    ('mlp_ratio', 0.05, ValueError, 'the narrowest stage here is 16 wide'),  # int(16 * 0.05) = 0
    ('mlp_ratio', float('inf'), ValueError, 'finite number > 0'),
    ('mlp_ratio', '4', ValueError, 'finite number > 0'),
    ('mlp_ratio', True, ValueError, 'finite number > 0'),
    ('drop_path_rate', False, ValueError, 'a float in [0, 1)'),
    ('in_channels', True, ValueError, 'a positive int'),
    ('qkv_bias', 'yes', TypeError, 'True or False'),
    ('norm_eval', 3, TypeError, 'True or False'),
    ('with_cp', 'x', TypeError, 'True or False'),
    ('overlapped_downsample', 1, TypeError, 'True or False'),
    ('arch.overlapped_downsample', 'maybe', TypeError, 'True or False'),
    ('arch.window_size', 0, ValueError, 'a positive int'),
    ('arch.channel_attention', 'v3', ValueError, "('v1', 'v2')"),
    ('arch.embed_dims', 16.5, TypeError, 'an int or a list/tuple of ints'),
    ('init_cfg', 'davit_tiny.pth', TypeError, "dict(type='Pretrained', checkpoint=PATH)"),
    ('init_cfg', dict(type='Nope'), ValueError, INIT_TYPES),
    ('init_cfg', dict(checkpoint='davit_tiny.pth'), ValueError, INIT_TYPES),  # no type
    ('init_cfg', dict(type='Pretrained', checkpiont='davit_tiny.pth'), ValueError,
     "unknown keys ['checkpiont']"),
    ('init_cfg', [dict(type='Pretrained', checkpoint='davit_tiny.pth')], ValueError,
     "one dict(type='Pretrained', checkpoint=PATH)"),
])
def test_each_checked_argument_names_itself_its_value_and_what_is_accepted(
        argument, value, exc, accepted):
    if argument.startswith('arch.'):
        kwargs = dict(arch={**SMALL_ARCH, argument[len('arch.'):]: value})
    else:
        kwargs = dict(arch=SMALL_ARCH, **{argument: value})
    with pytest.raises(exc) as info:
        DaViT(out_indices=(0, 1), **kwargs)
    message = str(info.value)
    assert f'{argument}={value!r}' in message or f'{argument} must be' in message, message
    assert repr(value) in message and accepted in message, message


@pytest.mark.parametrize('init_cfg', [
    None,
    dict(type='Pretrained', checkpoint='davit_tiny.pth', prefix='backbone.', format='auto',
         map_location='cpu'),
    dict(type='Pretrained'),  # the missing checkpoint is reported by init_weights (test_checkpoint)
    [dict(type='TruncNormal', layer='Linear', std=.02),
     dict(type='Constant', layer='LayerNorm', val=1.)],
])
def test_init_cfg_forms_that_openmmlab_configs_use_are_accepted(init_cfg):
    assert DaViT(SMALL_ARCH, out_indices=(0, 1), init_cfg=init_cfg).init_cfg == init_cfg


def test_a_pretrained_path_is_a_pretrained_init_cfg_and_not_both():
    model = DaViT(SMALL_ARCH, out_indices=(0, 1), pretrained='davit_tiny.pth')
    assert model.init_cfg == dict(type='Pretrained', checkpoint='davit_tiny.pth')
    with pytest.raises(TypeError, match=r"pretrained=3: expected a checkpoint path"):
        DaViT(SMALL_ARCH, out_indices=(0, 1), pretrained=3)
    with pytest.raises(ValueError, match=r"pretrained='b.pth' and init_cfg=.* are both set.*"
                                         r"model\.backbone\.init_cfg\.checkpoint=PATH"):
        DaViT(SMALL_ARCH, out_indices=(0, 1), pretrained='b.pth',
              init_cfg=dict(type='Pretrained', checkpoint='a.pth'))


def test_mmseg_model_level_pretrained_reaches_the_backbone_as_its_init_cfg():
    """mmseg's EncoderDecoder hands a model-level ``pretrained`` to the backbone's constructor."""
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py'))
    cfg.model.pretrained = 'davit_mini.pth'  # this config's backbone sets init_cfg=None
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    assert model.backbone.init_cfg == dict(type='Pretrained', checkpoint='davit_mini.pth')


def test_mmengine_weight_init_types_in_init_cfg_initialise_the_model():
    model = DaViT(SMALL_ARCH, out_indices=(0, 1),
                  init_cfg=dict(type='Constant', layer='Linear', val=0.5))
    model.init_weights()
    assert torch.all(model.stages[0].blocks[0].spatial_block.attn.qkv.weight == 0.5)


@pytest.mark.parametrize('shape', [(3, 32, 32), (1, 1, 32, 32), (1, 4, 32, 32), (1, 3, 32, 32, 1),
                                   (1, 3, 0, 32), (1, 3, 32, 0)])  # an empty image: the stem's padding error
def test_input_of_wrong_rank_or_channels_is_rejected(tiny_arch, shape):
    with pytest.raises(ValueError, match=rf'expects a \(B, 3, H, W\) tensor with H, W >= 1, got shape '
                                         rf'{re.escape(str(shape))}'):
        DaViT(tiny_arch)(torch.randn(shape))


@pytest.mark.parametrize('image, got', [
    ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), 'dtype torch.uint8'),  # an image as decoded
    (torch.zeros(1, 3, 32, 32, dtype=torch.long), 'dtype torch.int64'),
    (torch.zeros(1, 3, 32, 32, dtype=torch.bool), 'dtype torch.bool'),
    (torch.zeros(1, 3, 32, 32).numpy(), 'ndarray'),
    (torch.zeros(1, 3, 32, 32).tolist(), 'list'),
])
def test_input_that_is_not_a_float_tensor_is_a_type_error_naming_what_it_is(tiny_arch, image, got):
    with pytest.raises(TypeError, match=rf'^DaViT expects a float tensor \(normalised images\), got {got}$'):
        DaViT(tiny_arch)(image)


@pytest.mark.parametrize('fast', [True, False])
def test_an_empty_batch_gives_empty_maps_forward_and_backward(tiny_arch, fast):
    """A batch of 0 images (as PyTorch's own layers take it) failed in a reshape with -1."""
    from davit_mm import ops
    model = DaViT(tiny_arch, drop_path_rate=0.1)
    x = torch.randn(0, 3, 40, 56, requires_grad=True)
    with ops.plain_kernels() if not fast else contextlib.nullcontext():
        for training in (False, True):
            outs = model.train(training)(x)
            assert [tuple(o.shape) for o in outs] == [
                (0, 16 * 2 ** i, -(-40 // 2 ** (i + 2)), -(-56 // 2 ** (i + 2))) for i in range(4)]
        sum(o.sum() for o in outs).backward()
        model.eval()
        for no_grad in (torch.no_grad, torch.inference_mode):  # CPU inference kernels
            with no_grad():
                assert [o.shape for o in model(x.detach())] == [o.shape for o in outs]
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_in_channels_accepts_other_inputs(tiny_arch):
    outs = DaViT(tiny_arch, in_channels=1)(torch.randn(1, 1, 20, 20))
    assert outs[0].shape == (1, 16, 5, 5)


def test_alias_and_name_build_the_same_variant():
    assert DaViT('t').depths == DaViT('tiny').depths == (1, 1, 3, 1)
    assert DaViT(dict(embed_dims=8, depths=(1, 1), num_heads=(1, 2)), out_indices=(0, 1)).embed_dims == (8, 16)


@pytest.mark.parametrize('with_cp', [False, True])
def test_training_under_bf16_autocast_follows_fp32(tiny_arch, with_cp):
    """A training step under CPU bf16 autocast (lean MLP in bf16, the plain attention steps,
    fp32 channel-attention logits), with and without checkpointing, computes in bf16 and follows
    the fp32 step's outputs and gradients to bf16 rounding. On 2 threads: PyTorch's CPU
    LayerNorm backward of a bf16 input sums its bias gradient with an error that depends on the
    thread count (the output norms' biases, sums over all positions, carry most of the gradient's
    difference: 4% of it on 2 threads, 8% on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_bf16_training_step(tiny_arch, with_cp)
    finally:
        torch.set_num_threads(threads)


def check_bf16_training_step(tiny_arch, with_cp):
    torch.manual_seed(0)
    model = DaViT(tiny_arch, drop_path_rate=0., with_cp=with_cp).train()
    x = torch.randn(2, 3, 61, 83)
    mlp_dtypes = []
    for block in ('spatial_block', 'channel_block'):
        getattr(model.stages[2].blocks[0], block).mlp.register_forward_hook(
            lambda module, args, out: mlp_dtypes.append(out.dtype))

    def step(autocast):
        model.zero_grad(set_to_none=True)
        mlp_dtypes.clear()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            outs = model(x)
            loss = sum(weighted_sum(o) for o in outs)
        loss.backward()
        return [o.detach().float() for o in outs], [p.grad for p in model.parameters()]

    outs, grads = step(True)
    assert set(mlp_dtypes) == {torch.bfloat16}, mlp_dtypes  # (recomputed too under with_cp)
    expected_outs, expected_grads = step(False)
    assert set(mlp_dtypes) == {torch.float32}
    for low, high in zip(outs, expected_outs):
        assert 0 < (low - high).abs().max() <= 3e-2 * high.abs().max()
    flat, expected_flat = torch.cat([g.flatten() for g in grads]), torch.cat(
        [g.flatten() for g in expected_grads])
    # bf16 keeps 8 bits of mantissa: the gradient as a whole agrees to a few percent.
    assert 0 < (flat - expected_flat).norm() <= 5e-2 * expected_flat.norm()
