"""Device-specific kernels behind DaViT's linear, attention and convolution layers, with one
switch.

The model (:mod:`davit_mm.models.davit`) calls :func:`linear`, :func:`mlp`, :func:`attention`,
:func:`conv2d`, :func:`batched_linear`, :func:`split_heads` and :func:`add_dropped_path` where it
would call ``F.linear``, ``fc2(gelu(fc1(x)))``, ``F.scaled_dot_product_attention``, ``conv(x)``,
``baddbmm``, ``view -> permute -> unbind`` and ``x + DropPath(branch)``, passes channel
attention's logits through :func:`drop_negligible_grad`, and
asks :func:`inference_blocks` how to split its window attention at CPU inference. Each computes
exactly the maths of the plain op (tested against it), and picks its kernel by device:

- Every device: training MLPs save less for backward (:class:`_LeanMlpFunction`: GELU is
  recomputed rather than stored), the attentions' q/k/v gradients are gathered into the
  projection's layout in one pass (:func:`split_heads`), and dropped branches are added in one
  pass (:func:`add_dropped_path`).
- CPU: the linear layers run through oneDNN (``torch.ops.mkldnn._linear_pointwise``) with bias,
  GELU and residual additions fused into the matmul (at inference with AVX2 kernels through
  PyTorch's own matmul instead, accumulating onto the residual, the blocked MLP writing into
  buffers of its own: :data:`_AVX2_INFERENCE_MATMUL`; in training on Intel CPUs through PyTorch's
  matmul: :data:`_ONEDNN_TRAINING`);
  MLPs (at inference, and fc2 and the backward in fp32 training) and window attention at inference
  in cache-sized blocks of tokens; oneDNN gets the weights it would reorder at every call or
  block packed once per call (the inference MLP's, :data:`_PACK_MLP_WEIGHTS`; the training
  forward's, :data:`_PACK_FORWARD_WEIGHTS`; with AVX2 kernels the training MLP backward's,
  :data:`_PACK_MLP_BACKWARD_WEIGHTS`; a weight that serves one call only over
  :data:`_PACK_MIN_ROWS` rows or more); window attention in bf16/fp16 as three plain steps
  instead of PyTorch's CPU flash attention; convolutions are the plain ``F.conv2d`` (oneDNN
  already), with the position encodings' residual addition fused into oneDNN's convolution at
  inference (``torch.ops.mkldnn._convolution_pointwise``), and with AVX2 kernels the training
  downsamples run as matrix products; in training the gradient of channel attention's logits
  loses its negligible and subnormal entries, which CPUs multiply on a slow path
  (:func:`drop_negligible_grad`).
- CUDA: no convolution goes through cuDNN. cuDNN >= 9.10 builds an execution plan per convolution
  per new input shape (about 2.4 s for DaViT-T's 28 convolutions), which multi-scale training and
  evaluation pay again and again. The position encodings (``x + DWConv3x3(x)``) run as one Triton
  kernel on the channels-last map, the addition fused, forward and backward
  (:class:`_TritonDepthwiseFunction`; sizes are runtime arguments, so a new shape compiles
  nothing; checked once per GPU and dtype, :func:`_triton_self_check`), or, without Triton >=
  3.0, on GPUs Triton does not build for, on ROCm and where that check fails (with a warning),
  through PyTorch's own depth-wise kernel (its backward with cuDNN off,
  :class:`_AtenDepthwiseFunction`); window attention leaves cuDNN's attention out
  (:func:`_sdpa_without_cudnn`); the stem and downsample
  convolutions run as matrix products (a 2x2/s2 convolution is a reshape and a matmul; the 7x7/s4
  stem and the overlapped 3x3/s2 downsample go through ``unfold``). The user's other convolutions
  (FPN, heads) keep cuDNN.

Everything falls back to the plain ops when the switch is off (:func:`set_fast_kernels`, or
``DAVIT_MM_FAST_KERNELS=0`` in the environment), when torch lacks a private op (each is looked up
behind a version check), and while the model is traced, scripted, compiled or exported, so
``torch.jit.trace``, ``torch.export``, ``torch.onnx.export`` and ``torch.compile`` see only
standard operators.
"""
import contextlib
import functools
import os
import threading
import warnings
from types import SimpleNamespace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.drop import drop_path

_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split('+')[0].split('.')[:2])

_enabled = os.environ.get('DAVIT_MM_FAST_KERNELS', '1').strip().lower() not in ('0', 'false', 'no',
                                                                                'off')


def set_fast_kernels(enabled: bool) -> None:
    """Turn the device-specific kernels on or off for every DaViT in this process."""
    if not isinstance(enabled, bool):
        raise TypeError(f'enabled must be a bool, got {type(enabled).__name__}: {enabled!r}')
    global _enabled
    _enabled = enabled


def fast_kernels_enabled() -> bool:
    """Whether the device-specific kernels are on (:func:`set_fast_kernels`)."""
    return _enabled


@contextlib.contextmanager
def plain_kernels() -> Iterator[None]:
    """Within this block the device-specific kernels are off; afterwards the switch is as it was."""
    enabled = _enabled
    set_fast_kernels(False)
    try:
        yield
    finally:
        set_fast_kernels(enabled)


def _private_onednn_op(name: str, *overloads: str) -> Optional[object]:
    """``torch.ops.mkldnn.<name>`` when it has every one of ``overloads``, or None: the oneDNN ops
    used here are private, and taken only on torch >= 2.1, where they take the arguments used
    here, and only where PyTorch was built with oneDNN."""
    if _TORCH_VERSION < (2, 1) or not torch.backends.mkldnn.is_available():
        return None
    try:
        packet = getattr(torch.ops.mkldnn, name)
        return packet if all(getattr(packet, overload) for overload in overloads) else None
    except (AttributeError, RuntimeError):
        return None


def _onednn_bf16_supported() -> bool:
    """Whether oneDNN computes in bf16 here (AVX-512 or newer, within ``ONEDNN_MAX_CPU_ISA``);
    on an AVX2 CPU its bf16 linear fails to build. Private, checked on torch >= 2.1."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn_fp16_supported() -> bool:
    """Whether oneDNN computes in fp16 here (AVX-512 FP16 or AMX-FP16, within
    ``ONEDNN_MAX_CPU_ISA``). Private, and False on a torch without the query."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cuda_depthwise_op() -> Optional[Callable]:
    """PyTorch's own CUDA depth-wise convolution (``aten::_conv_depthwise2d``, with autograd),
    or None; private, present with this signature since torch 1.x."""
    if _TORCH_VERSION < (2, 0):
        return None
    try:
        return torch.ops.aten._conv_depthwise2d.default
    except (AttributeError, RuntimeError):
        return None


def _sdpa_without_cudnn() -> Optional[Callable[[], contextlib.AbstractContextManager]]:
    """A context in which ``F.scaled_dot_product_attention`` may use flash, memory-efficient or
    math attention but not cuDNN's, or None on a torch without cuDNN attention (< 2.2) or without
    ``torch.nn.attention.sdpa_kernel`` (< 2.3). cuDNN attention, which PyTorch may prefer on
    Hopper GPUs, builds an execution plan per input shape, and window attention's batch (the
    number of windows) changes with every new input size."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if not hasattr(SDPBackend, 'CUDNN_ATTENTION'):
        return None
    return functools.partial(sdpa_kernel, [SDPBackend.FLASH_ATTENTION,
                                           SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def cpuinfo_fields(cpuinfo: str = '/proc/cpuinfo') -> Dict[str, str]:
    """The fields Linux reports for the first CPU in ``cpuinfo`` ('vendor_id', 'model name',
    'cpu family', ...), or {} where there is no such file (other systems)."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():  # the end of the first CPU's block
                    break
                key, _, value = line.partition(':')
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _cpu_vendor(cpuinfo: str = '/proc/cpuinfo') -> str:
    """The CPU's vendor ('GenuineIntel', 'AuthenticAMD', ...) as Linux reports it in
    ``cpuinfo``, or '' where it does not."""
    return cpuinfo_fields(cpuinfo).get('vendor_id', '')


