"""davit_mm.ops: every device-specific kernel computes what the plain op computes, the CUDA
choices are the ones that run on CUDA inputs, and one switch turns them off (speed itself is
measured by tools/analysis/benchmark.py, never by tests)."""
import contextlib
import copy
import json
import os
import subprocess
import sys
import warnings
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from davit_mm import ops
from davit_mm.models import DaViT
from davit_mm.models import davit as davit_module
from helpers import REPO, weighted_sum

_REAL_TRITON_SELF_CHECK = ops._triton_self_check  # the triton_cuda fixture stands one in

onednn = pytest.mark.skipif(ops._ONEDNN_LINEAR is None, reason='this torch has no oneDNN linear')
# Whether a weight packed by ops._ONEDNN_PACK gives oneDNN's linear the plain weight's results to
# the bit: it does in torch 2.13 (what the suite is run with). In torch 2.11 a weight packed for
# other rows (the shorter last block of a blocked MLP) and, with AVX2 kernels, a transposed view
# against its packed copy over some row counts give results that differ by rounding.
_PACKED_BIT_IDENTICAL = ops._TORCH_VERSION >= (2, 13)


def assert_same_as_plain_weights(packed, plain):
    """The results with packed weights are those with plain weights: bit-identical where
    :data:`_PACKED_BIT_IDENTICAL`, otherwise up to rounding."""
    assert len(packed) == len(plain)
    for a, b in zip(packed, plain):
        if _PACKED_BIT_IDENTICAL:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# Triton 3.6's interpreter hands a loop's runtime bound to numpy as a one-element array; numpy
# 1.25 to 2.3 turn it into an int with this warning (harmless, so ignored), numpy >= 2.4 refuses.
# Triton 3.9's interpreter does not do it.
_NUMPY_SCALAR_DEPRECATION = 'Conversion of an array with ndim > 0 to a scalar'
pytestmark = pytest.mark.filterwarnings(f'ignore:{_NUMPY_SCALAR_DEPRECATION}:DeprecationWarning')


@pytest.fixture(autouse=True)
def onednn_training(monkeypatch):
    """CPU training through oneDNN's linears, as davit_mm trains on every CPU but Intel's, so
    that these tests check that path wherever they run (the tests of the other choice,
    :data:`ops._ONEDNN_TRAINING`, set it themselves)."""
    monkeypatch.setattr(ops, '_ONEDNN_TRAINING', True)


class _NoOneDNNLinear:
    """Stands in for oneDNN's linear where CPU inference must not call it."""

    def __getattr__(self, overload):
        raise AssertionError(f'oneDNN linear .{overload} called at inference with AVX2 kernels')


@pytest.fixture(params=['onednn', 'avx2'])
def inference_linears(request, monkeypatch):
    """CPU inference's linears through oneDNN, or as with AVX2 kernels: PyTorch's matmul, and
    oneDNN's linear must then not be called."""
    monkeypatch.setattr(ops, '_AVX2_INFERENCE_MATMUL', request.param == 'avx2')
    if request.param == 'avx2':
        monkeypatch.setattr(ops, '_ONEDNN_LINEAR', _NoOneDNNLinear())
    return request.param


def plain(x, layer, gelu=False, residual=None):
    out = F.linear(x, layer.weight, layer.bias)
    out = F.gelu(out) if gelu else out
    return out if residual is None else residual + out


