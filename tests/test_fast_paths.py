"""The fast paths compute what the plain ops compute (speed itself is measured by
tools/analysis/benchmark.py, never by tests)."""
import json
import os.path as osp

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from davit_mm.models import DaViT
from davit_mm.models import davit as davit_module
from davit_mm.models.davit import fused_linear
from helpers import CONFIGS, run_tool

onednn = pytest.mark.skipif(not davit_module._ONEDNN_LINEAR, reason='this torch has no oneDNN linear')


def plain(x, layer, gelu=False, residual=None):
    out = F.linear(x, layer.weight, layer.bias)
    out = F.gelu(out) if gelu else out
    return out if residual is None else residual + out


@onednn
@pytest.mark.parametrize('gelu,with_residual', [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize('strided', [False, True])
def test_fused_linear_without_grad_matches_the_plain_ops(gelu, with_residual, strided):
    layer = nn.Linear(24, 24)
    x = torch.randn(2, 9, 11, 24)
    if strided:
        x = x[:, 1:8, 2:9]  # a cropped, non-contiguous view (padded windows are cropped so)
    residual = torch.randn(x.shape) if with_residual else None
    with torch.no_grad():
        fast = fused_linear(x, layer, gelu, residual)
        expected = plain(x, layer, gelu, residual)
    assert fast.shape == expected.shape
    assert (fast - expected).abs().max() < 1e-5


@onednn
def test_fused_linear_in_bf16_matches_the_plain_ops():
    layer = nn.Linear(32, 64).bfloat16()
    x = torch.randn(50, 32).bfloat16()
    with torch.no_grad():
        assert torch.allclose(fused_linear(x, layer, gelu=True).float(),
                              plain(x, layer, gelu=True).float(), atol=2e-2, rtol=2e-2)


@onednn
@pytest.mark.parametrize('gelu,with_residual', [(False, False), (True, False), (False, True)])
def test_fused_linear_gradients_match_autograd_of_the_plain_ops(gelu, with_residual):
    torch.manual_seed(0)
    layer = nn.Linear(16, 48)
    x = torch.randn(3, 5, 7, 16)[:, :, :6].requires_grad_()
    residual = torch.randn(3, 5, 6, 48, requires_grad=True) if with_residual else None
    grads = []
    for fn in (fused_linear, plain):
        layer.zero_grad()
        inputs = [x] + ([residual] if with_residual else [])
        out = fn(x, layer, gelu, residual)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append([t.grad.clone() for t in inputs] + [layer.weight.grad.clone(), layer.bias.grad.clone()])
        for t in inputs:
            t.grad = None
    for fast, expected in zip(*grads):
        assert torch.allclose(fast, expected, atol=1e-5, rtol=1e-4)


@onednn
@pytest.mark.parametrize('with_residual', [False, True])
@pytest.mark.parametrize('frozen_fc1', [False, True])
def test_mlp_training_path_matches_autograd_of_the_plain_ops(with_residual, frozen_fc1):
    """The MLP's training path keeps less for backward (it recomputes GELU): same gradients."""
    torch.manual_seed(0)
    mlp = davit_module.Mlp(16, 64)
    mlp.fc1.requires_grad_(not frozen_fc1)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    residual = torch.randn(2, 5, 7, 16, requires_grad=True) if with_residual else None
    weights = torch.linspace(-1, 1, x.numel()).view(x.shape)
    results = []
    for forward in (mlp.forward,
                    lambda t, residual: plain(F.gelu(plain(t, mlp.fc1)), mlp.fc2, residual=residual)):
        mlp.zero_grad()
        out = forward(x, residual=residual)
        (out * weights).sum().backward()
        tensors = [x] + ([residual] if with_residual else []) + [p for p in mlp.parameters() if p.requires_grad]
        results.append([out.detach()] + [t.grad.clone() for t in tensors])
        for t in (x, residual):
            if t is not None:
                t.grad = None
    for fast, expected in zip(*results):
        assert torch.allclose(fast, expected, atol=1e-5, rtol=1e-4)


def test_fused_linear_refuses_gelu_with_a_residual():
    with pytest.raises(ValueError, match='cannot be combined'):
        fused_linear(torch.randn(2, 4), nn.Linear(4, 4), gelu=True, residual=torch.randn(2, 4))


@pytest.mark.parametrize('mode', ['eval', 'train', 'train_with_cp'])
def test_backbone_traces_without_graph_breaks(tiny_arch, mode):
    model = DaViT(tiny_arch, with_cp=mode == 'train_with_cp')
    model.train(mode != 'eval')
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 45, 67))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_conv_weight_gradients_have_the_weights_strides(tiny_arch):
    """DDP's gradient buckets need matching strides, or it copies every gradient (and warns)."""
    model = DaViT(tiny_arch, drop_path_rate=0.).train()
    sum(o.sum() for o in model(torch.randn(2, 3, 40, 40))).backward()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 + 2 * 2 * sum(tiny_arch['depths'])
    for conv in convs:
        assert conv.weight.grad.stride() == conv.weight.stride()


# --------------------------------------------------------------------------- benchmark tool
def test_benchmark_tool_reports_times_ratios_memory_and_accuracy(tmp_path):
    out = tmp_path / 'bench.json'
    run_tool(['analysis/benchmark.py', '--sizes', '64x96', '--repeats', '1', '--warmup', '0',
              '--memory', '--with-cp', '--accuracy', '--json', out], cwd=tmp_path)
    row, = json.loads(out.read_text())
    for key in ('forward_ours_s', 'forward_reference_s', 'forward_ratio', 'train_ours_s',
                'train_reference_s', 'train_ratio', 'train_peak_mb_ours', 'train_peak_mb_reference',
                'train_peak_mb_ours_cp', 'with_cp_memory_ratio', 'forward_peak_mb_ours',
                'forward_peak_mb_reference', 'train_rss_mb_ours', 'ours_err_vs_fp64'):
        assert row[key] > 0, key
    assert row['max_abs_diff'] < 1e-4


def test_benchmark_tool_times_a_whole_config(tmp_path):
    out = tmp_path / 'bench.json'
    config = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')
    run_tool(['analysis/benchmark.py', '--config', config, '--sizes', '96x128', '--batch', '2',
              '--repeats', '1', '--warmup', '0', '--json', out], cwd=tmp_path)
    row, = json.loads(out.read_text())
    assert row['train_s'] > 0 and row['forward_images_per_s'] > 0