# The instruction set torch's CPU kernels run with ('AVX2', 'AVX512', ...; '' on a torch that
# does not say).
_CPU_CAPABILITY = getattr(torch.backends.cpu, 'get_cpu_capability', lambda: '')()
# oneDNN's fused linear, with ``.default`` (bias and activation) and ``.binary`` (a residual).
_ONEDNN_LINEAR = _private_onednn_op('_linear_pointwise', 'default', 'binary')
# With AVX2 kernels CPU inference computes the linears with PyTorch's own matmul (MKL's sgemm),
# adding residuals by accumulating onto them (``addmm``), instead of with oneDNN's linear and its
# fused addition: DaViT-T's inference ran 1-8% faster so on a Zen 4 CPU held to AVX2. Training
# measured no faster so (within the spread of runs) and keeps oneDNN's, as AVX-512 kernels do
# everywhere (docs/benchmark.md).
_AVX2_INFERENCE_MATMUL = _CPU_CAPABILITY == 'AVX2'
# oneDNN's convolution with a fused addition.
_ONEDNN_CONV = getattr(_private_onednn_op('_convolution_pointwise', 'binary'), 'binary', None)
# oneDNN's reorder of a linear weight into its own blocked layout for a given number of rows,
# which its linear then takes as the weight.
_ONEDNN_PACK = getattr(_private_onednn_op('_reorder_linear_weight', 'default'), 'default', None)
# Whether the blocked inference MLP hands oneDNN its weights packed once per call (oneDNN's
# reorder, :data:`_ONEDNN_PACK`) rather than plain, which oneDNN reorders at every block:
# DaViT-T's forward took 0.3% to 6% less time so in five runs with AVX-512 kernels
# (docs/benchmark.md; ``tools/analysis/benchmark.py --unpacked-weights`` times the plain weights
# beside it).
_PACK_MLP_WEIGHTS = True
# Whether oneDNN's training linears take their weight packed once per call (for the call's rows)
# rather than plain, which oneDNN reorders itself (the blocked fc2: at every block). On a Zen 4
# CPU DaViT-T's training step took 2.1% (AVX-512 kernels) and 2.4% (AVX2) less time so with
# glibc's default allocator, and within 1% of the plain weights' with memory kept
# (docs/benchmark.md; ``tools/analysis/benchmark.py --unpacked-weights`` times the plain weights
# beside it).
_PACK_FORWARD_WEIGHTS = True
# Whether the training MLP's backward hands oneDNN the transposed weights of its input gradients
# packed once per backward rather than as transposed views, which oneDNN reorders at every call
# (at every block of the blocked backward). DaViT-T's training step took 3-5% less time so on a
# Zen 4 CPU held to AVX2, and 1% more with AVX-512 kernels, which keep the views
# (docs/benchmark.md; ``tools/analysis/benchmark.py --other-linears`` times the other choice
# beside it).
_PACK_MLP_BACKWARD_WEIGHTS = _CPU_CAPABILITY == 'AVX2'
# Whether CPU training computes its linears with oneDNN's (:class:`_OneDNNLinearFunction`, and
# :class:`_LeanMlpFunction` over blocks of tokens) rather than PyTorch's matmul (MKL's sgemm, the
# MLP in one pass): everywhere but on Intel CPUs. On an Intel Xeon (model 207) DaViT-T's training
# step took 1-9% less time with PyTorch's matmul with AVX2 kernels (five interleaved comparisons),
# and from 7% less to 0.4% more with AVX-512 kernels (five). On the Zen 4 CPU the oneDNN path was
# built on, its blocked MLP took 6-7% off the step against oneDNN's in one pass, and PyTorch's
# matmul over the same blocks was 4-5% slower; re-checked there at 9fc40d9, PyTorch's matmul for
# all of training's linears was 6% slower with AVX-512 kernels and even with AVX2. On a Zen 3
# CPU (AVX2 only) it was within a run's spread of oneDNN's with one image of 800 x 1216 and 11%
# slower with two of 800 x 1344 (docs/benchmark.md; ``tools/analysis/benchmark.py
# --other-training-linears`` times the other choice beside it).
_ONEDNN_TRAINING = _cpu_vendor() != 'GenuineIntel'
# The fewest rows over which a weight that serves one call (rather than every block of a blocked
# MLP) is packed for it. Packing costs a reorder and its set-up, which a call over few rows does
# not earn back: on a Zen 4 CPU, with packing for every call DaViT-T's training step took 9%
# (AVX-512 kernels) and 22% (AVX2) longer at 224 x 224, 1% and 5% at 512 x 512, and the same
# time at 800 x 1216 (docs/benchmark.md; ``tools/analysis/benchmark.py --pack-every-call``
# times packing for every call beside it).
_PACK_MIN_ROWS = 4096
# CPU attention in half precision (a bf16/fp16 model, or CPU autocast) takes the three plain steps
# where oneDNN computes that dtype itself (the half dtypes below), and PyTorch's CPU flash
# attention (F.scaled_dot_product_attention) where it does not. On an Intel Xeon with AMX (model
# 167), DaViT-T at 800 x 1216 in bf16: with AVX-512 kernels the flash attention's backward is
# slow for 49-token windows (training step 1.76 s against 1.15 s with the plain steps; inference
# within a few percent either way); with AVX2 kernels, where oneDNN has no bf16, the plain
# steps' half-precision matmuls are slow (plain steps against flash attention: training 91.5 s
# against 90.1 s, inference 9.81 s against 9.05 s; docs/benchmark.md).
# ``tools/analysis/benchmark.py --other-half-attention`` times the other choice beside it.
_NATIVE_HALF_DTYPES = tuple(dtype for dtype, native in ((torch.bfloat16, _onednn_bf16_supported()),
                                                        (torch.float16, _onednn_fp16_supported()))
                            if native)
_PLAIN_HALF_ATTENTION = True  # False: the other choice (the benchmark's --other-half-attention)
# The dtypes oneDNN's linear serves.
_ONEDNN_DTYPES = (torch.float32,) + (
    (torch.bfloat16,) if _ONEDNN_LINEAR is not None and torch.bfloat16 in _NATIVE_HALF_DTYPES else ())
_CUDA_DEPTHWISE = _cuda_depthwise_op()
# The depth-wise kernel's backward, called with cuDNN off (see _AtenDepthwiseFunction).
_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default
_SDPA_WITHOUT_CUDNN = _sdpa_without_cudnn()
# Triton >= 3.0 compiles the CUDA depth-wise kernels below (shipped with CUDA builds of torch).
_TRITON_MIN = (3, 0)

if _ONEDNN_LINEAR is not None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(_ONEDNN_LINEAR)
    def _onednn_linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        """FLOPs of oneDNN's linear for torch's FlopCounterMode (tools/analysis/get_flops.py),
        which would otherwise skip it: 2 * tokens * in * out, as for ``F.linear``."""
        # .binary(X, other, W, B, attr) / .default(X, W, B, attr, scalars, algorithm)
        weight_shape = args[1] if len(args) == 4 else args[0]
        tokens = 1
        for size in x_shape[:-1]:
            tokens *= size
        return 2 * tokens * weight_shape[0] * weight_shape[1]


def _device_type(x: torch.Tensor) -> str:
    return x.device.type


def _compiler_probe(name: str) -> Optional[bool]:
    """``torch.compiler.<name>()`` (``is_compiling``, ``is_exporting``), or None on a torch
    without it."""
    fn = getattr(getattr(torch, 'compiler', None), name, None)
    return None if fn is None else bool(fn())