@onednn
@pytest.mark.parametrize('gelu,with_residual', [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize('strided', [False, True])
def test_onednn_linear_without_grad_matches_the_plain_ops(inference_linears, gelu, with_residual,
                                                          strided):
    layer = nn.Linear(24, 24)
    x = torch.randn(2, 9, 11, 24)
    if strided:
        x = x[:, 1:8, 2:9]  # a cropped, non-contiguous view (padded windows are cropped so)
    residual = torch.randn(x.shape) if with_residual else None
    with torch.no_grad():
        fast = ops.linear(x, layer, gelu, residual)
        expected = plain(x, layer, gelu, residual)
    assert fast.shape == expected.shape
    assert (fast - expected).abs().max() < 1e-5


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('gelu,with_residual', [(False, False), (True, False), (False, True)])
def test_avx2_inference_linears_write_into_the_buffer_they_are_given(monkeypatch, bias, gelu,
                                                                     with_residual):
    """With AVX2 kernels the blocked inference MLP hands PyTorch's matmul the rows of its own
    buffers: the result lands there (nothing else is written), equal to the plain ops'."""
    monkeypatch.setattr(ops, '_AVX2_INFERENCE_MATMUL', True)
    monkeypatch.setattr(ops, '_ONEDNN_LINEAR', _NoOneDNNLinear())
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(30, 24)
    residual = torch.randn(30, 40) if with_residual else None
    buffer = torch.full((50, 40), float('nan'))
    rows = buffer[10:40]  # a block's contiguous rows
    with torch.no_grad():
        if with_residual:
            before = residual.clone()
            result = ops._inference_linear_add(x, residual, layer.weight, layer.bias, out=rows)
            assert torch.equal(residual, before)
        else:
            result = ops._inference_linear(x, layer.weight, layer.bias,
                                           'gelu' if gelu else 'none', out=rows)
        expected = plain(x, layer, gelu, residual)
    assert result.data_ptr() == rows.data_ptr() and result.shape == (30, 40)
    assert (rows - expected).abs().max() < 1e-5
    assert buffer[:10].isnan().all() and buffer[40:].isnan().all()


@onednn
def test_onednn_linear_in_bf16_matches_the_plain_ops():
    layer = nn.Linear(32, 64).bfloat16()
    x = torch.randn(50, 32).bfloat16()
    with torch.no_grad():
        assert torch.allclose(ops.linear(x, layer, gelu=True).float(),
                              plain(x, layer, gelu=True).float(), atol=2e-2, rtol=2e-2)


def test_bf16_where_onednn_cannot_compute_it_takes_the_plain_ops(monkeypatch):
    """On an AVX2 CPU oneDNN builds no bf16 linear: bf16 linears and MLPs (inference, blocked
    or not, and training) then run the plain ops instead of failing."""
    monkeypatch.setattr(ops, '_ONEDNN_DTYPES', (torch.float32,))

    def unavailable(*args, **kwargs):
        raise AssertionError('oneDNN was asked for a bf16 linear')

    monkeypatch.setattr(ops, '_onednn', unavailable)
    monkeypatch.setattr(ops, 'BLOCK_BYTES', 1)
    torch.manual_seed(0)
    mlp = davit_module.Mlp(16, 64).bfloat16()
    x = torch.randn(2, 80, 16).bfloat16()
    with torch.no_grad():
        assert torch.equal(ops.linear(x, mlp.fc1, gelu=True), F.gelu(plain(x, mlp.fc1)))
        assert torch.equal(mlp(x, residual=x), plain_mlp(mlp, x, residual=x))
    x.requires_grad_()
    out = mlp(x)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() == '_LeanMlpFunctionBackward'
    grad, = torch.autograd.grad(weighted_sum(out.float()), x)
    expected, = torch.autograd.grad(weighted_sum(plain_mlp(mlp, x).float()), x)
    assert torch.allclose(grad.float(), expected.float(), atol=1e-2, rtol=2e-2)


@onednn
@pytest.mark.parametrize('gelu,with_residual', [(False, False), (True, False), (False, True)])
def test_onednn_linear_gradients_match_autograd_of_the_plain_ops(gelu, with_residual):
    torch.manual_seed(0)
    layer = nn.Linear(16, 48)
    x = torch.randn(3, 5, 7, 16)[:, :, :6].requires_grad_()
    residual = torch.randn(3, 5, 6, 48, requires_grad=True) if with_residual else None
    grads = []
    for fn in (ops.linear, plain):
        layer.zero_grad()
        inputs = [x] + ([residual] if with_residual else [])
        out = fn(x, layer, gelu, residual)
        weighted_sum(out).backward()
        grads.append([t.grad.clone() for t in inputs] + [layer.weight.grad.clone(), layer.bias.grad.clone()])
        for t in inputs:
            t.grad = None
    for fast, expected in zip(*grads):
        assert torch.allclose(fast, expected, atol=1e-5, rtol=1e-4)


@onednn
@pytest.mark.parametrize('use_onednn', [True, False], ids=['onednn', 'matmul'])
def test_cpu_training_linears_take_the_kernel_the_switch_names(monkeypatch, use_onednn):
    """:data:`ops._ONEDNN_TRAINING` sends CPU training's linears and MLPs through oneDNN's
    linear, or (Intel CPUs) PyTorch's matmul; inference keeps oneDNN's (AVX-512 kernels) either
    way. Outputs and gradients are the plain ops'."""
    from torch.profiler import profile
    monkeypatch.setattr(ops, '_ONEDNN_TRAINING', use_onednn)
    monkeypatch.setattr(ops, '_AVX2_INFERENCE_MATMUL', False)
    torch.manual_seed(0)
    layer, mlp = nn.Linear(16, 16), davit_module.Mlp(16, 64)
    x = torch.randn(2, 7, 16, requires_grad=True)
    with profile() as prof:
        fast = ops.linear(mlp(x), layer, residual=x)
        fast_grads = torch.autograd.grad(weighted_sum(fast), [x, *mlp.parameters()])
    trained_by = {e.key for e in prof.key_averages()}
    expected = plain(plain_mlp(mlp, x), layer, residual=x)
    expected_grads = torch.autograd.grad(weighted_sum(expected), [x, *mlp.parameters()])
    assert ('mkldnn::_linear_pointwise' in trained_by) is use_onednn, sorted(trained_by)
    with profile() as prof, torch.no_grad():
        ops.linear(mlp(x), layer, residual=x)
    assert 'mkldnn::_linear_pointwise' in {e.key for e in prof.key_averages()}
    assert torch.allclose(fast, expected, atol=1e-5, rtol=1e-4)
    for a, b in zip(fast_grads, expected_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('text,vendor', [
    ('processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n', 'GenuineIntel'),
    ('processor\t: 0\nvendor_id\t: AuthenticAMD\n\nprocessor\t: 1\nvendor_id\t: X\n',
     'AuthenticAMD'),
    ('processor\t: 0\nBogoMIPS\t: 50.00\n', ''),  # aarch64 Linux names no vendor_id
    (None, '')])  # no /proc/cpuinfo: not Linux
def test_cpu_vendor_is_read_from_cpuinfo(tmp_path, text, vendor):
    cpuinfo = tmp_path / 'cpuinfo'
    if text is not None:
        cpuinfo.write_text(text)
    assert ops._cpu_vendor(str(cpuinfo)) == vendor


def plain_mlp(mlp, x, residual=None):
    return plain(F.gelu(plain(x, mlp.fc1)), mlp.fc2, residual=residual)


def _mlp_outputs_and_grads(forward, mlp, x, residual):
    mlp.zero_grad()
    out = forward(x, residual=residual)
    weighted_sum(out).backward()
    tensors = [t for t in (x, residual) if t is not None]
    results = [out.detach()] + [t.grad.clone() for t in tensors]
    results += [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
    for t in tensors:
        t.grad = None
    return results


@pytest.fixture(params=['onednn', 'matmul', 'portable'])
def mlp_kernel(request, monkeypatch):
    """The MLP's training path with oneDNN's matmuls (CPU), with PyTorch's (CPU training on Intel
    CPUs, :data:`ops._ONEDNN_TRAINING` off) or the plain ones (every other device, and CPU under
    autocast)."""
    if request.param == 'onednn' and ops._ONEDNN_LINEAR is None:
        pytest.skip('this torch has no oneDNN linear')
    if request.param == 'matmul':
        monkeypatch.setattr(ops, '_ONEDNN_TRAINING', False)
    if request.param == 'portable':
        monkeypatch.setattr(ops, '_ONEDNN_LINEAR', None)
    return request.param


@pytest.fixture(params=['views', 'packed'])
def mlp_backward_weights(request, monkeypatch):
    """oneDNN's products in the training MLP's backward with transposed weight views (AVX-512
    kernels) or with the weights packed once per backward (AVX2 kernels)."""
    if request.param == 'packed' and ops._ONEDNN_PACK is None:
        pytest.skip('this torch has no oneDNN weight reorder')
    monkeypatch.setattr(ops, '_PACK_MLP_BACKWARD_WEIGHTS', request.param == 'packed')
    return request.param


@pytest.mark.parametrize('with_residual', [False, True])
@pytest.mark.parametrize('frozen_fc1', [False, True])
def test_mlp_training_path_matches_autograd_of_the_plain_ops(mlp_kernel, mlp_backward_weights,
                                                             with_residual, frozen_fc1):
    """The MLP's training path keeps less for backward (it recomputes GELU): same gradients."""
    torch.manual_seed(0)
    mlp = davit_module.Mlp(16, 64)
    mlp.fc1.requires_grad_(not frozen_fc1)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    residual = torch.randn(2, 5, 7, 16, requires_grad=True) if with_residual else None
    fast = _mlp_outputs_and_grads(mlp.forward, mlp, x, residual)
    expected = _mlp_outputs_and_grads(lambda t, residual: plain_mlp(mlp, t, residual),
                                      mlp, x, residual)
    assert len(fast) == len(expected)
    for a, b in zip(fast, expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_second_derivatives_through_the_training_paths_raise_unless_switched_off(mlp_kernel):
    """The custom backward functions are not differentiable again: asking for a second
    derivative raises instead of silently missing terms; with the switch off it is computed."""
    mlp = davit_module.Mlp(8, 32)
    x = torch.randn(3, 8, requires_grad=True)

    def second_derivative():
        x.grad = None
        grad, = torch.autograd.grad(mlp(x).pow(2).sum(), x, create_graph=True)
        grad.sum().backward()
        return x.grad

    with pytest.raises(RuntimeError, match='second derivatives'):
        second_derivative()
    ops.set_fast_kernels(False)
    try:
        plain_result = second_derivative()
    finally:
        ops.set_fast_kernels(True)
    expected, = torch.autograd.grad(
        torch.autograd.grad(plain_mlp(mlp, x).pow(2).sum(), x, create_graph=True)[0].sum(), x)
    assert torch.allclose(plain_result, expected)


def test_second_derivatives_through_the_backbone_with_both_switches_off(tiny_arch):
    """docs/troubleshooting.md's recipe for gradient penalties: with the fast kernels and the
    fused attention off, a second derivative through the whole backbone is computed, and it is
    the one of the plain float64 model. The fast path raises, also where the second
    ``torch.autograd.grad`` would not reach the custom backward functions (their results feed
    residual additions): ``once_differentiable`` then silently returned a second derivative
    without those terms."""
    torch.manual_seed(0)
    model = DaViT(tiny_arch, drop_path_rate=0.).train()
    model.init_weights()
    x = torch.randn(1, 3, 40, 56)

    def second_derivative(net, image):
        image = image.clone().requires_grad_()
        grad, = torch.autograd.grad(sum(weighted_sum(o) for o in net(image)), image,
                                    create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), image)[0]

    fix = r'set_fast_kernels\(False\).*set_fused_attention\(False\)'
    with pytest.raises(RuntimeError, match=fix):
        second_derivative(model, x)
    model.set_fused_attention(False)
    with ops.plain_kernels():
        got = second_derivative(model, x)
        expected = second_derivative(copy.deepcopy(model).double(), x.double())
    assert got.abs().max() > 0
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max())


def _saved_for_backward(fn):
    """The tensors autograd keeps from ``fn()`` for backward, parameters excluded."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, [t for t in saved if not isinstance(t, nn.Parameter)]


def test_mlp_training_path_keeps_one_hidden_activation_for_backward(mlp_kernel):
    """Autograd of the plain ops keeps both the pre- and the post-GELU activation (64 wide);
    the training path keeps only the pre-GELU one, on every kernel."""
    mlp = davit_module.Mlp(16, 64)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    _, plain_saved = _saved_for_backward(lambda: plain_mlp(mlp, x))
    out, saved = _saved_for_backward(lambda: mlp(x))
    wide = x.numel() * 4
    hidden = [t for t in saved if t.numel() == wide]
    assert len([t for t in plain_saved if t.numel() == wide]) == 2
    assert len(hidden) == 1
    assert torch.allclose(hidden[0], plain(x, mlp.fc1), atol=1e-6)  # the pre-GELU activation
    assert out.grad_fn.name() == '_LeanMlpFunctionBackward'


@pytest.mark.parametrize('with_residual', [False, True])
def test_mlp_training_path_under_autocast_computes_as_autocast_would(with_residual):
    """Under (CPU bf16) autocast the training path casts its operands as autocast casts a
    linear's and computes forward and backward in bf16: the plain ops' results under the same
    autocast, to bf16 rounding, with bf16 outputs."""
    torch.manual_seed(0)
    mlp = davit_module.Mlp(32, 128)
    x = torch.randn(2, 6, 9, 32, requires_grad=True)
    residual = torch.randn(2, 6, 9, 32, requires_grad=True) if with_residual else None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, saved = _saved_for_backward(lambda: mlp(x))
        fast = _mlp_outputs_and_grads(mlp.forward, mlp, x, residual)
        expected = _mlp_outputs_and_grads(lambda t, residual: plain_mlp(mlp, t, residual),
                                          mlp, x, residual)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() == '_LeanMlpFunctionBackward'
    assert all(t.dtype == torch.bfloat16 for t in saved)
    assert fast[0].dtype == expected[0].dtype
    for a, b in zip(fast, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


def _rows_through(monkeypatch, name, weight):
    """The row counts of the inputs ``ops.<name>`` (a CPU linear) receives with ``weight`` (or a
    copy of it packed for oneDNN by ``ops._ONEDNN_PACK``), call by call."""
    rows, linear = [], getattr(ops, name)
    weights = _packed_copies(monkeypatch, weight)

    def recorded(t, w, *args, **kwargs):
        if any(w is known for known in weights):
            rows.append(t.shape[0])
        return linear(t, w, *args, **kwargs)

    monkeypatch.setattr(ops, name, recorded)
    return rows


def _packed_copies(monkeypatch, weight):
    """``[weight]``, to which each copy ``ops._ONEDNN_PACK`` packs of it is added (one list per
    weight; the recorders chain)."""
    weights, pack = [weight], ops._ONEDNN_PACK
    if pack is not None:
        def recorded(w, rows):
            packed = pack(w, rows)
            if w is weight:
                weights.append(packed)
            return packed

        monkeypatch.setattr(ops, '_ONEDNN_PACK', recorded)
    return weights


@onednn
@pytest.mark.parametrize('with_residual', [False, True])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_blocked_inference_mlp_matches_the_plain_ops(monkeypatch, inference_linears, with_residual,
                                                     dtype):
    """Inference MLPs run over blocks of tokens (the last one partial): same result as one pass."""
    if dtype not in ops._ONEDNN_DTYPES:
        pytest.skip(f'oneDNN computes no {dtype} on this CPU')
    torch.manual_seed(0)
    monkeypatch.setattr(ops, 'BLOCK_BYTES', 1)  # the smallest block: 64 tokens per thread
    rows = 64 * torch.get_num_threads()
    mlp = davit_module.Mlp(16, 64).to(dtype)
    x = torch.randn(2, 9, 2 * rows // 9 + 1, 16, dtype=dtype)[:, :, 1:]  # a non-contiguous view
    residual = torch.randn(x.shape, dtype=dtype) if with_residual else None
    fc1_calls = _rows_through(monkeypatch, '_inference_linear', mlp.fc1.weight)
    with torch.no_grad():
        fast = mlp(x, residual=residual)
        expected = plain(F.gelu(plain(x, mlp.fc1)), mlp.fc2, residual=residual)
    tokens = x.numel() // 16
    assert fc1_calls == [rows] * (tokens // rows) + [tokens % rows]  # blocked, as documented
    assert fast.shape == expected.shape and fast.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(fast.float(), expected.float(), atol=tolerance, rtol=tolerance)


@onednn
def test_blocked_inference_mlp_packs_its_weights_once_per_call(monkeypatch, inference_linears):
    """With oneDNN's linears the blocked inference MLP packs each weight for oneDNN once per call
    (for the rows of a full block), not at every block, and the result is that of plain weights
    (bit-identical with torch 2.13, :func:`assert_same_as_plain_weights`); PyTorch's matmul (AVX2
    kernels) gets them plain."""
    if ops._ONEDNN_PACK is None:
        pytest.skip('this torch has no oneDNN weight reorder')
    torch.manual_seed(0)
    monkeypatch.setattr(ops, 'BLOCK_BYTES', 1)  # the smallest block: 64 tokens per thread
    rows = 64 * torch.get_num_threads()
    mlp = davit_module.Mlp(16, 64)
    x, residual = torch.randn(2, 3 * rows // 2 + 5, 16), torch.randn(2, 3 * rows // 2 + 5, 16)
    packs, pack = [], ops._ONEDNN_PACK
    monkeypatch.setattr(ops, '_ONEDNN_PACK', lambda w, n: packs.append((w, n)) or pack(w, n))
    with torch.no_grad():
        packed = mlp(x, residual=residual)
        expected = [] if inference_linears == 'avx2' else [id(mlp.fc1.weight), id(mlp.fc2.weight)]
        assert [id(w) for w, _ in packs] == expected
        assert all(n == rows for _, n in packs)
        monkeypatch.setattr(ops, '_PACK_MLP_WEIGHTS', False)
        unpacked = mlp(x, residual=residual)
    assert len(packs) == len(expected)  # none with the switch off
    assert_same_as_plain_weights([packed], [unpacked])


@onednn
@pytest.mark.parametrize('frozen', ['none', 'fc1', 'fc1+input'])
def test_cpu_training_mlp_in_blocks_of_tokens_matches_autograd_of_the_plain_ops(
        monkeypatch, mlp_backward_weights, frozen):
    """CPU fp32 training runs the MLP's fc2 and its backward over blocks of tokens (3 or more;
    the last one partial), summing the weight gradients over them: same outputs and gradients."""
    torch.manual_seed(0)
    monkeypatch.setattr(ops, 'BLOCK_BYTES', 1)  # the smallest block: 64 tokens per thread
    rows = 64 * torch.get_num_threads()
    mlp = davit_module.Mlp(16, 64)
    mlp.fc1.requires_grad_(frozen == 'none')
    x = torch.randn(2, 9, 3 * rows // 18 + 2, 16)[:, :, 1:]  # a non-contiguous view
    x.requires_grad_(frozen != 'fc1+input')
    fc2_calls = _rows_through(monkeypatch, '_onednn', mlp.fc2.weight)
    wanted = [t for t in (x, *mlp.parameters()) if t.requires_grad]

    def outputs_and_grads(forward):
        out = forward(x)
        return [out.detach(), *torch.autograd.grad(weighted_sum(out), wanted)]

    fast = outputs_and_grads(mlp)
    tokens = x.numel() // 16
    assert fc2_calls == [rows] * (tokens // rows) + [tokens % rows]  # blocked, as documented
    expected = outputs_and_grads(lambda t: plain_mlp(mlp, t))
    assert len(fast) == len(expected) == {'none': 6, 'fc1': 4, 'fc1+input': 3}[frozen]
    for a, b in zip(fast, expected):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@onednn
@pytest.mark.parametrize('blocked', ['blocked', 'one pass, many rows', 'one pass, few rows'])
@pytest.mark.parametrize('input_grad', [True, False])
def test_cpu_training_mlp_backward_packs_its_weights_once_with_avx2_kernels(monkeypatch, blocked,
                                                                             input_grad):
    """With :data:`ops._PACK_MLP_BACKWARD_WEIGHTS` (AVX2 kernels) the training MLP's backward
    packs fc2's transposed weight, and fc1's where the input takes a gradient, once per backward
    for the rows of a full block; a backward in one pass, which multiplies by each weight once,
    only over :data:`ops._PACK_MIN_ROWS` tokens or more; without the switch, none. The gradients
    are the same either way."""
    if ops._ONEDNN_PACK is None:
        pytest.skip('this torch has no oneDNN weight reorder')
    torch.manual_seed(0)
    monkeypatch.setattr(ops, 'BLOCK_BYTES', 1)  # the smallest block: 64 tokens per thread
    monkeypatch.setattr(ops, '_PACK_FORWARD_WEIGHTS', False)  # the forward's packs: below
    rows = 64 * torch.get_num_threads()
    tokens = 3 * rows + 5 if blocked == 'blocked' else 2 * rows
    monkeypatch.setattr(ops, '_PACK_MIN_ROWS', tokens + (blocked == 'one pass, few rows'))
    mlp = davit_module.Mlp(16, 64)
    x = torch.randn(1, tokens, 16, requires_grad=input_grad)
    packs, pack = [], ops._ONEDNN_PACK
    monkeypatch.setattr(ops, '_ONEDNN_PACK', lambda w, n: packs.append((w, n)) or pack(w, n))

    def grads():
        wanted = [t for t in (x, *mlp.parameters()) if t.requires_grad]
        return torch.autograd.grad(weighted_sum(mlp(x)), wanted)

    monkeypatch.setattr(ops, '_PACK_MLP_BACKWARD_WEIGHTS', True)
    packed = grads()
    expected = [mlp.fc2.weight.t()] + ([mlp.fc1.weight.t()] if input_grad else [])
    expected = [] if blocked == 'one pass, few rows' else expected
    assert len(packs) == len(expected)
    for (w, n), want in zip(packs, expected):
        assert torch.equal(w, want) and w.is_contiguous()
        assert n == (rows if blocked == 'blocked' else tokens)
    monkeypatch.setattr(ops, '_PACK_MLP_BACKWARD_WEIGHTS', False)
    views = grads()
    assert len(packs) == len(expected)  # none with the switch off
    assert len(packed) == len(views) == 4 + input_grad
    assert_same_as_plain_weights(packed, views)


@onednn
@pytest.mark.parametrize('many_rows', [True, False])
@pytest.mark.parametrize('layer', ['linear', 'mlp', 'blocked mlp'])
def test_cpu_training_forward_packs_its_weights_where_that_pays(monkeypatch, layer, many_rows):
    """With :data:`ops._PACK_FORWARD_WEIGHTS` oneDNN's training linears get their weights packed
    once per call, for the call's rows: the blocked MLP's fc2, called at every block, for a full
    block's rows; a weight that serves one call only where the call multiplies
    :data:`ops._PACK_MIN_ROWS` rows or more (plain below). Outputs and gradients are those of
    plain weights (:func:`assert_same_as_plain_weights`), and with the switch off nothing is
    packed."""
    if ops._ONEDNN_PACK is None:
        pytest.skip('this torch has no oneDNN weight reorder')
    torch.manual_seed(0)
    monkeypatch.setattr(ops, 'BLOCK_BYTES', 1)  # the smallest block: 64 tokens per thread
    monkeypatch.setattr(ops, '_PACK_MLP_BACKWARD_WEIGHTS', False)  # the backward's: above
    rows = 64 * torch.get_num_threads()
    tokens = 3 * rows + 5 if layer == 'blocked mlp' else 2 * rows
    x = torch.randn(2, tokens // 2, 16, requires_grad=True)[:, 1:]
    tokens = 2 * (tokens // 2 - 1)
    monkeypatch.setattr(ops, '_PACK_MIN_ROWS', tokens if many_rows else tokens + 1)
    if layer == 'linear':
        module = nn.Linear(16, 24)
        forward = lambda t: ops.linear(t, module)  # noqa: E731
        expected = [(module.weight, tokens)] if many_rows else []
    else:
        module = davit_module.Mlp(16, 64)
        forward = module
        expected = [(module.fc1.weight, tokens)] if many_rows else []
        if layer == 'blocked mlp':  # called at every block: packed however few the rows
            expected.append((module.fc2.weight, rows))
        elif many_rows:
            expected.append((module.fc2.weight, tokens))
    packs, pack = [], ops._ONEDNN_PACK
    monkeypatch.setattr(ops, '_ONEDNN_PACK', lambda w, n: packs.append((w, n)) or pack(w, n))

    def outputs_and_grads():
        out = forward(x)
        return [out, *torch.autograd.grad(weighted_sum(out), [x, *module.parameters()])]

    monkeypatch.setattr(ops, '_PACK_FORWARD_WEIGHTS', True)
    packed = outputs_and_grads()
    assert [(id(w), n) for w, n in packs] == [(id(w), n) for w, n in expected]
    monkeypatch.setattr(ops, '_PACK_FORWARD_WEIGHTS', False)
    plain_weights = outputs_and_grads()
    assert len(packs) == len(expected)  # none with the switch off
    assert_same_as_plain_weights(packed, plain_weights)


@onednn
def test_cpu_training_mlp_takes_one_pass_below_three_blocks_and_in_bf16(monkeypatch):
    monkeypatch.setattr(ops, 'BLOCK_BYTES', 1)
    rows = 64 * torch.get_num_threads()
    assert ops._training_mlp_blocks(torch.empty(2 * rows, 64)) is None
    assert len(ops._training_mlp_blocks(torch.empty(1, 2 * rows + 1, 64))) == 3
    assert ops._training_mlp_blocks(torch.empty(3 * rows, 64, dtype=torch.bfloat16)) is None


@pytest.mark.parametrize('with_residual', [False, True])
@pytest.mark.parametrize('size', [(17, 11), (21, 12)], ids=['padded', 'whole-windows'])
def test_window_attention_in_bands_of_window_rows_matches_one_pass(monkeypatch, with_residual, size):
    """CPU inference runs window attention over bands of window rows (the last one cropped by the
    padding): same result as one pass over the map."""
    torch.manual_seed(0)
    attn = davit_module.WindowAttention(16, 2, window_size=3).eval()
    x = torch.randn(2, *size, 16)
    residual = torch.randn(x.shape) if with_residual else None
    with torch.no_grad():
        expected = attn(x, residual=residual)
        bands, attend = [], attn._attend

        def recorded(band, *args):
            bands.append(band.shape[1])
            return attend(band, *args)

        monkeypatch.setattr(attn, '_attend', recorded)
        monkeypatch.setattr(ops, 'BLOCK_BYTES', 2 * 2 * 3 * 4 * 3 * 3 * 16 * 4)  # 2 window rows
        banded = attn(x, residual=residual)
    rows = -(-size[0] // 3)
    assert bands == [6] * (rows // 2) + [3] * (rows % 2)
    assert (banded - expected).abs().max() < 1e-5


@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('with_bias,with_residual', [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize('grad', [False, True])
def test_batched_linear_matches_a_loop_of_plain_linears(batch, with_bias, with_residual, grad):
    """A weight per sample (the folded channel attention): oneDNN per sample at CPU inference,
    one baddbmm otherwise."""
    torch.manual_seed(0)
    x = torch.randn(batch, 30, 12, requires_grad=grad)
    weight = torch.randn(batch, 20, 12, requires_grad=grad)
    bias = torch.randn(batch, 20) if with_bias else None
    residual = torch.randn(batch, 30, 20) if with_residual else None
    with torch.set_grad_enabled(grad):
        out = ops.batched_linear(x, weight, bias, residual)
    for i in range(batch):
        expected = F.linear(x[i], weight[i], None if bias is None else bias[i])
        expected = expected if residual is None else residual[i] + expected
        assert torch.allclose(out[i], expected, atol=1e-5)
    assert out.shape == (batch, 30, 20) and out.requires_grad == grad


def _plain_split(x, parts, heads):
    B, N, _ = x.shape
    return x.view(B, N, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize('parts,used', [(3, (0, 1, 2)), (3, (0, 2)), (2, (1, ))])
def test_split_heads_are_the_plain_views_and_gather_the_same_gradients(parts, used):
    """q, k, v (or the channel attention's pair) as views of the projection; in training the
    gradient comes back in one tensor, parts without a gradient giving zeros."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, parts * 3 * 4, requires_grad=True)
    fast, expected = ops.split_heads(x, parts, 3), _plain_split(x, parts, 3)
    assert all(f._base is x and f.shape == (2, 3, 7, 4) for f in fast)
    assert all(torch.equal(f, e) for f, e in zip(fast, expected))
    assert fast[0].grad_fn.name() == '_SplitHeadsFunctionBackward'
    weights = [torch.randn(2, 3, 7, 4) for _ in range(parts)]
    grads = [torch.autograd.grad(sum((views[i] * weights[i]).sum() for i in used), x)[0]
             for views in (fast, expected)]
    assert torch.equal(grads[0], grads[1])
    assert grads[0].is_contiguous()


def test_split_heads_are_plain_views_without_gradients_traced_or_switched_off():
    x = torch.randn(1, 5, 24, requires_grad=True)
    with torch.no_grad():
        assert ops.split_heads(x, 3, 2)[0].grad_fn is None
    ops.set_fast_kernels(False)
    try:
        assert ops.split_heads(x, 3, 2)[0].grad_fn.name() == 'UnbindBackward0'
    finally:
        ops.set_fast_kernels(True)
    traced = torch.jit.trace(lambda t: ops.split_heads(t, 3, 2)[1] * 2, (x, ))
    assert '_SplitHeadsFunction' not in str(traced.graph)
    assert torch.equal(traced(x), _plain_split(x, 3, 2)[1] * 2)


def test_drop_negligible_grad_is_the_identity_whose_gradient_loses_only_negligible_entries():
    """Per matrix: entries below 2^-60 of its largest go, and subnormal ones; the rest stay."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.randn(2, 1, 3, 3, requires_grad=True)
    y = ops.drop_negligible_grad(x)
    assert torch.equal(y, x) and y.grad_fn.name() == '_NegligibleGradFunctionBackward'
    grad = torch.zeros(2, 1, 3, 3)
    grad[0, 0, 0] = torch.tensor([-1.0, 2.0 ** -61, -(2.0 ** -59)])  # largest 1: the middle goes
    grad[0, 0, 1, 0] = 1e-35  # far below 2^-60 of this matrix's largest
    grad[1, 0, 0] = torch.tensor([1e-30, 1e-40, -2e-38])  # 2^-60 of 1e-30 is subnormal itself
    grad[1, 0, 1, 0] = 1e-44
    expected = grad.clone()
    expected[0, 0, 0, 1] = expected[0, 0, 1, 0] = expected[1, 0, 0, 1] = expected[1, 0, 1, 0] = 0
    assert 0 < grad[1, 0, 0, 1] < tiny and expected[1, 0, 0, 2] == -2e-38  # normal: kept
    y.backward(grad)
    assert torch.equal(x.grad, expected)


def test_drop_negligible_grad_is_plain_without_gradients_traced_switched_off_or_off_the_cpu(
        monkeypatch):
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with torch.no_grad():
        assert ops.drop_negligible_grad(x) is x
    ops.set_fast_kernels(False)
    try:
        assert ops.drop_negligible_grad(x) is x
    finally:
        ops.set_fast_kernels(True)
    traced = torch.jit.trace(lambda t: ops.drop_negligible_grad(t) * 2, (x, ))
    assert '_NegligibleGradFunction' not in str(traced.graph)
    monkeypatch.setattr(ops, '_DROP_NEGLIGIBLE_GRADS', False)  # the benchmark's --subnormal-grads
    assert ops.drop_negligible_grad(x) is x
    monkeypatch.setattr(ops, '_DROP_NEGLIGIBLE_GRADS', True)
    monkeypatch.setattr(ops, '_device_type', lambda t: 'cuda')  # GPUs compute subnormals at speed
    assert ops.drop_negligible_grad(x) is x


@pytest.mark.parametrize('version,scale', [('v1', 3), ('v2', 6)])  # v2 scales by N^-0.5
def test_channel_attention_drops_the_subnormal_gradient_of_its_sharp_logits(monkeypatch, version,
                                                                             scale):
    """A sharp softmax (a map of many tokens, large activations) gives its logits a gradient with
    subnormal entries, which Intel CPUs multiply on a slow path: the fused channel attention
    drops them before the two products with the tokens' projections, and its gradients stay
    those of the plain path and of the undropped one."""
    from davit_mm.models.davit import ChannelAttention
    tiny = torch.finfo(torch.float32).tiny
    seen, original = [], ops._NegligibleGradFunction.backward

    def recorded(ctx, grad):
        seen.append((grad, original(ctx, grad)))
        return seen[-1][1]

    monkeypatch.setattr(ops._NegligibleGradFunction, 'backward', staticmethod(recorded))
    torch.manual_seed(0)
    attn = ChannelAttention(16, 2, version=version)
    x = torch.randn(2, 12, 10, 16) * scale

    def grads(fused: bool):
        attn.fused = fused
        inputs = [x.clone().requires_grad_()] + list(attn.parameters())
        return torch.autograd.grad(weighted_sum(attn(inputs[0])), inputs)

    fast = grads(True)
    (into, out), = seen
    assert into.shape == (2, 2, 8, 8)
    subnormal = (into != 0) & (into.abs() < tiny)
    assert subnormal.any() and not ((out != 0) & (out.abs() < tiny)).any()
    kept = into.abs() >= (into.abs().amax(dim=(-2, -1), keepdim=True) * 2.0 ** -60).clamp(min=tiny)
    assert torch.equal(out[kept], into[kept]) and not out[~kept].any()
    plain = grads(False)
    monkeypatch.setattr(ops, '_DROP_NEGLIGIBLE_GRADS', False)
    undropped = grads(True)
    assert len(seen) == 1  # neither of the others dropped anything
    for f, p, u in zip(fast, plain, undropped):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5 * p.abs().max().item())
        assert (f - u).abs().max() <= 2.0 ** -40 * u.abs().max()


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records each call of F.scaled_dot_product_attention."""
    calls, original = [], F.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', recorded)
    return calls


def _attention_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grads = torch.autograd.grad(weighted_sum(out), (q, k, v))
    return [out.detach().float()] + [g.float() for g in grads]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('autocast', [False, True])
@pytest.mark.parametrize('native', [False, True])
def test_cpu_attention_takes_the_plain_steps_in_half_precision_onednn_computes(
        sdpa_calls, monkeypatch, dtype, autocast, native):
    """CPU attention in half precision (a bf16/fp16 model, or CPU autocast) takes the three plain
    steps where oneDNN computes that dtype (``native``: PyTorch's CPU flash attention is slow in
    backward there), and F.scaled_dot_product_attention where it does not (AVX2 kernels: the
    plain steps' half-precision matmuls are slow); full precision takes it always. Outputs and
    input gradients are the float32 SDPA's, to the rounding of the dtype."""
    monkeypatch.setattr(ops, '_NATIVE_HALF_DTYPES', (torch.bfloat16, torch.float16) if native else ())
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 3, 49, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    expected = _attention_and_grads(F.scaled_dot_product_attention,
                                    *(t.detach().float().requires_grad_() for t in (q, k, v)))
    sdpa_calls.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        results = _attention_and_grads(ops.attention, q, k, v)
    half = dtype != torch.float32 or autocast
    assert sdpa_calls == ([] if half and native else [dtype])
    tolerance = 3e-2 if half else 1e-5
    for a, b in zip(results, expected):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= tolerance * max(1., b.abs().max().item())


def test_attention_in_reduced_precision_is_sdpa_when_traced_or_switched_off(sdpa_calls):
    q = k = v = torch.randn(2, 3, 49, 32, dtype=torch.bfloat16)
    ops.set_fast_kernels(False)
    try:
        ops.attention(q, k, v)
    finally:
        ops.set_fast_kernels(True)
    assert sdpa_calls == [torch.bfloat16]
    # check_trace=False: the trace check would compare the traced SDPA with eager CPU bf16 (the
    # three plain steps), which differ by bf16 rounding, and warn.
    graph = str(torch.jit.trace(ops.attention, (q, k, v), check_trace=False).graph)
    assert 'aten::scaled_dot_product_attention' in graph and 'aten::softmax' not in graph


def test_is_exporting_reads_the_export_flag_not_dynamos_answer(monkeypatch):
    """Under torch.compile, dynamo in torch 2.11 answers torch.compiler.is_exporting() with True
    (then compiled channel attention would not fold its projection); torch's own export flag is
    right on every version that has it, and the public function is the fallback without it."""
    monkeypatch.setattr(torch.compiler, 'is_exporting', lambda: True)  # torch 2.11's dynamo
    assert not ops.is_exporting()
    monkeypatch.setattr(torch.compiler, '_is_exporting_flag', True)  # as torch.export sets it
    assert ops.is_exporting()
    monkeypatch.delattr(torch.compiler, '_is_exporting_flag')
    monkeypatch.setattr(torch.compiler, 'is_exporting', lambda: False)
    assert not ops.is_exporting()


def test_onednn_linear_refuses_gelu_with_a_residual():
    with pytest.raises(ValueError, match='cannot be combined'):
        ops.linear(torch.randn(2, 4), nn.Linear(4, 4), gelu=True, residual=torch.randn(2, 4))


@pytest.mark.parametrize('mode', ['eval', 'train', 'train_with_cp'])
def test_backbone_traces_without_graph_breaks(tiny_arch, mode):
    model = DaViT(tiny_arch, with_cp=mode == 'train_with_cp')
    model.train(mode != 'eval')
    explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 45, 67))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize('capability', ['AVX512', 'AVX2'])