def _export_flag() -> Optional[bool]:
    """Whether ``torch.export`` is tracing: the flag behind ``torch.compiler.is_exporting()``,
    read directly where torch has it. Under ``torch.compile``, dynamo in torch 2.11 answers
    ``is_exporting()`` with True (torch 2.13 reads the flag); the flag itself is False there."""
    flag = getattr(getattr(torch, 'compiler', None), '_is_exporting_flag', None)
    return flag if isinstance(flag, bool) else _compiler_probe('is_exporting')


def is_tracing() -> bool:
    """Whether a tracer, scripter, compiler or exporter is looking: then only standard ops."""
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    if _compiler_probe('is_compiling') or _export_flag():
        return True
    return bool(torch.onnx.is_in_onnx_export())


def is_exporting() -> bool:
    """Whether the graph being built must hold at every input size (``torch.jit.trace``/script,
    ``torch.export``, ONNX export); ``torch.compile`` guards on sizes and recompiles instead. On
    a torch without ``torch.compiler.is_exporting``, any tracing counts."""
    exporting = _export_flag()
    if exporting is None:
        return is_tracing()
    # Tracing that is not compiling is a jit tracer/scripter or the ONNX exporter.
    return exporting or (is_tracing() and not _compiler_probe('is_compiling'))


def _fast(x: torch.Tensor, device_type: str) -> bool:
    return _enabled and _device_type(x) == device_type and not is_tracing()


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes matmuls/convs in on ``device_type``, or None when it is off."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except TypeError:  # torch < 2.4: no device argument
        if device_type == 'cpu':
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _in_autocast_dtype(device_type: str, *tensors: Optional[torch.Tensor]):
    """``tensors`` cast as autocast would cast a linear's or a convolution's operands (None
    stays None)."""
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t if t is None else t.to(dtype) for t in tensors)


def _first_order_only(backward: Callable) -> Callable:
    """For the backward of this module's autograd Functions, which compute gradients with kernels
    that are not differentiable again: asking for a graph of the gradients (``create_graph=True``,
    e.g. a gradient penalty) raises at once. (``torch.autograd.function.once_differentiable``
    raises only if the second backward happens to reach the function; ``torch.autograd.grad`` with
    ``inputs`` prunes it, and the second derivative then silently misses terms.)"""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                'davit_mm.ops: second derivatives (create_graph=True) do not go through the '
                'backbone\'s fast kernels; for such runs call davit_mm.ops.set_fast_kernels(False) '
                '(or set DAVIT_MM_FAST_KERNELS=0) and model.backbone.set_fused_attention(False)')
        return backward(ctx, *grads)
    return wrapper


def _needs_grad(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or any(p is not None and p.requires_grad for p in params))


# ------------------------------------------------------------------------------------ linear
def _onednn_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's linear serves CPU fp32 calls outside autocast, and bf16 ones where it computes
    in bf16."""
    return (_ONEDNN_LINEAR is not None and _fast(x, 'cpu') and x.dtype == weight.dtype
            and x.dtype in _ONEDNN_DTYPES and _autocast_dtype('cpu') is None)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            activation: str = 'none') -> torch.Tensor:
    return _ONEDNN_LINEAR.default(x, weight, bias, activation, [], 'none')


def _packed(weight: torch.Tensor, rows: int, pack: bool, single_call: bool = False
            ) -> torch.Tensor:
    """``weight`` for oneDNN's linear over ``rows`` rows a call: with ``pack`` (and torch's
    reorder), reordered once into oneDNN's blocked layout, which a plain weight would be at every
    call. For a weight that serves a ``single_call``, only over :data:`_PACK_MIN_ROWS` rows or
    more, where that pays."""
    if pack and _ONEDNN_PACK is not None and (not single_call or rows >= _PACK_MIN_ROWS):
        return _ONEDNN_PACK(weight.contiguous(), rows)
    return weight


def _rows(x: torch.Tensor) -> int:
    """The rows a linear over ``x``'s last dimension multiplies."""
    return x.numel() // max(x.shape[-1], 1)


def _inference_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: str = 'none', out: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """``x @ weight.T + bias`` (then GELU with ``activation='gelu'``) for CPU inference: oneDNN's
    linear with the bias and GELU in its epilogue, or, with AVX2 kernels
    (:data:`_AVX2_INFERENCE_MATMUL`), PyTorch's matmul and GELU in place, written into ``out``
    (a contiguous buffer for the rows of a 2-D ``x``) where one is given."""
    if not _AVX2_INFERENCE_MATMUL:
        return _onednn(x, weight, bias, activation)
    if out is None:
        out = F.linear(x, weight, bias)
    elif bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)
    return torch.ops.aten.gelu_(out) if activation == 'gelu' else out


def _inference_linear_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], out: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
    """``residual + x @ weight.T + bias`` for CPU inference: oneDNN's linear with the addition in
    its epilogue, or, with AVX2 kernels, the residual and the bias summed in one pass (into
    ``out``, a contiguous buffer for the rows of a 2-D ``x``, where one is given) and the matmul
    accumulated onto that sum (``addmm_``)."""
    out_shape = x.shape[:-1] + weight.shape[:1]
    if not _AVX2_INFERENCE_MATMUL or residual.shape != out_shape:
        return _ONEDNN_LINEAR.binary(x, residual, weight, bias, 'add')
    start = residual.reshape(-1, out_shape[-1])
    if bias is None:
        out = start.clone() if out is None else out.copy_(start)
    else:
        out = torch.add(start, bias, out=out)
    return out.addmm_(x.reshape(-1, x.shape[-1]), weight.t()).view(out_shape)


def _linear_backward(ctx, grad, x, weight, first: int = 0, onednn: bool = True,
                     weight_t: Optional[torch.Tensor] = None):
    """Gradients of ``x @ weight.T + bias`` for inputs ``first .. first + 2`` of ``ctx``; with
    ``onednn``, ``weight_t`` (default ``weight.T``) is what oneDNN multiplies ``grad`` by."""
    need = ctx.needs_input_grad[first:first + 3]
    grad_x = None
    if need[0]:  # grad @ weight
        grad_x = (_onednn(grad, weight.t() if weight_t is None else weight_t, None) if onednn
                  else grad.matmul(weight))
    flat = grad.reshape(-1, grad.shape[-1])
    grad_w = flat.t().mm(x.reshape(-1, x.shape[-1])) if need[1] else None
    grad_b = flat.sum(0) if need[2] else None
    return grad_x, grad_w, grad_b