def test_conv_weight_gradients_have_the_weights_strides(tiny_arch, monkeypatch, capability):
    """DDP's gradient buckets need matching strides, or it copies every gradient (and warns)."""
    monkeypatch.setattr(ops, '_CPU_CAPABILITY', capability)
    model = DaViT(tiny_arch, drop_path_rate=0.).train()
    sum(o.sum() for o in model(torch.randn(2, 3, 40, 40))).backward()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 + 2 * 2 * sum(tiny_arch['depths'])
    for conv in convs:
        assert conv.weight.grad.stride() == conv.weight.stride()




_LINEARS_UNDER_CAPABILITY = """
import json, sys
import torch
from torch.profiler import profile
sys.path.insert(0, sys.argv[1])
from davit_mm import ops
from davit_mm.models import DaViT
torch.manual_seed(0)
model = DaViT(json.loads(sys.argv[2]), drop_path_rate=0.)
x = torch.randn(1, 3, 64, 96)
report = {'capability': torch.backends.cpu.get_cpu_capability()}
for mode in ('eval', 'train'):
    model.train(mode == 'train')
    with torch.set_grad_enabled(mode == 'train'):
        with profile() as prof:
            outs = model(x)
        with ops.plain_kernels():
            expected = model(x)
    names = {event.key for event in prof.key_averages()}
    report[mode] = dict(onednn_linear='mkldnn::_linear_pointwise' in names,
                        diff=max((a - b).abs().max().item() for a, b in zip(outs, expected)))
report['pack_mlp_backward_weights'] = ops._PACK_MLP_BACKWARD_WEIGHTS
report['vendor'] = ops._cpu_vendor()
print(json.dumps(report))
"""