class _OneDNNLinearFunction(torch.autograd.Function):
    """Linear for CPU training: oneDNN computes the forward matmul with its bias (no bias copy)
    and the input gradient; the weight gradient is one ``mm``. Saves what autograd would."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        weight_for_call = _packed(weight, _rows(x), _PACK_FORWARD_WEIGHTS, single_call=True)
        return _onednn(x, weight_for_call, bias)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return _linear_backward(ctx, grad, x, weight)


class _LeanMlpFunction(torch.autograd.Function):
    """fc1 -> GELU -> fc2 for training, saving only the input and the pre-GELU activation.

    Autograd would also keep the post-GELU activation (fc2's input, 4x the block width); here
    backward recomputes it, and then holds two such wide tensors at a time instead of three. A
    DaViT block keeps about 18 channel-widths per token for backward; this drops 4 of them, for
    one extra GELU. The matmuls are oneDNN's on the CPU fast path (``onednn``; in fp32, fc2 and
    the backward run over blocks of tokens whose GELU output and hidden gradient stay in cache,
    :func:`_training_mlp_blocks`) and the plain ones elsewhere; callers cast for autocast and
    turn it off around ``apply`` (see :func:`_lean_mlp`), so forward and backward compute in
    one dtype. Like :class:`_OneDNNLinearFunction`, its backward is not differentiable again
    (second derivatives raise; they need :func:`set_fast_kernels` ``(False)``).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, onednn: bool):
        matmul = _onednn if onednn else F.linear
        ctx.onednn = onednn
        pack, rows = onednn and _PACK_FORWARD_WEIGHTS, _rows(x)
        pre = matmul(x, _packed(w1, rows, pack, single_call=True), b1)
        ctx.save_for_backward(x, w1, pre, w2)
        ctx.blocks = blocks = _training_mlp_blocks(pre) if onednn else None
        if blocks is None:
            return matmul(F.gelu(pre), _packed(w2, rows, pack, single_call=True), b2)
        hidden = pre.reshape(-1, pre.shape[-1])
        out = pre.new_empty(hidden.shape[0], w2.shape[0])
        w2 = _packed(w2, blocks[0].stop - blocks[0].start, pack)
        for block in blocks:  # GELU's output stays in cache for fc2
            out[block] = _onednn(F.gelu(hidden[block]), w2, b2)
        return out.view(*pre.shape[:-1], out.shape[-1])

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        x, w1, pre, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if ctx.blocks is not None:
            return _lean_mlp_backward_in_blocks(need, grad, x, w1, pre, w2, ctx.blocks) + (None, )
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w2 = grad_b2 = None
        if need[3]:
            hidden = F.gelu(pre)
            grad_w2 = flat.t().mm(hidden.reshape(-1, hidden.shape[-1]))
            del hidden  # before the next wide tensor is allocated
        if need[4]:
            grad_b2 = flat.sum(0)
        w2_t, w1_t = (_backward_weights(w1, w2, flat.shape[0], need[0], single_call=True)
                      if ctx.onednn else (None, None))
        grad_pre = _onednn(grad, w2_t, None) if ctx.onednn else grad.matmul(w2)
        torch.ops.aten.gelu_backward.grad_input(grad_pre, pre, grad_input=grad_pre)  # in place
        grad_x, grad_w1, grad_b1 = _linear_backward(ctx, grad_pre, x, w1, onednn=ctx.onednn,
                                                    weight_t=w1_t)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


def _training_mlp_blocks(pre: torch.Tensor) -> Optional[List[slice]]:
    """Blocks of tokens for :class:`_LeanMlpFunction` on the CPU (oneDNN, fp32), whose wide
    activations (GELU's output, the hidden gradient) then stay in cache; None where the map
    holds fewer than 3 blocks (measured no faster) or in bf16 (the weight gradients are summed
    over the blocks, which bf16 would round at every block)."""
    if pre.dtype != torch.float32:
        return None
    tokens = pre.numel() // pre.shape[-1]
    blocks = _blocks(tokens, pre.shape[-1] * pre.element_size(), 64 * torch.get_num_threads())
    return blocks if len(blocks) >= 3 else None