@onednn
@pytest.mark.parametrize('capability', ['avx2', 'default'])
def test_cpu_inference_linears_take_pytorchs_matmul_with_avx2_kernels(tiny_arch, capability):
    """With AVX2 kernels (here ``ATEN_CPU_CAPABILITY=avx2``, as on an AVX2 CPU) the backbone's
    linears run through PyTorch's matmul at inference, not oneDNN's linear; with AVX-512 kernels
    through oneDNN's; in training through oneDNN's, whose MLP backward then gets packed weights
    with AVX2 kernels only, except on Intel CPUs (PyTorch's matmul). The outputs are the plain
    kernels' either way."""
    env = dict(os.environ)
    env.pop('ATEN_CPU_CAPABILITY', None)
    if capability == 'avx2':
        env['ATEN_CPU_CAPABILITY'] = 'avx2'
    result = subprocess.run([sys.executable, '-c', _LINEARS_UNDER_CAPABILITY, REPO,
                             json.dumps(tiny_arch)], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    if capability == 'default' and report['capability'] == 'AVX2':
        pytest.skip('this CPU runs AVX2 kernels: the avx2 case covers it')
    avx2 = report['capability'] == 'AVX2'
    assert avx2 == (capability == 'avx2')
    assert report['eval']['onednn_linear'] is not avx2, report
    assert report['train']['onednn_linear'] is (report['vendor'] != 'GenuineIntel'), report
    assert report['pack_mlp_backward_weights'] is avx2, report
    for mode in ('eval', 'train'):
        assert report[mode]['diff'] < 1e-4, (mode, report)


@pytest.mark.parametrize('capability,grad,expected', [('AVX2', True, 'matmul'),
                                                      ('AVX2', False, 'conv'),
                                                      ('AVX512', True, 'conv')])
def test_cpu_downsample_trains_as_a_matmul_with_avx2_kernels(monkeypatch, capability, grad,
                                                             expected):
    """With AVX2 kernels a training 2x2/s2 downsample runs as a reshape and a matmul (faster
    there than oneDNN's convolution backward); at inference, and with AVX-512 kernels, as the
    convolution. Outputs and gradients are the convolution's."""
    monkeypatch.setattr(ops, '_CPU_CAPABILITY', capability)
    calls = []
    original = ops._conv_as_matmul
    monkeypatch.setattr(ops, '_conv_as_matmul', lambda x, conv: calls.append(1) or original(x, conv))
    torch.manual_seed(0)
    down = davit_module.Downsample(8, 16)
    base = torch.randn(2, 10, 14, 8)
    results = []
    for run in ('ops', 'plain'):
        down.zero_grad()
        x = base.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            if run == 'ops':
                out = down(x)
            else:
                out = down.conv(down.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        results.append([out.detach()])
        if grad:
            weighted_sum(out).backward()
            results[-1] += [x.grad, down.conv.weight.grad.clone(), down.conv.bias.grad.clone()]
    assert calls == ([1] if expected == 'matmul' else [])
    for a, b in zip(*results):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- the CUDA choices
def _depthwise_on_cpu(calls):
    """A CPU stand-in for aten::_conv_depthwise2d (CUDA-only) that records its calls."""
    def kernel(x, weight, kernel_size, bias, stride, padding, dilation):
        calls.append((tuple(x.shape), x.is_contiguous()))
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])
    return kernel


@pytest.fixture
def mocked_cuda(monkeypatch):
    """ops sees every tensor as a CUDA tensor; the depth-wise kernel and every nn.Conv2d forward
    (the call that would reach cuDNN) are recorded."""
    depthwise_calls, conv_calls = [], []
    monkeypatch.setattr(ops, '_device_type', lambda x: 'cuda')
    monkeypatch.setattr(ops, '_CUDA_DEPTHWISE', _depthwise_on_cpu(depthwise_calls))
    monkeypatch.setattr(ops, '_triton_depthwise', lambda: None)  # a CUDA torch without Triton
    original = nn.Conv2d._conv_forward

    def recorded(self, x, weight, bias):
        conv_calls.append(self)
        return original(self, x, weight, bias)

    monkeypatch.setattr(nn.Conv2d, '_conv_forward', recorded)
    return depthwise_calls, conv_calls


def test_on_cuda_pytorchs_depthwise_kernel_trains_without_cudnn(tiny_arch, mocked_cuda, monkeypatch):
    """The backward of aten::_conv_depthwise2d goes through convolution_backward, which picks
    cuDNN (a plan per new input shape) for fp16 maps: davit_mm calls it with cuDNN off."""
    cudnn_during_backward = []
    original = ops._CONVOLUTION_BACKWARD

    def recorded(*args):
        cudnn_during_backward.append(torch.backends.cudnn.enabled)
        return original(*args)

    monkeypatch.setattr(ops, '_CONVOLUTION_BACKWARD', recorded)
    depthwise_calls, conv_calls = mocked_cuda
    model = DaViT(tiny_arch, drop_path_rate=0.).train()
    _outputs_and_grads(model, torch.randn(2, 3, 45, 67))
    encodings = 2 * 2 * sum(tiny_arch['depths'])
    assert len(depthwise_calls) == encodings and cudnn_during_backward == [False] * encodings
    assert torch.backends.cudnn.enabled  # restored