def _backward_weights(w1: torch.Tensor, w2: torch.Tensor, rows: int, input_grad: bool,
                      single_call: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """What oneDNN multiplies the MLP's gradients by for blocks of ``rows`` tokens (or all of
    them in a ``single_call``): ``w2.T`` and, for the input gradient, ``w1.T``; packed once
    (:data:`_PACK_MLP_BACKWARD_WEIGHTS`, see :func:`_packed`) or as transposed views."""
    pack = _PACK_MLP_BACKWARD_WEIGHTS
    return (_packed(w2.t(), rows, pack, single_call),
            _packed(w1.t(), rows, pack and input_grad, single_call))


def _lean_mlp_backward_in_blocks(need: Sequence[bool], grad: torch.Tensor, x: torch.Tensor,
                                 w1: torch.Tensor, pre: torch.Tensor, w2: torch.Tensor,
                                 blocks: List[slice]) -> tuple:
    """:class:`_LeanMlpFunction`'s backward (oneDNN's matmuls) over ``blocks`` of tokens: each
    block's recomputed GELU and hidden gradient are used while in cache, and the weight
    gradients are summed over the blocks."""
    x_shape = x.shape
    grad, x, pre = (t.reshape(-1, t.shape[-1]) for t in (grad, x, pre))
    w2_t, w1_t = _backward_weights(w1, w2, blocks[0].stop - blocks[0].start, need[0])
    grad_x = x.new_empty(x.shape) if need[0] else None
    grad_w1 = torch.zeros_like(w1) if need[1] else None
    grad_b1 = pre.new_zeros(pre.shape[-1]) if need[2] else None
    grad_w2 = torch.zeros_like(w2) if need[3] else None
    for block in blocks:
        if need[3]:
            grad_w2.addmm_(grad[block].t(), F.gelu(pre[block]))
        if not any(need[:3]):
            continue
        grad_pre = _onednn(grad[block], w2_t, None)
        torch.ops.aten.gelu_backward.grad_input(grad_pre, pre[block], grad_input=grad_pre)
        if need[0]:
            grad_x[block] = _onednn(grad_pre, w1_t, None)
        if need[1]:
            grad_w1.addmm_(grad_pre.t(), x[block])
        if need[2]:
            grad_b1 += grad_pre.sum(0)
    grad_b2 = grad.sum(0) if need[4] else None
    return (None if grad_x is None else grad_x.view(x_shape)), grad_w1, grad_b1, grad_w2, grad_b2


def _lean_mlp(x: torch.Tensor, params: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """:class:`_LeanMlpFunction` on any device, in the dtype autocast would compute the linears
    in: the operands are cast here, as autocast casts a linear's, and autocast is off inside
    (it would not reach the backward, which then computes in the forward's dtype)."""
    device_type = _device_type(x)
    if _autocast_dtype(device_type) is None:
        return _LeanMlpFunction.apply(x, *params,
                                      _ONEDNN_TRAINING and _onednn_fits(x, params[0]))
    x, *params = _in_autocast_dtype(device_type, x, *params)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _LeanMlpFunction.apply(x, *params, False)


def linear(x: torch.Tensor, layer: Union[nn.Linear, Tuple[torch.Tensor, Optional[torch.Tensor]]],
           gelu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + gelu(layer(x))``, each part optional; ``layer`` is an ``nn.Linear`` or its
    ``(weight, bias)``.

    On CPU without gradients, oneDNN applies the bias, the GELU or the residual addition in the
    matmul's epilogue (``F.linear`` copies the broadcast bias into the output first, and GELU and
    the addition each take another pass over it); with gradients, :class:`_OneDNNLinearFunction`
    still skips the bias copy (except on Intel CPUs, where training takes ``F.linear``:
    :data:`_ONEDNN_TRAINING`). With AVX2 kernels PyTorch's matmul runs the inference ones instead,
    GELU in place and the residual accumulated onto (:func:`_inference_linear_add`).
    """
    if gelu and residual is not None:
        raise ValueError('linear: gelu and residual cannot be combined')
    weight, bias = (layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer
    fits = _onednn_fits(x, weight)
    training = fits and _needs_grad(x, weight, bias)
    if not fits or (training and not _ONEDNN_TRAINING):
        out = F.linear(x, weight, bias)
        out = F.gelu(out) if gelu else out
    elif not training:
        if residual is not None:
            return _inference_linear_add(x, residual, weight, bias)
        return _inference_linear(x, weight, bias, 'gelu' if gelu else 'none')
    else:
        out = _OneDNNLinearFunction.apply(x, weight, bias)
        out = F.gelu(out) if gelu else out
    return out if residual is None else residual + out


class _SplitHeadsFunction(torch.autograd.Function):
    """The views of :func:`split_heads`, whose backward writes the parts' gradients into one
    ``(B, N, parts, heads, d)`` tensor, one copy per part.

    Autograd's own backward of ``view -> permute -> unbind`` stacks the parts' gradients into a
    new tensor and then copies the stack into the projection's layout: two passes over a
    ``parts x`` wide tensor, the second with a scattered read (with ``select`` instead of
    ``unbind``, a zero-filled full-size tensor per part as well).
    """

    @staticmethod
    def forward(ctx, x, parts: int, heads: int):
        ctx.set_materialize_grads(False)
        ctx.shape = x.shape
        return _head_views(x, parts, heads)

    @staticmethod
    @_first_order_only
    def backward(ctx, *grads):
        B, N, width = ctx.shape
        given = next((g for g in grads if g is not None), None)
        if given is None:  # no part's gradient is defined: neither is the projection's
            return None, None, None
        out = given.new_empty(B, N, len(grads), given.shape[1], given.shape[-1])
        for i, grad in enumerate(grads):
            if grad is None:
                out[:, :, i].zero_()
            else:
                out[:, :, i].copy_(grad.transpose(1, 2))
        return out.view(B, N, width), None, None


def _head_views(x: torch.Tensor, parts: int, heads: int) -> Tuple[torch.Tensor, ...]:
    B, N, width = x.shape
    return x.view(B, N, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def split_heads(x: torch.Tensor, parts: int, heads: int) -> Tuple[torch.Tensor, ...]:
    """A ``(B, N, parts * heads * d)`` projection (q, k, v side by side) as ``parts`` views
    ``(B, heads, N, d)``; in training its gradient is gathered in one pass
    (:class:`_SplitHeadsFunction`), on every device."""
    if _enabled and not is_tracing() and _needs_grad(x):
        return _SplitHeadsFunction.apply(x, parts, heads)
    return _head_views(x, parts, heads)


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + x @ weight^T + bias`` with a weight per sample: ``(B, N, in)`` tokens,
    ``(B, out, in)`` weights, ``(B, out)`` biases (or None) and ``(B, N, out)`` residuals.

    On CPU without gradients each sample is one :func:`linear` with its bias and residual fused;
    elsewhere one ``baddbmm``.
    """
    if _onednn_fits(x, weight) and not _needs_grad(x, weight, bias, residual) and x.shape[0] > 0:
        outs = [linear(x[i], (weight[i], None if bias is None else bias[i]),
                       residual=None if residual is None else residual[i])
                for i in range(x.shape[0])]
        return outs[0].unsqueeze(0) if len(outs) == 1 else torch.stack(outs)
    weight = weight.transpose(1, 2)
    out = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight)
    return out if residual is None else residual + out


# CPU inference runs the MLP, and window attention, over blocks of tokens whose widest
# intermediate (the MLP's 4x-wide hidden activation, the attention's qkv) takes about this many
# bytes, so that the next step reads it from cache rather than from memory: at 800 x 1216
# DaViT-T's first stage would otherwise write and read back a 93 MB MLP activation per block
# (docs/benchmark.md measures the gain).
BLOCK_BYTES = 8 << 20


def _blocks(count: int, bytes_each: int, minimum: int = 1) -> List[slice]:
    """Slices of ``count`` items of ``bytes_each`` bytes each, about :data:`BLOCK_BYTES` (at least
    ``minimum`` items) a slice."""
    step = max(minimum, BLOCK_BYTES // max(bytes_each, 1))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def inference_blocks(x: torch.Tensor, count: int, bytes_each: int, minimum: int = 1,
                     params: Sequence[Optional[torch.Tensor]] = ()) -> List[slice]:
    """Slices that split ``count`` items (tokens, rows of windows) of ``bytes_each`` bytes of
    intermediate each into blocks of about :data:`BLOCK_BYTES` (at least ``minimum`` items) on
    the CPU fast path when no gradient flows to ``x`` or ``params``; otherwise one slice."""
    if not _fast(x, 'cpu') or _needs_grad(x, *params):
        return [slice(0, count)]
    return _blocks(count, bytes_each, minimum)


def _blocked_mlp_inference(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
                           residual: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The blocked inference MLP, or None where one block would hold every token, where there are
    no tokens, or where the residual broadcasts: then the two fused linears of :func:`linear` do
    as well."""
    tokens = x.reshape(-1, x.shape[-1])
    blocks = inference_blocks(x, tokens.shape[0], fc1.out_features * x.element_size(),
                              minimum=64 * torch.get_num_threads())
    out_shape = x.shape[:-1] + (fc2.out_features,)
    if len(blocks) <= 1 or (residual is not None and residual.shape != out_shape):  # 0: no tokens
        return None
    out = x.new_empty(tokens.shape[0], fc2.out_features)
    if residual is not None:
        residual = residual.reshape(out.shape)
    # oneDNN reorders a plain weight into its blocked layout at every call: once per MLP instead
    # (the packed copies live for this call only). Bit-identical with torch 2.13; with 2.11 the
    # shorter last block rounds differently (docs/benchmark.md). Not for PyTorch's matmul.
    rows, pack = blocks[0].stop - blocks[0].start, _PACK_MLP_WEIGHTS and not _AVX2_INFERENCE_MATMUL
    w1, w2 = _packed(fc1.weight, rows, pack), _packed(fc2.weight, rows, pack)
    # PyTorch's matmul (AVX2 kernels) writes where it is told: every block's hidden activation
    # into one buffer, and fc2 straight into the block's rows of ``out``, with no copies.
    hidden_rows = x.new_empty(rows, fc1.out_features) if _AVX2_INFERENCE_MATMUL else None
    for block in blocks:
        hidden = _inference_linear(tokens[block], w1, fc1.bias, 'gelu', out=(
            None if hidden_rows is None else hidden_rows[:block.stop - block.start]))
        target = None if hidden_rows is None else out[block]
        result = (_inference_linear(hidden, w2, fc2.bias, out=target) if residual is None else
                  _inference_linear_add(hidden, residual[block], w2, fc2.bias, out=target))
        if target is None:
            out[block] = result
    return out.view(out_shape)


def mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
        residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + fc2(gelu(fc1(x)))`` (``residual`` optional).

    Training saves less for backward on every device (:class:`_LeanMlpFunction`), and CPU
    inference runs over blocks of tokens whose hidden activation stays in cache.
    """
    params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    if _enabled and not is_tracing() and _needs_grad(x, *params):
        out = _lean_mlp(x, params)
        return out if residual is None else residual + out
    if _onednn_fits(x, fc1.weight):
        out = _blocked_mlp_inference(x, fc1, fc2, residual)
        if out is not None:
            return out
    return linear(linear(x, fc1, gelu=True), fc2, residual=residual)


def add_dropped_path(x: torch.Tensor, branch: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """``x + DropPath(drop_prob)(branch)`` in training (mmcv's ``drop_path``).

    Fast path, every device: one pass over the map. mmcv's per-sample keep mask, drawn as mmcv
    draws it (the same random numbers), scaled by ``1 / keep_prob`` and applied within the
    addition (``addcmul``), where ``DropPath`` divides and multiplies the whole branch and the
    addition then reads it again (three passes).
    """
    if not _enabled or is_tracing():
        return x + drop_path(branch, drop_prob, training=True)
    keep_prob = 1 - drop_prob
    shape = (branch.shape[0],) + (1,) * (branch.dim() - 1)
    scale = (keep_prob + torch.rand(shape, dtype=branch.dtype, device=branch.device)).floor_()
    return torch.addcmul(x, branch, scale.div_(keep_prob))


# -------------------------------------------------------------------------------- attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for ``(..., tokens, d)`` queries, keys and values.

    ``F.scaled_dot_product_attention``, except on the CPU fast path in bf16/fp16 (a half
    precision model, or CPU autocast) where oneDNN computes that dtype itself: there PyTorch's
    CPU flash attention is slow in backward for DaViT's 49-token windows, so the plain steps run
    (the official code's own order; :data:`_NATIVE_HALF_DTYPES`). On CUDA, cuDNN's attention is
    left out (:func:`_sdpa_without_cudnn`).
    """
    if _fast(q, 'cpu') and _plain_half_attention(q):
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    if _SDPA_WITHOUT_CUDNN is not None and _fast(q, 'cuda'):
        with _SDPA_WITHOUT_CUDNN():  # no per-shape cuDNN plans (see _sdpa_without_cudnn)
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _plain_half_attention(q: torch.Tensor) -> bool:
    """Whether CPU attention takes the plain steps (:data:`_NATIVE_HALF_DTYPES`); full precision
    never does."""
    half = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else _autocast_dtype('cpu')
    return half is not None and (half in _NATIVE_HALF_DTYPES) == _PLAIN_HALF_ATTENTION


# Gradient entries of the channel attention's logits below this fraction of the largest in their
# matrix (and subnormal ones) are dropped on the CPU (:data:`_DROP_NEGLIGIBLE_GRADS`; the
# benchmark's --subnormal-grads times it off): see :func:`drop_negligible_grad`.
NEGLIGIBLE_GRAD = 2.0 ** -60
_DROP_NEGLIGIBLE_GRADS = True


class _NegligibleGradFunction(torch.autograd.Function):
    """The identity, whose backward sets the gradient's negligible entries to zero
    (:func:`drop_negligible_grad`)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        size = grad.abs()
        limit = size.amax(dim=(-2, -1), keepdim=True).mul_(NEGLIGIBLE_GRAD)
        return grad.masked_fill(size < limit.clamp_(min=torch.finfo(grad.dtype).tiny), 0)


def drop_negligible_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``; on the CPU fast path in training, the gradient that flows back through it has its
    entries below :data:`NEGLIGIBLE_GRAD` of the largest in their ``(..., M, N)`` matrix, and
    its subnormal entries, set to zero.

    For the channel attention's ``d x d`` logits. At detection sizes the logits sum over tens
    of thousands of tokens and their softmax is sharp, so the softmax's gradient holds entries
    down to the subnormal range, and the two products of its backward with the ``N x d``
    projections (and what they produce) run on the CPU's slow path for subnormal numbers: on an
    Intel Xeon, a fifth of DaViT-T's training step at 800 x 1216 (docs/benchmark.md). A
    dropped entry changes a result by less than ``2^-55`` of the largest term of its sum, far
    below float32's rounding of that sum. GPUs compute subnormal numbers at full speed.
    """
    if _DROP_NEGLIGIBLE_GRADS and _fast(x, 'cpu') and _needs_grad(x):
        return _NegligibleGradFunction.apply(x)
    return x


# ------------------------------------------------------------------------------ convolution
def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1


def _tiles_input(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether a dense convolution's kernel tiles the input: kernel == stride, no padding or
    dilation, divisible sizes."""
    return (conv.kernel_size == conv.stride and conv.padding == (0, 0) and conv.groups == 1
            and conv.dilation == (1, 1)
            and x.shape[-2] % conv.stride[0] == 0 and x.shape[-1] % conv.stride[1] == 0)


def _conv_as_matmul(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A dense (groups=1) convolution as one matrix product: a reshape when the kernel tiles the
    input (kernel == stride, no padding, divisible sizes), ``unfold`` otherwise. Takes and returns
    ``(B, C, H, W)`` tensors (the result is a channels-last view)."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    x, weight, bias = _in_autocast_dtype(_device_type(x), x, conv.weight, conv.bias)
    B, C, H, W = x.shape
    out_h, out_w = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    if _tiles_input(conv, x):
        patches = x.permute(0, 2, 3, 1).reshape(B, out_h, kh, out_w, kw, C)
        patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(B, out_h, out_w, kh * kw * C)
        weight = weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
    else:
        patches = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (B, C*kh*kw, L)
        patches = patches.transpose(1, 2).view(B, out_h, out_w, -1)
        weight = weight.reshape(conv.out_channels, -1)
    return F.linear(patches, weight, bias).permute(0, 3, 1, 2)


def _triton_version() -> Optional[Tuple[int, int]]:
    """The installed Triton's (major, minor), or None without Triton."""
    try:
        import triton
    except ImportError:
        return None
    return tuple(int(v) for v in triton.__version__.split('.')[:2])


def _build_triton_depthwise() -> Optional[SimpleNamespace]:
    """Triton kernels for a stride-1 'same' depth-wise convolution of a channels-last
    ``(B, C, H, W)`` map, or None without Triton >= 3.0.

    ``conv`` computes ``bias + sum_taps w[tap, c] * x[shifted by tap]`` for a tile of pixels x
    channels (the shifted tiles overlap the tile: one pass over the map), optionally adds the
    input itself (a position encoding's residual) and stores a copy of the input in the compute
    dtype (what autocast's cast would have saved for backward). Inputs are rounded to the compute
    dtype (the weight's) before the products and the sum is rounded to it after, as autocast's fp16
    convolution does; products accumulate in fp32. ``weight_grad`` sums, over the pixels of a
    stride of tiles, each tap's ``grad * shifted input`` (and ``grad`` for the bias) into one fp32
    partial row per program, which the caller adds up. Sizes are runtime arguments
    (``do_not_specialize``): a new input shape compiles nothing.

    Built on first use (importing Triton takes a while), so that ``TRITON_INTERPRET=1`` set
    before it runs them on the CPU, as the tests do.
    """
    version = _triton_version()
    if version is None or version < _TRITON_MIN:
        return None
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=['P', 'H', 'W'])
    def conv(x_ptr, w_ptr, b_ptr, out_ptr, cast_ptr, P, H, W, C, K: tl.constexpr,
             HAS_BIAS: tl.constexpr, ADD_INPUT: tl.constexpr, STORE_CAST: tl.constexpr,
             WIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixels of (B, H, W), flat
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok, c_ok = p < P, c < C
        col, row = p % W, (p // W) % H
        at = (p.to(tl.int64) if WIDE else p)[:, None] * C + c[None, :]
        compute = w_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(K):
            for j in tl.static_range(K):
                dy, dx = i - K // 2, j - K // 2
                ok = p_ok & (row + dy >= 0) & (row + dy < H) & (col + dx >= 0) & (col + dx < W)
                xs = tl.load(x_ptr + at + (dy * W + dx) * C, mask=ok[:, None] & c_ok[None, :],
                             other=0.0)
                wt = tl.load(w_ptr + (i * K + j) * C + c, mask=c_ok, other=0.0)
                acc += xs.to(compute).to(tl.float32) * wt.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        out = acc.to(compute)
        ok = p_ok[:, None] & c_ok[None, :]
        if ADD_INPUT or STORE_CAST:
            center = tl.load(x_ptr + at, mask=ok, other=0.0)
            if STORE_CAST:
                tl.store(cast_ptr + at, center.to(compute), mask=ok)
            if ADD_INPUT:
                out = out.to(tl.float32) + center.to(tl.float32)
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=['P', 'H', 'W', 'n_blocks'])
    def weight_grad(g_ptr, x_ptr, part_ptr, P, H, W, C, n_blocks, K: tl.constexpr,
                    TAPS: tl.constexpr, WIDE: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        compute = x_ptr.dtype.element_ty
        taps = tl.arange(0, TAPS)  # K * K weight taps, then the bias, then padding
        acc = tl.zeros((TAPS, BLOCK_C), dtype=tl.float32)
        for block in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            p = block * BLOCK_P + tl.arange(0, BLOCK_P)
            p_ok = p < P
            col, row = p % W, (p // W) % H
            at = (p.to(tl.int64) if WIDE else p)[:, None] * C + c[None, :]
            g = tl.load(g_ptr + at, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
            g = g.to(compute).to(tl.float32)
            for i in tl.static_range(K):
                for j in tl.static_range(K):
                    dy, dx = i - K // 2, j - K // 2
                    ok = p_ok & (row + dy >= 0) & (row + dy < H) & (col + dx >= 0) & (col + dx < W)
                    xs = tl.load(x_ptr + at + (dy * W + dx) * C,
                                 mask=ok[:, None] & c_ok[None, :], other=0.0)
                    tap = tl.sum(g * xs.to(tl.float32), axis=0)
                    acc += tl.where(taps[:, None] == i * K + j, tap[None, :], 0.0)
            acc += tl.where(taps[:, None] == K * K, tl.sum(g, axis=0)[None, :], 0.0)
        tl.store(part_ptr + (tl.program_id(0) * TAPS + taps[:, None]) * C + c[None, :], acc,
                 mask=c_ok[None, :])

    return SimpleNamespace(conv=conv, weight_grad=weight_grad, cdiv=triton.cdiv,
                           next_power_of_2=triton.next_power_of_2)


@functools.lru_cache(maxsize=None)
def _triton_depthwise() -> Optional[SimpleNamespace]:
    return _build_triton_depthwise()


# Tile of the Triton depth-wise kernels: 64 pixels x 32 channels over 8 warps keeps them within
# about 100 registers a thread without spilling (ptxas for sm_90, with 16-byte vector loads), and
# 32 divides every DaViT width. Weight gradients are summed by at most this many programs per
# channel tile. Chosen without a GPU at hand: tile sizes are the first thing to tune on one.
_TILE_PIXELS, _TILE_CHANNELS, _TILE_WARPS, _WEIGHT_GRAD_PROGRAMS = 64, 32, 8, 512
# Maps of this many elements or more take 64-bit offsets in the kernels (WIDE).
_WIDE_FROM = 2 ** 31


def _launch_depthwise(kernels: SimpleNamespace, x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor], add_input: bool,
                      out_dtype: Optional[torch.dtype] = None,
                      cast: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The convolution (computed in the weight's dtype) of ``x``, plus ``x`` if ``add_input``,
    as a new channels-last map of ``out_dtype`` (default: the dtype the plain ops would return);
    ``cast`` receives ``x`` in the weight's dtype."""
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if add_input else weight.dtype
    B, C, H, W = x.shape
    out = torch.empty_like(x, dtype=out_dtype, memory_format=torch.channels_last)
    pixels = B * H * W
    if pixels == 0:  # an empty batch: nothing to launch
        return out
    grid = (kernels.cdiv(pixels, _TILE_PIXELS), kernels.cdiv(C, _TILE_CHANNELS))
    taps = weight.reshape(C, -1).t().contiguous()  # (K * K, C): a tap's weights load as vectors
    with _on_device(x):
        kernels.conv[grid](x, taps, taps if bias is None else bias, out,
                           out if cast is None else cast, pixels, H, W, C, K=weight.shape[-1],
                           HAS_BIAS=bias is not None, ADD_INPUT=add_input,
                           STORE_CAST=cast is not None, WIDE=x.numel() >= _WIDE_FROM,
                           BLOCK_P=_TILE_PIXELS, BLOCK_C=_TILE_CHANNELS, num_warps=_TILE_WARPS)
    return out


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.device.type == 'cuda' else contextlib.nullcontext()


class _TritonDepthwiseFunction(torch.autograd.Function):
    """``x + conv(x)`` (``add_input``) or ``conv(x)`` for a stride-1 'same' depth-wise ``conv``
    on channels-last maps, with the Triton kernels of :func:`_build_triton_depthwise`.

    The compute dtype is the weight's (callers cast weight and bias for autocast; ``x`` is
    rounded inside the kernel, which saves autocast's separate cast). Backward: the input
    gradient is the same convolution of the output gradient with the kernel turned by 180
    degrees (the transpose of a stride-1 'same' convolution), and the weight gradient is
    saved only when needed, with the input in the compute dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, add_input: bool, kernels):
        needs_weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        cast = None
        if needs_weight_grad and x.dtype != weight.dtype:
            cast = torch.empty_like(x, dtype=weight.dtype, memory_format=torch.channels_last)
        out = _launch_depthwise(kernels, x, weight, bias, add_input, cast=cast)
        saved = (x if cast is None else cast) if needs_weight_grad else None
        ctx.save_for_backward(saved, weight)
        ctx.add_input, ctx.has_bias, ctx.x_dtype, ctx.kernels = (add_input, bias is not None,
                                                                 x.dtype, kernels)
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernels, need = ctx.kernels, ctx.needs_input_grad
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if need[0]:
            grad_x = _launch_depthwise(kernels, grad, weight.flip(-2, -1).contiguous(), None,
                                       ctx.add_input, ctx.x_dtype)
        if need[1] or need[2]:
            B, C, H, W = grad.shape
            K = weight.shape[-1]
            blocks = kernels.cdiv(B * H * W, _TILE_PIXELS)
            programs = min(blocks, _WEIGHT_GRAD_PROGRAMS)
            taps = kernels.next_power_of_2(K * K + 1)
            partial = grad.new_empty((programs, taps, C), dtype=torch.float32)
            if programs:  # none for an empty batch, whose sums are zero
                with _on_device(grad):
                    kernels.weight_grad[(programs, kernels.cdiv(C, _TILE_CHANNELS))](
                        grad, x, partial, B * H * W, H, W, C, blocks, K=K, TAPS=taps,
                        WIDE=grad.numel() >= _WIDE_FROM, BLOCK_P=_TILE_PIXELS,
                        BLOCK_C=_TILE_CHANNELS, num_warps=_TILE_WARPS)
            sums = partial.sum(0)
            grad_w = sums[:K * K].t().reshape(weight.shape).to(weight.dtype) if need[1] else None
            grad_b = sums[K * K].to(weight.dtype) if need[2] and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gpu_capability(device: torch.device) -> Tuple[int, int]:
    """(major, minor) CUDA compute capability of a GPU (a CUDA tensor's device names its index);
    (0, 0) on ROCm, where the Triton kernels have not been checked."""
    if torch.version.hip is not None:
        return (0, 0)
    return torch.cuda.get_device_capability(device)


# Whether the Triton kernels serve a (device, compute dtype), decided once for each (the
# capability query and the self-check run only then).
_TRITON_READY: Dict[Tuple[torch.device, torch.dtype], bool] = {}


def _triton_ready(x: torch.Tensor, compute: torch.dtype) -> bool:
    """Whether the Triton kernels serve ``x``'s GPU computing in ``compute``.

    Triton builds for NVIDIA GPUs of compute capability 7.0 (Volta) and newer (what torch's
    inductor requires of it), and bf16 arithmetic from 8.0 (Ampere). On those, the first call
    for each GPU and dtype runs :func:`_triton_self_check` (not while a CUDA graph is being
    captured; the question waits for a later call).
    """
    key = (x.device, compute)
    if key not in _TRITON_READY:
        if _gpu_capability(x.device) < ((8, 0) if compute == torch.bfloat16 else (7, 0)):
            _TRITON_READY[key] = False
        elif x.device.type == 'cuda' and torch.cuda.is_current_stream_capturing():
            return False
        else:
            _TRITON_READY[key] = _triton_self_check(x.device, compute)
    return _TRITON_READY[key]


def _triton_check_problem(device: torch.device, compute: torch.dtype) -> Optional[str]:
    """What :func:`_triton_self_check` finds wrong, or None."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    # A (2, 40, 9, 13) channels-last map: two channel tiles, the second partly filled.
    x, weight, bias = draw(2, 9, 13, 40).permute(0, 3, 1, 2), draw(40, 1, 3, 3), draw(40)
    grad = draw(2, 9, 13, 40).permute(0, 3, 1, 2)
    expected = [t.requires_grad_() for t in (x.clone(), weight.clone(), bias.clone())]
    out = expected[0] + F.conv2d(*expected, padding=1, groups=40)
    out.backward(grad)
    expected = [out.detach()] + [t.grad for t in expected]
    # The map in the compute dtype, and (fp16/bf16) as autocast hands it over: a float32 map
    # with weights in the compute dtype, rounded inside the kernel (the cast-copy path).
    for x_dtype in dict.fromkeys((compute, torch.float32)):
        mixed = '' if x_dtype == compute else f' (a {x_dtype} map, {compute} weights)'
        try:
            with torch.autocast(device.type, enabled=False):
                inputs = [x.to(device, x_dtype).requires_grad_()] + [
                    t.to(device, compute).requires_grad_() for t in (weight, bias)]
                out = _TritonDepthwiseFunction.apply(*inputs, True, _triton_depthwise())
                out.backward(grad.to(device, out.dtype))
            got = [out.detach()] + [t.grad for t in inputs]
        except Exception as exc:  # any failure to build or run: reported, never silent
            return f'failed{mixed}: {type(exc).__name__}: {exc}'
        wrong = [name for name, a, b in zip(('output', 'input grad', 'weight grad', 'bias grad'),
                                            got, expected)
                 if not (a.double().cpu() - b).abs().max() <= (
                     16 * torch.finfo(compute).eps * max(1., b.abs().max().item()))]
        if wrong:
            return f'computed wrong {", ".join(wrong)}{mixed}'
    return None


def _triton_self_check(device: torch.device, compute: torch.dtype) -> bool:
    """A small position encoding through the Triton kernels on ``device`` in ``compute``, forward
    and backward, against the float64 CPU convolution. If the kernels fail to build or run (a
    Triton that cannot find the CUDA driver, say) or compute wrong numbers, a warning says so
    and PyTorch's depth-wise kernel serves instead: training goes on, and the message names
    the problem.

    Runs in a thread of its own: grad mode, inference mode, autocast and saved-tensor hooks are
    per thread, so wherever the first call comes from (inference mode, or a block under
    ``torch.utils.checkpoint``, whose hooks would otherwise capture the check's own graph) the
    check sees none of it."""
    result: List[Optional[str]] = []

    def check() -> None:
        with torch.inference_mode(False), torch.enable_grad():
            result.append(_triton_check_problem(device, compute))

    thread = threading.Thread(target=check, name='davit_mm-triton-self-check', daemon=True)
    thread.start()
    thread.join()
    problem = result[0] if result else 'failed: the check thread ended without an answer'
    if problem is not None:
        warnings.warn(f'davit_mm: the Triton depth-wise kernels {problem} (on {device}, '
                      f'{compute}); the position encodings use PyTorch\'s depth-wise kernel '
                      f'instead', RuntimeWarning)
    return problem is None


def _triton_depthwise_fits(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """A stride-1 'same' depth-wise conv with an odd square kernel, on a channels-last map of a
    dtype the kernels take (the weight's, outside autocast, as ``nn.Conv2d`` demands), on a GPU
    Triton compiles for."""
    k = conv.kernel_size[0]
    autocast = _autocast_dtype('cuda')
    compute = autocast or conv.weight.dtype
    return (_is_depthwise(conv) and conv.kernel_size == (k, k) and k % 2 == 1
            and conv.stride == (1, 1) and conv.padding == (k // 2, k // 2)
            and conv.dilation == (1, 1) and conv.padding_mode == 'zeros'
            and x.dtype in _TRITON_DTYPES and compute in _TRITON_DTYPES
            and (x.dtype == conv.weight.dtype or autocast is not None)
            and x.is_contiguous(memory_format=torch.channels_last)
            and _triton_depthwise() is not None and _triton_ready(x, compute))


def _depthwise_triton(conv: nn.Conv2d, x: torch.Tensor, add_input: bool) -> torch.Tensor:
    weight, bias = _in_autocast_dtype('cuda', conv.weight.contiguous(), conv.bias)
    if not _needs_grad(x, weight, bias):  # an autograd Function would see the weight's flag
        return _launch_depthwise(_triton_depthwise(), x, weight, bias, add_input)
    return _TritonDepthwiseFunction.apply(x, weight, bias, add_input, _triton_depthwise())


class _AtenDepthwiseFunction(torch.autograd.Function):
    """PyTorch's depth-wise kernel (``aten::_conv_depthwise2d``) with its backward computed with
    cuDNN off: autograd's own backward of it goes through ``convolution_backward``, which picks
    cuDNN (an execution plan per new input shape) for fp16/bf16 maps. The same maths."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel_size, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, bias is not None)
        return _CUDA_DEPTHWISE(x, weight, kernel_size, bias, stride, padding, dilation)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conv
        need = ctx.needs_input_grad
        with torch.backends.cudnn.flags(enabled=False):
            grad_x, grad_w, grad_b = _CONVOLUTION_BACKWARD(
                grad.contiguous(), x, weight, [weight.shape[0]] if has_bias else None,
                list(stride), list(padding), list(dilation), False, [0, 0], x.shape[1],
                [need[0], need[1], need[2] and has_bias])
        return grad_x, grad_w, grad_b, None, None, None, None


def _depthwise_cuda(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    x, weight, bias = _in_autocast_dtype('cuda', x, conv.weight, conv.bias)
    x, weight = x.contiguous(), weight.contiguous()
    if not _needs_grad(x, weight, bias):
        return _CUDA_DEPTHWISE(x, weight, conv.kernel_size, bias, conv.stride, conv.padding,
                               conv.dilation)
    return _AtenDepthwiseFunction.apply(x, weight, bias, conv.kernel_size, conv.stride,
                                        conv.padding, conv.dilation)


def _conv_cuda(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if conv.padding_mode != 'zeros' or conv.dilation != (1, 1):
        return conv(x)
    if _is_depthwise(conv):
        return conv(x) if _CUDA_DEPTHWISE is None else _depthwise_cuda(x, conv)
    return _conv_as_matmul(x, conv) if conv.groups == 1 else conv(x)


def _patch_matmul_pays_on_cpu(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """CPU training with AVX2 kernels: a 2x2/s2 downsample trains faster as a reshape and a
    matmul than through oneDNN's convolution backward on channels-last maps (DaViT-T forward +
    backward 0.86 -> 0.80 of the reference's time; docs/benchmark.md). With AVX-512 kernels it
    measured no gain, and at inference the convolution measured faster."""
    return (_CPU_CAPABILITY == 'AVX2' and _fast(x, 'cpu') and _tiles_input(conv, x)
            and _needs_grad(x, conv.weight, conv.bias))


def _onednn_conv_fits(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor) -> bool:
    """oneDNN's conv + add serves CPU fp32 inference on channels-last maps."""
    return (_ONEDNN_CONV is not None and _fast(x, 'cpu') and conv.padding_mode == 'zeros'
            and not _needs_grad(x, conv.weight, conv.bias, residual)
            and x.dtype == conv.weight.dtype == residual.dtype == torch.float32
            and _autocast_dtype('cpu') is None and residual.shape == x.shape
            and x.is_contiguous(memory_format=torch.channels_last)
            and residual.is_contiguous(memory_format=torch.channels_last))


def conv2d(conv: nn.Conv2d, x: torch.Tensor,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv(x)`` (plus ``residual`` if given) for ``(B, C, H, W)`` tensors, on CUDA without
    cuDNN and on CPU with the addition fused at inference (see the module docs)."""
    if residual is not None and _onednn_conv_fits(conv, x, residual):
        return _ONEDNN_CONV(x, residual, conv.weight, conv.bias, list(conv.padding),
                            list(conv.stride), list(conv.dilation), conv.groups, 'add', None,
                            None, [], None)
    if _fast(x, 'cuda'):
        if _triton_depthwise_fits(conv, x):
            out = _depthwise_triton(conv, x, add_input=residual is x)  # a position encoding
            return out if residual is None or residual is x else residual + out
        out = _conv_cuda(conv, x)
    elif _patch_matmul_pays_on_cpu(conv, x):
        out = _conv_as_matmul(x, conv)
    else:
        out = conv(x)
    return out if residual is None else residual + out