def test_on_cuda_window_attention_leaves_cudnn_attention_out(tiny_arch, mocked_cuda, monkeypatch):
    """cuDNN's attention builds a plan per shape, and the number of windows changes with every
    input size: on CUDA, scaled_dot_product_attention runs with flash, memory-efficient and math
    attention allowed, cuDNN's not."""
    if ops._SDPA_WITHOUT_CUDNN is None:
        pytest.skip('this torch has no cuDNN attention or no torch.nn.attention.sdpa_kernel')
    allowed = []
    original = F.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        backends = torch.backends.cuda
        allowed.append((backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(),
                        backends.mem_efficient_sdp_enabled(), backends.math_sdp_enabled()))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', recorded)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    model = DaViT(tiny_arch, drop_path_rate=0.).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 45, 67))
    assert allowed and set(allowed) == {(False, True, True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before  # restored


def _outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum(weighted_sum(o) for o in outs).backward()
    return [o.detach() for o in outs] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize('overlapped', [False, True])
def test_on_cuda_no_convolution_reaches_cudnn_and_the_results_are_the_plain_ones(
        tiny_arch, mocked_cuda, overlapped):
    """On CUDA without Triton the depth-wise convs take PyTorch's own kernel and the stem and
    downsamples run as matrix products: nn.Conv2d (cuDNN) is never called, and outputs and gradients are those of
    the plain convolutions."""
    depthwise_calls, conv_calls = mocked_cuda
    tiny_arch['overlapped_downsample'] = overlapped
    model = DaViT(tiny_arch, drop_path_rate=0.).train()
    x = torch.randn(2, 3, 45, 67)  # odd sizes: stem, downsample and window padding all active
    fast = _outputs_and_grads(model, x)
    assert conv_calls == []
    assert len(depthwise_calls) == 2 * 2 * sum(tiny_arch['depths'])  # two per block
    assert all(contiguous for _, contiguous in depthwise_calls)
    ops.set_fast_kernels(False)
    try:
        plain_results = _outputs_and_grads(model, x)
    finally:
        ops.set_fast_kernels(True)
    assert len(conv_calls) == 1 + 3 + len(depthwise_calls)  # now every conv is nn.Conv2d's
    for a, b in zip(fast, plain_results):
        assert a.shape == b.shape
        # fp32 rounding of a different summation order, relative to each tensor's scale
        assert (a - b).abs().max() <= 1e-5 * max(1., b.abs().max().item())


def test_on_cuda_under_autocast_the_convolutions_run_in_the_autocast_dtype(mocked_cuda):
    """As autocast would run nn.Conv2d: the depth-wise kernel and the conv matmuls get bf16
    operands (fp16 on a real GPU; bf16 is what CPU autocast accepts)."""
    depthwise_calls, _ = mocked_cuda
    outputs, expected = [], []
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    dense = nn.Conv2d(8, 16, 2, stride=2)
    x = torch.randn(1, 8, 6, 6)
    real_autocast_dtype = ops._autocast_dtype
    with torch.autocast('cpu', dtype=torch.bfloat16):
        # ops asks about 'cuda' autocast; answer with the CPU autocast that is active here.
        ops_autocast = lambda device_type: real_autocast_dtype('cpu')  # noqa: E731
        original = ops._autocast_dtype
        ops._autocast_dtype = ops_autocast
        try:
            for conv in (dw, dense):
                outputs.append(ops.conv2d(conv, x))
                expected.append(conv(x))  # nn.Conv2d under the same autocast
        finally:
            ops._autocast_dtype = original
    assert [out.dtype for out in outputs] == [torch.bfloat16, torch.bfloat16]
    assert len(depthwise_calls) == 1
    for out, reference in zip(outputs, expected):
        assert out.shape == reference.shape
        # bf16 operands (8 bits of mantissa), summed in another order
        assert (out.float() - reference.float()).abs().max() <= 2e-2 * reference.abs().max()


def test_on_cuda_the_mlp_trains_with_the_portable_lean_function(mocked_cuda, monkeypatch):
    """CUDA inputs take the MLP's lean training path with plain matmuls, not oneDNN's."""
    mlp = davit_module.Mlp(16, 64)
    x = torch.randn(2, 5, 7, 16, requires_grad=True)
    calls = []
    original = ops._LeanMlpFunction.forward

    def recorded(ctx, *args):
        calls.append(args[-1])
        return original(ctx, *args)

    monkeypatch.setattr(ops._LeanMlpFunction, 'forward', staticmethod(recorded))
    out = mlp(x)
    assert calls == [False]  # onednn=False
    assert torch.allclose(out, plain_mlp(mlp, x), atol=1e-5)


def test_the_switch_turns_every_kernel_off(tiny_arch, mocked_cuda):
    _, conv_calls = mocked_cuda
    model = DaViT(tiny_arch).eval()
    ops.set_fast_kernels(False)
    try:
        assert not ops.fast_kernels_enabled()
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        ops.set_fast_kernels(True)
    assert len(conv_calls) == 1 + 3 + 2 * 2 * sum(tiny_arch['depths'])


def test_set_fast_kernels_refuses_a_non_bool():
    with pytest.raises(TypeError, match='enabled must be a bool'):
        ops.set_fast_kernels('no')


# ------------------------------------------- the CUDA depth-wise kernels, in Triton's interpreter
needs_triton = pytest.mark.skipif((ops._triton_version() or (0, 0)) < ops._TRITON_MIN,
                                  reason='Triton >= 3.0 is not installed (requirements/tests.txt)')


def _ignore_numpy_scalar_deprecation() -> None:
    warnings.filterwarnings('ignore', message=_NUMPY_SCALAR_DEPRECATION,
                            category=DeprecationWarning)


def _interpreter_problem() -> Optional[str]:
    """Why this Triton's interpreter cannot run a loop with a runtime bound (the weight-gradient
    kernel's), or None (see _NUMPY_SCALAR_DEPRECATION)."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = tl.zeros((2, ), dtype=tl.float32)
        for _ in range(n):
            total += 1.0
        tl.store(out_ptr + tl.arange(0, 2), total)

    out = torch.zeros(2)
    try:  # numpy's deprecation warning, where it comes, is ignored (pytestmark)
        count[(1, )](out, 3)
    except Exception as error:  # the interpreter wraps what numpy raised
        return repr(error)
    return None if out.tolist() == [3., 3.] else f'counted {out.tolist()} for [3, 3]'


@pytest.fixture(scope='module')
def interpreted_kernels():
    """davit_mm's Triton kernels as Triton's interpreter runs them, on CPU tensors (conftest turns
    it on; the GPU compiles the same source: test_the_triton_kernels_compile_for_sm90). Skipped
    where the installed Triton's interpreter cannot run them (a CUDA torch brings its own Triton):
    the compile test still runs, and on a GPU davit_mm checks the compiled kernels against
    PyTorch's before it uses them."""
    assert os.environ.get('TRITON_INTERPRET') == '1'
    problem = _interpreter_problem()
    if problem is not None:
        import numpy
        import triton
        message = (f"Triton {triton.__version__}'s interpreter cannot run a loop with a runtime "
                   f'bound beside numpy {numpy.__version__}: {problem}')
        # Triton 3.9 runs them (what requirements/tests.txt installs beside a CPU torch today).
        if ops._triton_version() >= (3, 9):
            pytest.fail(message)
        pytest.skip(message)
    kernels = ops._build_triton_depthwise()
    assert kernels is not None
    return kernels


@pytest.fixture
def triton_cuda(mocked_cuda, interpreted_kernels, monkeypatch):
    """mocked_cuda with Triton present, on an H100: each Triton convolution launch is recorded as
    ``(add_input, writes a cast copy of the input)``."""
    monkeypatch.setattr(ops, '_triton_depthwise', lambda: interpreted_kernels)
    monkeypatch.setattr(ops, '_gpu_capability', lambda device: (9, 0))
    monkeypatch.setattr(ops, '_TRITON_READY', {})
    monkeypatch.setattr(ops, '_triton_self_check', lambda device, compute: True)  # tested below
    launches = []
    original = ops._launch_depthwise

    def recorded(kernels, x, weight, bias, add_input, out_dtype=None, cast=None):
        launches.append((add_input, cast is not None))
        return original(kernels, x, weight, bias, add_input, out_dtype, cast)

    monkeypatch.setattr(ops, '_launch_depthwise', recorded)
    return mocked_cuda + (launches,)


def _channels_last_map(*shape, **kwargs):
    """A ``(B, C, H, W)`` view of a ``(B, H, W, C)`` tensor, as DaViT hands its maps to convs."""
    B, C, H, W = shape
    return torch.randn(B, H, W, C, **kwargs).permute(0, 3, 1, 2)


def _conv_results(fn, x, conv):
    """``fn(x)`` and the gradients of a weighted sum of it for x, weight and bias."""
    x = x.detach().requires_grad_()
    conv.zero_grad(set_to_none=True)
    out = fn(x)
    weighted_sum(out.float()).backward()
    return [out.detach(), x.grad] + [p.grad for p in conv.parameters()]


def _triton_and_plain(kernels, conv, x, add_input=True):
    """:func:`_conv_results` of the Triton function and of the plain ``(x +) conv(x)``."""
    fast = _conv_results(lambda t: ops._TritonDepthwiseFunction.apply(
        t, conv.weight, conv.bias, add_input, kernels), x, conv)
    return fast, _conv_results(lambda t: (t if add_input else 0) + conv(t), x, conv)


@needs_triton
@pytest.mark.parametrize('kernel,channels,size,bias', [
    (3, 40, (9, 13), True), (3, 16, (5, 7), False), (5, 70, (6, 3), True)])
@pytest.mark.parametrize('add_input', [True, False])
def test_the_triton_depthwise_kernels_are_the_convolution(interpreted_kernels, monkeypatch, kernel,
                                                          channels, size, bias, add_input):
    """Outputs and the gradients of input, weight and bias equal F.conv2d's (plus the input when
    it is added), with channel tiles partly filled, maps narrower than the kernel, and fewer
    weight-gradient programs than pixel tiles (each sums several)."""
    monkeypatch.setattr(ops, '_WEIGHT_GRAD_PROGRAMS', 2)
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias)
    x = _channels_last_map(3, channels, *size)
    fast, plain_results = _triton_and_plain(interpreted_kernels, conv, x, add_input)
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(fast, plain_results):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max() <= 1e-5 * max(1., b.abs().max().item())


def test_the_triton_function_launches_nothing_for_an_empty_batch():
    """A batch of 0 maps gives an empty output and input gradient and zero weight and bias
    gradients without a kernel launch (a grid of 0 programs)."""
    from types import SimpleNamespace

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f'launched with grid {grid}')

    kernels = SimpleNamespace(conv=NoLaunch(), weight_grad=NoLaunch(), cdiv=lambda a, b: -(-a // b),
                              next_power_of_2=lambda n: 1 << (n - 1).bit_length())
    conv = nn.Conv2d(40, 40, 3, padding=1, groups=40)
    x = _channels_last_map(0, 40, 9, 13).requires_grad_()
    out = ops._TritonDepthwiseFunction.apply(x, conv.weight, conv.bias, True, kernels)
    out.sum().backward()
    assert out.shape == x.grad.shape == (0, 40, 9, 13)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.grad.shape == conv.weight.shape and not conv.weight.grad.any()
    assert conv.bias.grad.shape == conv.bias.shape and not conv.bias.grad.any()


@needs_triton
def test_the_triton_kernels_with_64_bit_offsets_are_the_convolution(interpreted_kernels,
                                                                    monkeypatch):
    """The offsets maps of 2**31 elements or more need (forced here on a small map)."""
    monkeypatch.setattr(ops, '_WIDE_FROM', 0)
    conv = nn.Conv2d(40, 40, 3, padding=1, groups=40)
    x = _channels_last_map(2, 40, 9, 13)
    fast, plain_results = _triton_and_plain(interpreted_kernels, conv, x)
    for a, b in zip(fast, plain_results):
        assert (a - b).abs().max() <= 1e-5 * max(1., b.abs().max().item())


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_the_triton_kernels_in_a_half_precision_model_are_the_convolution(interpreted_kernels,
                                                                          dtype):
    """A model converted to fp16/bf16 (no autocast): outputs and gradients in that dtype, equal
    to the plain convolution's up to a few roundings in it."""
    conv = nn.Conv2d(40, 40, 3, padding=1, groups=40).to(dtype)
    x = _channels_last_map(2, 40, 9, 13).to(dtype)
    fast, plain_results = _triton_and_plain(interpreted_kernels, conv, x)
    eps = torch.finfo(dtype).eps
    for a, b in zip(fast, plain_results):
        assert a.dtype == b.dtype == dtype
        assert (a.float() - b.float()).abs().max() <= 4 * eps * max(1., b.abs().max().item())


def _saved_maps(fn, x):
    """The dtype of every tensor of x's shape that autograd saves while ``fn(x)`` runs."""
    saved = []

    def pack(t):
        if t.shape == x.shape:
            saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


@needs_triton
def test_under_autocast_the_triton_position_encoding_rounds_and_saves_as_autocast(
        triton_cuda, monkeypatch):
    """Under autocast the fused ``x + conv(x)`` computes the conv on the input rounded to the
    autocast dtype (bf16 here; fp16 on a GPU) as autocast's conv does, returns fp32 like the
    residual addition, and saves one bf16 copy of the map for backward (not the fp32 map)."""
    *_, launches = triton_cuda
    real_autocast_dtype = ops._autocast_dtype
    monkeypatch.setattr(ops, '_autocast_dtype', lambda device_type: real_autocast_dtype('cpu'))
    conv = nn.Conv2d(40, 40, 3, padding=1, groups=40)
    x = _channels_last_map(2, 40, 9, 13)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fast = _conv_results(lambda t: ops.conv2d(conv, t, residual=t), x, conv)
        plain_results = _conv_results(lambda t: t + conv(t), x, conv)
        saved = _saved_maps(lambda t: ops.conv2d(conv, t, residual=t),
                            x.detach().requires_grad_())
        with torch.no_grad():
            inference = ops.conv2d(conv, x, residual=x)
    # forward (writing the cast copy), input gradient, forward again for _saved_maps, and
    # inference (no copy: nothing is saved without gradients)
    assert launches == [(True, True), (True, False), (True, True), (True, False)]
    assert saved == [torch.bfloat16]
    assert torch.equal(inference, fast[0])
    assert fast[0].dtype == plain_results[0].dtype == torch.float32
    for a, b in zip(fast, plain_results):
        assert a.shape == b.shape and a.dtype == b.dtype
        # sums of bf16 products in another order: a few bf16 roundings of each tensor's scale
        assert (a.float() - b.float()).abs().max() <= 2e-2 * max(1., b.abs().max().item())


@needs_triton
def test_a_frozen_triton_position_encoding_saves_no_map(triton_cuda):
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16).requires_grad_(False)
    x = _channels_last_map(2, 16, 5, 7, requires_grad=True)
    assert _saved_maps(lambda t: ops.conv2d(conv, t, residual=t), x) == []
    fast = _conv_results(lambda t: ops.conv2d(conv, t, residual=t), x, conv)
    expected = _conv_results(lambda t: t + conv(t), x, conv)
    assert torch.allclose(fast[1], expected[1], atol=1e-5)  # the input's gradient


@needs_triton
@pytest.mark.parametrize('with_cp', [False, True])
def test_on_cuda_with_triton_the_position_encodings_take_the_triton_kernels(tiny_arch,
                                                                             triton_cuda, with_cp):
    """With Triton, every position encoding (x + depth-wise conv, fused) runs the Triton kernels
    forward and backward (with gradient checkpointing, forward again in the recomputation); no
    convolution reaches cuDNN or PyTorch's depth-wise kernel, and outputs and gradients are the
    plain ones."""
    depthwise_calls, conv_calls, launches = triton_cuda
    model = DaViT(tiny_arch, drop_path_rate=0., with_cp=with_cp).train()
    x = torch.randn(2, 3, 45, 67)
    fast = _outputs_and_grads(model, x)
    encodings = 2 * 2 * sum(tiny_arch['depths'])
    assert conv_calls == [] and depthwise_calls == []
    # forward(s) and one input-gradient launch each (fp32: no cast copy)
    assert launches == [(True, False)] * ((3 if with_cp else 2) * encodings)
    ops.set_fast_kernels(False)
    try:
        plain_results = _outputs_and_grads(model, x)
    finally:
        ops.set_fast_kernels(True)
    for a, b in zip(fast, plain_results):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * max(1., b.abs().max().item())


@needs_triton
def test_the_first_call_under_gradient_checkpointing_runs_the_real_self_check(tiny_arch, triton_cuda,
                                                                              monkeypatch):
    """The self-check runs inside the first forward that needs it; under with_cp that forward is
    inside torch.utils.checkpoint, whose saved-tensor hooks captured the check's own graph: two
    false warnings, PyTorch's kernel for good, then a CheckpointError. In its own thread the
    check sees none of the caller's state."""
    monkeypatch.setattr(ops, '_triton_self_check', _REAL_TRITON_SELF_CHECK)
    depthwise_calls, conv_calls, launches = triton_cuda
    model = DaViT(tiny_arch, drop_path_rate=0., with_cp=True).train()
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        _ignore_numpy_scalar_deprecation()
        _outputs_and_grads(model, torch.randn(1, 3, 32, 32))
    assert set(ops._TRITON_READY.values()) == {True}
    assert depthwise_calls == [] and launches


@needs_triton
@pytest.mark.parametrize('capability,autocast,kernel', [
    ((6, 0), None, 'aten'),                 # Pascal: Triton does not build for it
    ((7, 5), torch.bfloat16, 'aten'),       # Turing computes no bf16
    ((7, 5), None, 'triton'),               # Turing in fp32
    ((8, 0), torch.bfloat16, 'triton'),     # Ampere in bf16
])
def test_gpus_triton_does_not_build_for_take_pytorchs_kernel(triton_cuda, monkeypatch, capability,
                                                             autocast, kernel):
    depthwise_calls, _, launches = triton_cuda
    monkeypatch.setattr(ops, '_gpu_capability', lambda device: capability)
    real_autocast_dtype = ops._autocast_dtype
    monkeypatch.setattr(ops, '_autocast_dtype', lambda device_type: real_autocast_dtype('cpu'))
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = _channels_last_map(2, 8, 6, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast is not None):
        ops.conv2d(conv, x, residual=x)
    assert (len(launches), len(depthwise_calls)) == ((1, 0) if kernel == 'triton' else (0, 1))


@needs_triton
@pytest.mark.parametrize('compute,mode', [(torch.float32, contextlib.nullcontext),
                                          (torch.bfloat16, contextlib.nullcontext),
                                          (torch.float32, torch.no_grad),
                                          (torch.float32, torch.inference_mode)])
def test_the_triton_self_check_passes_with_the_kernels(interpreted_kernels, monkeypatch, compute,
                                                       mode):
    """In each compute dtype, and wherever the first call comes from: training, evaluation
    under no_grad, inference mode."""
    monkeypatch.setattr(ops, '_triton_depthwise', lambda: interpreted_kernels)
    with warnings.catch_warnings(), mode():
        warnings.simplefilter('error')
        _ignore_numpy_scalar_deprecation()
        assert ops._triton_self_check(torch.device('cpu'), compute) is True


def _launch_then(change):
    original = ops._launch_depthwise

    def launch(*args, **kwargs):
        return change(original(*args, **kwargs))
    return launch


def _no_driver(out):
    raise RuntimeError('libcuda.so cannot found!')  # what Triton says in some containers


@needs_triton
@pytest.mark.parametrize('change,message', [
    (_no_driver, 'failed: RuntimeError: libcuda.so cannot found!'),
    (lambda out: out + 1e-2, 'computed wrong output, input grad'),
])
def test_triton_kernels_that_fail_or_compute_wrong_are_reported_and_not_used(
        interpreted_kernels, monkeypatch, change, message):
    """The self-check turns the kernels down with a warning naming the problem: a Triton that
    cannot build or run them, or kernels whose numbers are off."""
    monkeypatch.setattr(ops, '_triton_depthwise', lambda: interpreted_kernels)
    monkeypatch.setattr(ops, '_launch_depthwise', _launch_then(change))
    with pytest.warns(RuntimeWarning, match=message) as record:
        assert ops._triton_self_check(torch.device('cpu'), torch.float32) is False
    warned = [str(w.message) for w in record if w.category is RuntimeWarning]
    assert len(warned) == 1 and "PyTorch's depth-wise kernel instead" in warned[0]


@needs_triton
def test_the_self_check_covers_autocasts_float32_map_with_half_precision_weights(interpreted_kernels,
                                                                                monkeypatch):
    """Under autocast the kernels take a float32 map and bf16/fp16 weights and write the rounded
    map for the weight gradient (the cast copy): a fault only there is caught too."""
    monkeypatch.setattr(ops, '_triton_depthwise', lambda: interpreted_kernels)
    original = ops._launch_depthwise

    def wrong_with_a_cast_copy(*args, **kwargs):
        out = original(*args, **kwargs)
        return out + 100 if kwargs.get("cast") is not None else out

    monkeypatch.setattr(ops, '_launch_depthwise', wrong_with_a_cast_copy)
    with pytest.warns(RuntimeWarning, match=r'computed wrong output \(a torch.float32 map, '
                                            r'torch.bfloat16 weights\)'):
        assert ops._triton_self_check(torch.device('cpu'), torch.bfloat16) is False


@needs_triton
def test_the_self_check_runs_once_per_gpu_and_dtype_and_a_failed_one_keeps_pytorchs_kernel(
        triton_cuda, monkeypatch):
    depthwise_calls, _, launches = triton_cuda
    checks = []
    monkeypatch.setattr(ops, '_triton_self_check',
                        lambda device, compute: checks.append(compute) or False)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = _channels_last_map(2, 8, 6, 6)
    for _ in range(2):
        ops.conv2d(conv, x, residual=x)
    ops.conv2d(conv.double(), x.double(), residual=x.double())  # fp64: not a Triton dtype
    assert checks == [torch.float32]
    assert launches == [] and len(depthwise_calls) == 3


@needs_triton
@pytest.mark.parametrize('shape,stride,memory_format', [
    ((2, 8, 6, 6), 2, torch.channels_last),      # stride 2
    ((2, 8, 6, 6), 1, torch.contiguous_format),  # an NCHW map
])
def test_depthwise_convs_the_triton_kernels_do_not_cover_take_pytorchs_kernel(
        triton_cuda, shape, stride, memory_format):
    depthwise_calls, conv_calls, launches = triton_cuda
    conv = nn.Conv2d(8, 8, 3, stride=stride, padding=1, groups=8)
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    assert torch.allclose(ops.conv2d(conv, x), conv(x), atol=1e-6)
    assert launches == [] and len(depthwise_calls) == 1


# Compiles the kernels as a GPU would (the interpreter, on here, would refuse).
_COMPILE_FOR_SM90 = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
from davit_mm import ops
kernels = ops._build_triton_depthwise()
# A new input size compiles nothing: the launcher specializes on no size argument but the width
# (C, one of a few per model).
for fn in (kernels.conv, kernels.weight_grad):
    sizes = {p.name for p in fn.params if not p.is_constexpr and not p.name.endswith('_ptr')}
    assert sizes - {'C'} == set(fn.do_not_specialize), (fn, sizes, fn.do_not_specialize)
# fp32; an fp32 model under fp16 autocast; bf16; fp32 with 64-bit offsets
for x, compute, wide in (('fp32', 'fp32', False), ('fp32', 'fp16', False),
                         ('bf16', 'bf16', False), ('fp32', 'fp32', True)):
    tile = dict(K=3, WIDE=wide, BLOCK_P=ops._TILE_PIXELS, BLOCK_C=ops._TILE_CHANNELS)
    out = 'fp32' if x == 'fp32' else compute
    for fn, pointers, constexprs in (
            (kernels.conv, dict(x_ptr=x, w_ptr=compute, b_ptr=compute, out_ptr=out,
                                cast_ptr=compute),
             dict(tile, HAS_BIAS=True, ADD_INPUT=True, STORE_CAST=x != compute)),
            (kernels.weight_grad, dict(g_ptr=out, x_ptr=compute, part_ptr='fp32'),
             dict(tile, TAPS=16))):
        signature = {name: '*' + pointers[name] if name in pointers else
                     'constexpr' if name in constexprs else 'i32' for name in fn.arg_names}
        # What Triton's launcher specializes on for DaViT: 16-byte aligned tensors, widths
        # divisible by 16 (the sizes are do_not_specialize).
        attrs = {(i,): [['tt.divisibility', 16]] for i, name in enumerate(fn.arg_names)
                 if name in pointers or name == 'C'}
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget('cuda', 90, 32),
                                  options=dict(num_warps=ops._TILE_WARPS))
        assert '.target sm_90' in compiled.asm['ptx'] and compiled.asm['cubin'], fn
        print(fn.__name__, x, compute, len(compiled.asm['cubin']))
"""


@needs_triton
def test_the_triton_kernels_compile_for_sm90():
    """Triton's real compiler (and its ptxas, offline) accepts both kernels for an H100 (sm_90)
    in fp32, under fp16 autocast of an fp32 model, in bf16 and with 64-bit offsets: what the
    interpreter does not check (types, layouts, the registers a tile needs). And no size but
    the width is specialized on, so a new input size compiles nothing."""
    result = subprocess.run([sys.executable, '-c', _COMPILE_FOR_SM90, REPO], capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET='0'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 8


@pytest.mark.parametrize('kernel,stride,padding,size', [(2, 2, 0, (6, 8)), (7, 4, 3, (13, 17)),
                                                        (3, 2, 1, (7, 9)), (2, 2, 0, (7, 9))])
def test_conv_as_matmul_is_the_convolution(kernel, stride, padding, size):
    conv = nn.Conv2d(5, 12, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 5, *size)
    assert torch.allclose(ops._conv_as_matmul(x, conv), conv(x), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(ops._ONEDNN_CONV is None, reason='this torch has no oneDNN fused convolution')
@pytest.mark.parametrize('channels_last', [True, False])
def test_conv_with_residual_at_inference_is_the_plain_conv_plus_the_residual(channels_last,
                                                                            monkeypatch):
    """oneDNN's fused convolution + add serves channels-last maps, and equals the plain ops."""
    fused_calls = []
    original = ops._ONEDNN_CONV

    def recorded(*args):
        fused_calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(ops, '_ONEDNN_CONV', recorded)
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16).to(memory_format=torch.channels_last)
    x = torch.randn(2, 9, 11, 16).permute(0, 3, 1, 2)  # a channels-last (B, C, H, W) view
    if not channels_last:
        x = x.contiguous()  # not served by oneDNN's fused kernel: the plain ops run
    with torch.no_grad():
        out = ops.conv2d(conv, x, residual=x)
        assert len(fused_calls) == (1 if channels_last else 0)
        expected = F.conv2d(x.contiguous(), conv.weight, conv.bias, padding=1, groups=16) + x
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 1e-5
