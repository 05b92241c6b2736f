"""DaViT: Dual Attention Vision Transformer (Ding et al., ECCV 2022) as a dense-prediction backbone.

Each stage alternates a spatial-window attention block with a channel-group attention block. The
numerics follow the official implementation exactly (ceil-mode padding of stem, downsample and
windows; drop-path schedule over ``2 * sum(depths)`` rates; init), and Florence-2's DaViT variant
(overlapped downsample, channel attention v2, window 12) is a set of switches on the same modules.

Layout: inside the backbone every feature map travels as a channels-last ``(B, H, W, C)`` tensor, so
LayerNorm and Linear act on the last dimension without copies and the depth-wise convolutions see
``channels_last`` views. Conversion to the ``(B, C, H, W)`` tensors that necks expect happens once per
returned stage, in :meth:`DaViT.forward`.

Linear and convolution layers are called through :mod:`davit_mm.ops`, which computes the same maths
with kernels chosen per device (oneDNN fusions on CPU; no cuDNN convolutions on CUDA, whose per-shape
planning costs seconds at every new input size) and the plain PyTorch ops while tracing or exporting.
"""
import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.model.weight_init import BaseInit, PretrainedInit, trunc_normal_
from mmengine.registry import WEIGHT_INITIALIZERS
from torch.nn.modules.batchnorm import _BatchNorm

from davit_mm import ops

ArchSpec = Dict[str, object]

# Variants are data: widths per stage, blocks per stage, heads (= channel groups) per stage, and the
# Florence-2 switches. Head/group width is 32 everywhere.
ARCH_ZOO: Dict[str, ArchSpec] = {
    'tiny': dict(embed_dims=96, depths=(1, 1, 3, 1), num_heads=(3, 6, 12, 24)),
    'small': dict(embed_dims=96, depths=(1, 1, 9, 1), num_heads=(3, 6, 12, 24)),
    'base': dict(embed_dims=128, depths=(1, 1, 9, 1), num_heads=(4, 8, 16, 32)),
    'large': dict(embed_dims=192, depths=(1, 1, 9, 1), num_heads=(6, 12, 24, 48)),
    'huge': dict(embed_dims=256, depths=(1, 1, 9, 1), num_heads=(8, 16, 32, 64)),
    'giant': dict(embed_dims=384, depths=(1, 1, 12, 3), num_heads=(12, 24, 48, 96)),
    # Florence-2's vision towers (Florence-2-base and Florence-2-large).
    'florence2-base': dict(embed_dims=128, depths=(1, 1, 9, 1), num_heads=(4, 8, 16, 32),
                           window_size=12, overlapped_downsample=True, channel_attention='v2'),
    'florence2-large': dict(embed_dims=256, depths=(1, 1, 9, 1), num_heads=(8, 16, 32, 64),
                            window_size=12, overlapped_downsample=True, channel_attention='v2'),
}
ARCH_ALIASES: Dict[str, str] = {'t': 'tiny', 's': 'small', 'b': 'base', 'l': 'large', 'h': 'huge',
                                'g': 'giant'}
_REQUIRED_ARCH_KEYS = ('embed_dims', 'depths', 'num_heads')
# The paper's settings, for arch dicts and names that do not set them (Florence-2's do).
ARCH_DEFAULTS: ArchSpec = dict(window_size=7, overlapped_downsample=False, channel_attention='v1')
_OPTIONAL_ARCH_KEYS = tuple(ARCH_DEFAULTS)
CHANNEL_ATTENTION_VERSIONS = ('v1', 'v2')
# The keys DaViT.init_weights reads from dict(type='Pretrained', ...).
PRETRAINED_KEYS = ('type', 'checkpoint', 'prefix', 'format', 'map_location')


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """A free view: the result has ``channels_last`` strides, which convolutions keep."""
    return x.permute(0, 3, 1, 2)


def _nchw_to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _pad_bottom_right(x: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, int, int]:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom and right to ``multiple * n`` rows and
    ``multiple * m`` columns; returns the map, ``n`` and ``m`` (``ceil(H / multiple)``, ...)."""
    H, W = x.shape[1], x.shape[2]
    # Sizes written as multiples of the counts, never as remainders, so that a graph exported
    # with dynamic H/W can prove every later view of the padded map (see docs/backbone.md).
    n, m = (H + multiple - 1) // multiple, (W + multiple - 1) // multiple
    # A zero pad would still copy, so eager mode skips it; traced and exported graphs always pad,
    # so that they hold for every input size (ops.is_tracing() comes first: no shape guard).
    if ops.is_tracing() or n * multiple != H or m * multiple != W:
        x = F.pad(x, (0, 0, 0, m * multiple - W, 0, n * multiple - H))
    return x, n, m


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on the last dimension, optionally added to ``residual``.

    Written out rather than taken from mmcv's ``FFN``: that brick wraps ``forward`` in a deprecation
    decorator that calls ``inspect.getfullargspec`` on every call (overhead on the hot path and a
    graph break under ``torch.compile``), and it could not use the fused kernels of
    :func:`davit_mm.ops.mlp`.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.mlp(x, self.fc1, self.fc2, residual)


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: ``x + DWConv3x3(x)`` on a ``(B, H, W, C)`` map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _nhwc_to_nchw(x)
        return _nchw_to_nhwc(ops.conv2d(self.proj, x, residual=x))


class Stem(nn.Module):
    """Patch embedding: pad to a multiple of 4, Conv 7x7 stride 4 (pad 3), LayerNorm.

    Takes a ``(B, C, H, W)`` image and returns a ``(B, ceil(H/4), ceil(W/4), C')`` map.
    """

    stride = 4

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=self.stride, padding=3)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[2] % self.stride, -x.shape[3] % self.stride
        if ops.is_tracing() or pad_h or pad_w:  # see _pad_bottom_right
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(_nchw_to_nhwc(ops.conv2d(self.conv, x)))


class Downsample(nn.Module):
    """LayerNorm, then a stride-2 conv: 2x2 (pad the map to even first), or 3x3 with padding 1
    when ``overlapped`` (Florence-2). Both give ``ceil(H/2) x ceil(W/2)``."""

    def __init__(self, in_channels: int, out_channels: int, overlapped: bool = False) -> None:
        super().__init__()
        self.overlapped = overlapped
        self.norm = nn.LayerNorm(in_channels)
        kernel_size, padding = (3, 1) if overlapped else (2, 0)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if not self.overlapped:
            # A 3x3/s2/p1 conv already yields ceil(H/2) and reads zeros past the edge, exactly as
            # the official pad-to-even does; only the 2x2 conv needs the explicit pad.
            x = _pad_bottom_right(x, 2)[0]
        return _nchw_to_nhwc(ops.conv2d(self.conv, _nhwc_to_nchw(x)))


class _ProjectedAttention(nn.Module):
    """What both attentions share: a qkv projection in, an output projection out, and a ``fused``
    switch between the fast path and the plain reference path (both use the same weights)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, fused: bool) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, tokens: torch.Tensor, heads: int):
        """``(B, N, C)`` tokens -> q, k, v as ``(B, heads, N, head_dim)`` views."""
        return ops.split_heads(ops.linear(tokens, self.qkv), 3, heads)


class WindowAttention(_ProjectedAttention):
    """Multi-head self-attention inside non-overlapping ``window_size`` windows.

    As in the official DaViT: the map is zero-padded at the bottom/right to whole windows, the
    padded tokens take part as keys and values (no mask), there is no shift and no relative
    position bias, and the result is cropped back.

    Args:
        dim (int): Channels.
        num_heads (int): Attention heads; ``dim`` must be divisible by it.
        window_size (int): Window side in tokens.
        qkv_bias (bool): Bias in the qkv projection. Defaults to True.
        fused (bool): Use :func:`davit_mm.ops.attention` (``F.scaled_dot_product_attention``
            but on CPU in bf16/fp16). False runs the plain reference path
            (explicit ``softmax(q k^T * d^-0.5) v``); both share weights. Defaults to True.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 fused: bool = True) -> None:
        super().__init__(dim, num_heads, qkv_bias, fused)
        self.num_heads = num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``, plus ``residual`` if given."""
        B, H, W, C = x.shape
        ws = self.window_size
        x, nh, nw = _pad_bottom_right(x, ws)
        # Rows of windows are independent: CPU inference takes them in cache-sized bands
        # (davit_mm.ops.inference_blocks, sized by the band's qkv); elsewhere one band.
        bands = ops.inference_blocks(x, nh, B * ws * nw * ws * 3 * C * x.element_size(),
                                     params=(*self.qkv.parameters(), *self.proj.parameters()))
        if len(bands) == 1:
            return self._attend(x, nh, nw, H, W, residual)
        out = x.new_empty(B, H, W, C)
        for band in bands:
            top, bottom = band.start * ws, min(band.stop * ws, H)
            out[:, top:bottom] = self._attend(
                x[:, band.start * ws:band.stop * ws], band.stop - band.start, nw, bottom - top, W,
                None if residual is None else residual[:, top:bottom])
        return out

    def _attend(self, x: torch.Tensor, nh: int, nw: int, H: int, W: int,
                residual: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention in the ``nh x nw`` windows of a padded ``(B, nh * ws, nw * ws, C)`` map,
        cropped to ``H x W``."""
        B, C = x.shape[0], x.shape[-1]
        ws, heads = self.window_size, self.num_heads
        Hp, Wp = nh * ws, nw * ws
        # Partition: (B, nh, ws, nw, ws, C) -> (B * nh * nw, ws * ws, C); one copy.
        windows = x.view(B, nh, ws, nw, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(
            B * nh * nw, ws * ws, C)
        q, k, v = self._qkv(windows, heads)
        if self.fused:
            out = ops.attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = attn @ v
        # Merge heads and reverse the partition in one copy:
        # (B, nh, nw, heads, ws, ws, d) -> (B, nh, ws, nw, ws, heads, d) -> (B, Hp, Wp, C).
        out = out.view(B, nh, nw, heads, ws, ws, self.head_dim).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, Hp, Wp, C)
        if ops.is_tracing():
            # Crop with a negative pad, which copies: a slice is contiguous only when nothing was
            # padded, and an exported graph would keep a stride guard for the example's case.
            out = F.pad(out, (0, 0, 0, W - Wp, 0, H - Hp))
        elif Hp != H or Wp != W:
            out = out[:, :H, :W]
        return ops.linear(out, self.proj, residual=residual)


class ChannelAttention(_ProjectedAttention):
    """Channel group attention: each group of ``dim // num_groups`` channels attends over channels,
    with attention logits that sum over all ``N`` tokens.

    - ``'v1'`` (DaViT): ``A = softmax((k * d^-0.5)^T v)``, ``out = q A^T``.
    - ``'v2'`` (Florence-2): ``A = softmax((q * N^-0.5)^T k)``, ``out = v A^T``.

    The fused path computes the same maths in fewer steps. The attended projection (q in v1, v in
    v2) is linear in the tokens, and so is the output projection, so for group ``g``
    ``proj(out)`` is ``tokens @ (W_p blockdiag(A_g W_g))^T`` plus a bias: one ``C x C`` weight per
    image (:func:`davit_mm.ops.batched_linear`), built from the weights and ``A`` at
    ``C^2 d`` (+ ``C^3`` with the projection) multiply-adds per image. The attended projection
    and ``out`` are never computed, and only the two projections the logits need are. The output
    projection is folded in where that costs less than applying it (``N >= C``) and the model
    is not being exported (an exported graph holds for every size; ``torch.compile`` folds);
    ``tools/analysis/get_flops.py`` counts the paper's steps (``fused=False``).

    The ``d x d`` logits, their softmax and the folded weights are computed in float32 even
    under fp16/bf16 autocast: the logits sum over every token of the map, and at detection
    resolutions that overflows fp16.

    Args:
        dim (int): Channels.
        num_groups (int): Channel groups; ``dim`` must be divisible by it.
        qkv_bias (bool): Bias in the qkv projection. Defaults to True.
        version (str): ``'v1'`` or ``'v2'``. Defaults to ``'v1'``.
        fused (bool): False runs the plain reference path (the official expression order, in the
            input dtype). Defaults to True.
    """

    # Which of q, k, v (0, 1, 2) make the logits (left^T right) and which one is attended.
    ROLES = {'v1': (1, 2, 0), 'v2': (0, 1, 2)}

    def __init__(self, dim: int, num_groups: int, qkv_bias: bool = True, version: str = 'v1',
                 fused: bool = True) -> None:
        if version not in CHANNEL_ATTENTION_VERSIONS:
            raise ValueError(f'channel_attention={version!r} is not supported; accepted: '
                             f'{CHANNEL_ATTENTION_VERSIONS}')
        super().__init__(dim, num_groups, qkv_bias, fused)
        self.num_groups = num_groups
        self.version = version

    def _scale(self, N: int) -> float:
        return self.head_dim ** -0.5 if self.version == 'v1' else N ** -0.5

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``, plus ``residual`` if given."""
        B, H, W, C = x.shape
        N = H * W
        tokens = x.reshape(B, N, C)
        if not self.fused:
            qkv = self._qkv(tokens, self.num_groups)  # each (B, G, N, d)
            left, right, values = (qkv[i] for i in self.ROLES[self.version])
            attn = ((left * self._scale(N)).transpose(-1, -2) @ right).softmax(dim=-1)
            out = (values @ attn.transpose(-1, -2)).transpose(1, 2).reshape(B, H, W, C)
            return ops.linear(out, self.proj, residual=residual)
        first, second, attended = self.ROLES[self.version]
        # The logits' two projections, side by side in the qkv weight (k, v or q, k).
        rows = slice(min(first, second) * C, (max(first, second) + 1) * C)
        bias = None if self.qkv.bias is None else self.qkv.bias[rows]
        pair = ops.split_heads(ops.linear(tokens, (self.qkv.weight[rows], bias)), 2,
                               self.num_groups)
        # Exporting first: an exporter would otherwise record ``N >= C`` of the example input as
        # a condition on every input size.
        fold_proj = not ops.is_exporting() and N >= C
        # float32 at least (float64 stays float64): a sum over all N tokens per logit.
        acc = torch.promote_types(tokens.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            # Scaling the d x d product instead of an N x d operand: same maths, less work.
            logits = ops.drop_negligible_grad(
                pair[0].to(acc).transpose(-1, -2) @ pair[1].to(acc)) * self._scale(N)
            weight, bias = self._fold(logits.softmax(dim=-1), attended, fold_proj)
        weight, bias = weight.to(tokens.dtype), None if bias is None else bias.to(tokens.dtype)
        if fold_proj:
            residual = None if residual is None else residual.reshape(B, N, C)
            return ops.batched_linear(tokens, weight, bias, residual).view(B, H, W, C)
        out = ops.batched_linear(tokens, weight, bias).view(B, H, W, C)
        return ops.linear(out, self.proj, residual=residual)

    def _fold(self, attn: torch.Tensor, attended: int, fold_proj: bool):
        """Per-image ``(B, C, C)`` weight and ``(B, C)`` bias (or None), in ``attn``'s dtype
        (float32 or float64), that map the tokens to the attention's output: group ``g`` gives
        ``tokens @ (A_g W_g)^T + A_g b_g`` (``W_g``, ``b_g``: its rows of the attended
        projection), and with ``fold_proj`` the output projection is applied to both."""
        B, G, d, _ = attn.shape
        C = G * d
        acc = attn.dtype
        rows = slice(attended * C, (attended + 1) * C)
        weight = (attn @ self.qkv.weight[rows].to(acc).view(G, d, C)).reshape(B, C, C)
        bias = None
        if self.qkv.bias is not None:
            bias = (attn @ self.qkv.bias[rows].to(acc).view(G, d, 1)).reshape(B, C)
        if fold_proj:
            proj_weight = self.proj.weight.to(acc)
            weight = proj_weight @ weight
            bias = self.proj.bias.to(acc).expand(B, C) if bias is None else torch.addmm(
                self.proj.bias.to(acc), bias, proj_weight.t())
        return weight, bias


class DualAttentionBlock(nn.Module):
    """The block shape both DaViT blocks share, on a ``(B, H, W, C)`` map::

        x = x + DWConv(x);  x = x + DropPath(Attn(LN(x)))
        x = x + DWConv(x);  x = x + DropPath(MLP(LN(x)))

    ``SpatialBlock`` and ``ChannelBlock`` differ only in ``attn``.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4., drop_path: float = 0.,
                 with_cp: bool = False) -> None:
        super().__init__()
        self.cpe1 = ConvPosEnc(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.cpe2 = ConvPosEnc(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.with_cp = with_cp

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x)
        if self.training and isinstance(self.drop_path, DropPath):
            drop_prob = self.drop_path.drop_prob
            x = ops.add_dropped_path(x, self.attn(self.norm1(x)), drop_prob)
            x = self.cpe2(x)
            return ops.add_dropped_path(x, self.mlp(self.norm2(x)), drop_prob)
        # No drop path: the residual additions go into the projections (see davit_mm.ops.linear).
        x = self.attn(self.norm1(x), residual=x)
        x = self.cpe2(x)
        return self.mlp(self.norm2(x), residual=x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not under torch.jit.trace: a checkpointed block traces to differing graphs (its check
        # fails), and a traced graph is for inference.
        if self.with_cp and torch.is_grad_enabled() and not torch.jit.is_tracing():
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class SpatialBlock(DualAttentionBlock):
    """DaViT block with window attention (spatial tokens)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_path: float = 0., with_cp: bool = False) -> None:
        super().__init__(dim, WindowAttention(dim, num_heads, window_size, qkv_bias), mlp_ratio,
                         drop_path, with_cp)


class ChannelBlock(DualAttentionBlock):
    """DaViT block with channel group attention (channel tokens)."""

    def __init__(self, dim: int, num_groups: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop_path: float = 0., version: str = 'v1', with_cp: bool = False) -> None:
        super().__init__(dim, ChannelAttention(dim, num_groups, qkv_bias, version), mlp_ratio,
                         drop_path, with_cp)


class DaViTLayer(nn.Module):
    """One DaViT layer: a SpatialBlock followed by a ChannelBlock."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_paths: Tuple[float, float], channel_attention: str,
                 with_cp: bool) -> None:
        super().__init__()
        self.spatial_block = SpatialBlock(dim, num_heads, window_size, mlp_ratio, qkv_bias,
                                          drop_paths[0], with_cp)
        self.channel_block = ChannelBlock(dim, num_heads, mlp_ratio, qkv_bias, drop_paths[1],
                                          channel_attention, with_cp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_block(self.spatial_block(x))


class DaViTStage(nn.Module):
    """An optional :class:`Downsample` followed by ``depth`` :class:`DaViTLayer` s."""

    def __init__(self, downsample: Optional[Downsample], layers: List[DaViTLayer]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


def resolve_arch(arch: Union[str, dict], **overrides) -> ArchSpec:
    """Turn ``arch`` (a name, an alias or a dict) into a validated spec with per-stage lists and
    every optional setting (:data:`ARCH_DEFAULTS`) filled in; ``overrides`` that are not None
    (``window_size=``, ``overlapped_downsample=``, ``channel_attention=``) replace the arch's.

    Raises:
        TypeError: ``arch`` is neither a str nor a dict, or a field has the wrong type.
        ValueError: unknown name, missing/unknown keys, inconsistent lengths, or widths not
            divisible by the heads.
    """
    if isinstance(arch, str):
        name = ARCH_ALIASES.get(arch.lower(), arch.lower())
        if name not in ARCH_ZOO:
            accepted = sorted(ARCH_ZOO) + sorted(ARCH_ALIASES)
            raise ValueError(f'arch={arch!r} is not a known DaViT variant; accepted names: '
                             f'{accepted}, or a dict with keys {list(_REQUIRED_ARCH_KEYS)}')
        spec = dict(ARCH_ZOO[name])
    elif isinstance(arch, dict):
        missing = [key for key in _REQUIRED_ARCH_KEYS if key not in arch]
        if missing:
            raise ValueError(f'arch dict {arch!r} is missing keys {missing}; required: '
                             f'{list(_REQUIRED_ARCH_KEYS)}, optional: {list(_OPTIONAL_ARCH_KEYS)}')
        unknown = [key for key in arch if key not in _REQUIRED_ARCH_KEYS + _OPTIONAL_ARCH_KEYS]
        if unknown:
            raise ValueError(f'arch dict has unknown keys {unknown}; accepted: '
                             f'{list(_REQUIRED_ARCH_KEYS + _OPTIONAL_ARCH_KEYS)}')
        spec = dict(arch)
    else:
        raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}: {arch!r}')

    depths = _int_tuple('arch.depths', spec['depths'])
    num_stages = len(depths)
    if num_stages == 0 or any(d < 1 for d in depths):
        raise ValueError(f'arch.depths={spec["depths"]!r}: need at least one stage and every depth >= 1')
    num_heads = _int_tuple('arch.num_heads', spec['num_heads'])
    embed_dims = spec['embed_dims']
    if _is_int(embed_dims):
        embed_dims = tuple(int(embed_dims) * 2 ** i for i in range(num_stages))
    else:
        embed_dims = _int_tuple('arch.embed_dims', embed_dims, 'an int or a list/tuple of ints')
    for key, values in (('embed_dims', embed_dims), ('num_heads', num_heads)):
        if len(values) != num_stages:
            raise ValueError(f'arch.{key}={values!r} has {len(values)} entries but arch.depths has '
                             f'{num_stages} stages')
        if any(v < 1 for v in values):
            raise ValueError(f'arch.{key}={values!r}: every entry must be >= 1')
    for stage, (dim, heads) in enumerate(zip(embed_dims, num_heads)):
        if dim % heads:
            raise ValueError(f'arch.embed_dims[{stage}]={dim} is not divisible by '
                             f'arch.num_heads[{stage}]={heads}')
    unknown = [key for key in overrides if key not in ARCH_DEFAULTS]
    if unknown:
        raise TypeError(f'resolve_arch() got unknown settings {unknown}; accepted: {list(ARCH_DEFAULTS)}')
    spec = {**ARCH_DEFAULTS, **spec, **{k: v for k, v in overrides.items() if v is not None}}
    spec.update(embed_dims=embed_dims, depths=depths, num_heads=num_heads)
    return spec


# Arguments of mmdet's/mmseg's ResNet and Swin backbones that DaViT does not have: left over from a
# base config's backbone when a DaViT dict is merged into it without _delete_=True.
_OTHER_BACKBONES_ARGUMENTS = frozenset({
    'depth', 'num_stages', 'strides', 'dilations', 'style', 'deep_stem', 'avg_down', 'norm_cfg',
    'stage_with_dcn', 'dcn', 'plugins', 'contract_dilation', 'base_channels', 'stem_channels',
    'patch_size', 'patch_norm', 'convert_weights', 'qk_scale', 'drop_rate', 'attn_drop_rate',
    'act_cfg', 'pretrain_img_size'})


def _is_int(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_tuple(name: str, value, accepted: str = 'a list/tuple of ints') -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise TypeError(f'{name} must be {accepted}, got {value!r}')
    return tuple(int(v) for v in value)


class DaViT(BaseModule):
    """DaViT backbone returning multi-scale ``(B, C_i, H / 2^(i+2), W / 2^(i+2))`` feature maps.

    Args:
        arch (str | dict): ``'tiny' | 'small' | 'base' | 'large' | 'huge' | 'giant'`` (aliases
            ``t/s/b/l/h/g``), ``'florence2-base' | 'florence2-large'`` (Florence-2's vision
            towers), or a dict with ``embed_dims`` (one width per stage, or an int for stage 1
            that doubles per stage), ``depths``, ``num_heads`` and optionally ``window_size``,
            ``overlapped_downsample``, ``channel_attention``. Defaults to ``'tiny'``.
        in_channels (int): Input image channels. Defaults to 3.
        window_size (int, optional): Window side of the spatial attention. Defaults to None: the
            arch's value (7 for the paper's variants, 12 for Florence-2).
        mlp_ratio (float): MLP hidden width over block width. Defaults to 4.
        qkv_bias (bool): Bias in the qkv projections. Defaults to True.
        drop_path_rate (float): Largest stochastic-depth rate; the rates rise linearly over the
            ``2 * sum(depths)`` blocks (spatial and channel blocks count separately), as in the
            official code. Defaults to 0.1.
        overlapped_downsample (bool, optional): 3x3/s2/p1 downsample convs instead of 2x2/s2.
            Defaults to None: the arch's value (False; True for Florence-2).
        channel_attention (str, optional): ``'v1'`` (DaViT) or ``'v2'`` (Florence-2). Defaults
            to None: the arch's value.
        out_indices (Sequence[int]): Stages to return, 0-based (negative counts from the end;
            returned in stage order). Output LayerNorms exist only for these and stages after the
            last one are not built, so nothing is left as unused parameters under DDP.
            Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing, 0 the stem, k the stem and stages 1..k with
            their downsamples and output norms (as mmdet's Swin). Frozen parts stay in eval mode.
            Defaults to -1.
        norm_eval (bool): Keep BatchNorm layers in eval mode during training. DaViT itself only
            has LayerNorms, so this matters only for modules swapped in by users. Defaults to False.
        with_cp (bool): Gradient checkpointing of every spatial and channel block (less memory,
            one more forward per block in backward). Defaults to False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH[, prefix=...])``
            loads any public DaViT checkpoint format (see :mod:`davit_mm.checkpoint`); None
            initialises as the official code does. Defaults to None.
        pretrained (str, optional): OpenMMLab 1.x's way of naming the checkpoint, still what
            mmseg's ``EncoderDecoder`` passes for a model-level ``pretrained=PATH``: taken as
            ``init_cfg=dict(type='Pretrained', checkpoint=PATH)``; not together with
            ``init_cfg``. Defaults to None.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 window_size: Optional[int] = None,
                 mlp_ratio: float = 4.,
                 qkv_bias: bool = True,
                 drop_path_rate: float = 0.1,
                 overlapped_downsample: Optional[bool] = None,
                 channel_attention: Optional[str] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None,
                 pretrained: Optional[str] = None,
                 **unknown) -> None:
        if unknown:
            raise TypeError(self._unknown_arguments(unknown))
        init_cfg = self._pretrained_as_init_cfg(pretrained, init_cfg)
        super().__init__(init_cfg=init_cfg)
        spec = resolve_arch(arch, window_size=window_size, overlapped_downsample=overlapped_downsample,
                            channel_attention=channel_attention)
        self.arch = arch
        self.embed_dims: Tuple[int, ...] = spec['embed_dims']
        self.depths: Tuple[int, ...] = spec['depths']
        self.num_heads: Tuple[int, ...] = spec['num_heads']
        self.window_size = spec['window_size']
        self.overlapped_downsample = bool(spec['overlapped_downsample'])
        self.channel_attention = spec['channel_attention']
        num_stages = len(self.depths)
        overrides = dict(window_size=window_size, overlapped_downsample=overlapped_downsample,
                         channel_attention=channel_attention)
        self._check_args(spec, overrides,
                         in_channels=in_channels, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_path_rate=drop_path_rate, out_indices=out_indices,
                         frozen_stages=frozen_stages, norm_eval=norm_eval, with_cp=with_cp,
                         init_cfg=init_cfg)
        # numpy's numbers pass the checks: plain ones from here on
        self.window_size, self.in_channels = int(self.window_size), int(in_channels)
        mlp_ratio, drop_path_rate = float(mlp_ratio), float(drop_path_rate)
        self.out_indices = tuple(sorted(int(i) % num_stages for i in out_indices))
        self.frozen_stages = int(frozen_stages)
        self.norm_eval = norm_eval
        self.with_cp = with_cp

        self.stem = Stem(self.in_channels, self.embed_dims[0])
        rates = torch.linspace(0, drop_path_rate, 2 * sum(self.depths)).tolist()
        # Stages after the last returned one are not built: they would be dead weight (and unused
        # parameters under DDP). Their checkpoint keys are reported as skipped when loading.
        self.stages = nn.ModuleList()
        first_layer = 0
        for i in range(self.out_indices[-1] + 1):
            dim, depth, heads = self.embed_dims[i], self.depths[i], self.num_heads[i]
            downsample = (Downsample(self.embed_dims[i - 1], dim, self.overlapped_downsample)
                          if i > 0 else None)
            layers = [
                DaViTLayer(dim, heads, self.window_size, mlp_ratio, qkv_bias,
                           (rates[2 * j], rates[2 * j + 1]), self.channel_attention, with_cp)
                for j in range(first_layer, first_layer + depth)
            ]
            self.stages.append(DaViTStage(downsample, layers))
            first_layer += depth
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.embed_dims[i]))
        # Convolutions see channels-last maps, so their weight gradients come out channels-last:
        # storing the weights that way too keeps DDP's gradient buckets copy-free, and lets the
        # stem write its output straight in the (B, H, W, C) layout.
        self.to(memory_format=torch.channels_last)
        self._freeze_stages()

    @staticmethod
    def _check_args(spec: ArchSpec, overrides: Dict[str, object], *, in_channels, mlp_ratio,
                    qkv_bias, drop_path_rate, out_indices, frozen_stages, norm_eval, with_cp,
                    init_cfg) -> None:
        """Check every argument (``spec``: the resolved arch; ``overrides``: the arguments that
        replace its optional settings, None where the arch's value is used)."""
        def is_number(v):  # numpy's too
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        def source(key):  # where an arch setting came from: the argument, or the arch dict
            return key if overrides[key] is not None else f'arch.{key}'

        num_stages = len(spec['depths'])
        if not _is_int(in_channels) or in_channels < 1:
            raise ValueError(f'in_channels={in_channels!r}: expected a positive int')
        window_size, channel_attention = spec['window_size'], spec['channel_attention']
        if not _is_int(window_size) or window_size < 1:
            raise ValueError(f'{source("window_size")}={window_size!r}: expected a positive int')
        if channel_attention not in CHANNEL_ATTENTION_VERSIONS:
            raise ValueError(f'{source("channel_attention")}={channel_attention!r}: accepted '
                             f'{CHANNEL_ATTENTION_VERSIONS}')
        flags = [(source('overlapped_downsample'), spec['overlapped_downsample']),
                 ('qkv_bias', qkv_bias), ('norm_eval', norm_eval), ('with_cp', with_cp)]
        for name, value in flags:
            if not isinstance(value, bool):
                raise TypeError(f'{name}={value!r}: expected True or False')
        narrowest = min(spec['embed_dims'])
        # int(): the MLP's hidden width is int(dim * mlp_ratio), as in the official code.
        if (not is_number(mlp_ratio) or not math.isfinite(mlp_ratio)
                or int(narrowest * mlp_ratio) < 1):
            raise ValueError(f'mlp_ratio={mlp_ratio!r}: expected a finite number > 0 that gives '
                             f'every MLP at least one hidden channel (int(width * mlp_ratio) >= 1; '
                             f'the narrowest stage here is {narrowest} wide)')
        if not is_number(drop_path_rate) or not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate={drop_path_rate!r}: expected a float in [0, 1)')
        if not isinstance(out_indices, (list, tuple)) or not all(_is_int(i) for i in out_indices):
            raise TypeError(f'out_indices must be a list/tuple of ints, got {out_indices!r}')
        if len(out_indices) == 0:
            raise ValueError(f'out_indices={out_indices!r} is empty; accepted: stage indices in '
                             f'[{-num_stages}, {num_stages - 1}]')
        bad = [i for i in out_indices if not -num_stages <= i < num_stages]
        if bad:
            raise ValueError(f'out_indices={out_indices!r} has {bad} out of range; this arch has '
                             f'{num_stages} stages, accepted indices in [{-num_stages}, '
                             f'{num_stages - 1}]')
        if len({i % num_stages for i in out_indices}) != len(out_indices):
            raise ValueError(f'out_indices={out_indices!r} names a stage twice')
        if not _is_int(frozen_stages) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages={frozen_stages!r}: accepted -1 (nothing frozen), 0 '
                             f'(stem) .. {num_stages} (stem and all stages)')
        if init_cfg is not None:
            DaViT._check_init_cfg(init_cfg)

    @staticmethod
    def _unknown_arguments(unknown: Dict[str, object]) -> str:
        """The message for arguments DaViT does not take: they are listed with the accepted ones,
        and settings of another backbone (a base config's ResNet or Swin, merged into the DaViT
        dict) get the ``_delete_=True`` that replaces it."""
        import inspect
        accepted = [name for name in inspect.signature(DaViT.__init__).parameters
                    if name not in ('self', 'unknown')]
        message = f'DaViT got unknown arguments {sorted(unknown)}; accepted: {accepted}'
        sizes = [key for key in _REQUIRED_ARCH_KEYS if key in unknown]
        if sizes:
            fields = ', '.join(f'{key}=...' for key in _REQUIRED_ARCH_KEYS)
            message += f'. {", ".join(sizes)} go into arch=dict({fields})'
        if set(unknown) & _OTHER_BACKBONES_ARGUMENTS:
            message += ('. These look like settings of the backbone DaViT replaces in a base config: '
                        'give the DaViT dict _delete_=True (model=dict(backbone=dict(_delete_=True, '
                        "type='DaViT', ...))) so that they are not merged into it")
        return message

    @staticmethod
    def _pretrained_as_init_cfg(pretrained, init_cfg):
        """``init_cfg`` with a ``pretrained`` path turned into a Pretrained init_cfg."""
        if pretrained is None:
            return init_cfg
        if not isinstance(pretrained, str):
            raise TypeError(f'pretrained={pretrained!r}: expected a checkpoint path or URL (str), '
                            f'or None')
        if init_cfg is not None:
            raise ValueError(
                f'pretrained={pretrained!r} and init_cfg={init_cfg!r} are both set; give the '
                f'checkpoint once (with davit_mm\'s configs, whose backbones set init_cfg: '
                f'model.backbone.init_cfg.checkpoint=PATH, not model.pretrained=PATH)')
        return dict(type='Pretrained', checkpoint=pretrained)

    @staticmethod
    def _check_init_cfg(init_cfg) -> None:
        """``init_weights`` loads ``dict(type='Pretrained', ...)`` with davit_mm's loader (every
        checkpoint format); any other dict, or a list of dicts, goes to mmengine's
        ``BaseModule.init_weights``, whose initializers (``WEIGHT_INITIALIZERS``) must know the
        type. A Pretrained entry in a list, or given as a class, would reach mmengine's
        ``PretrainedInit``, which loads only keys already in davit_mm's layout and warns about the
        rest, so it is refused."""
        others = sorted(key for key in WEIGHT_INITIALIZERS.module_dict if key != 'Pretrained')
        accepted = (f"None, dict(type='Pretrained', checkpoint=PATH) (optional keys "
                    f'{list(PRETRAINED_KEYS[2:])}), or mmengine weight-init dicts, alone or in a '
                    f'list, of the types {others}')
        listed = isinstance(init_cfg, (list, tuple))
        for cfg in init_cfg if listed else [init_cfg]:
            if not isinstance(cfg, dict):
                raise TypeError(f'init_cfg={init_cfg!r}: accepted {accepted}')
            kind = cfg.get('type')
            if kind == 'Pretrained' and not listed:
                unknown = [key for key in cfg if key not in PRETRAINED_KEYS]
                if unknown:
                    raise ValueError(f'init_cfg={init_cfg!r} has unknown keys {unknown}; '
                                     f"dict(type='Pretrained') accepts {list(PRETRAINED_KEYS)}")
            elif kind == 'Pretrained' or kind is PretrainedInit:
                raise ValueError(f'init_cfg={init_cfg!r}: pretrained weights load only from one '
                                 f"dict(type='Pretrained', checkpoint=PATH), not from a list or "
                                 f"type=PretrainedInit (mmengine's loader, which does not convert "
                                 f'checkpoints)')
            elif not (isinstance(kind, str) and WEIGHT_INITIALIZERS.get(kind) is not None
                      or isinstance(kind, type) and issubclass(kind, BaseInit)):
                raise ValueError(f'init_cfg={init_cfg!r}: type={kind!r} is not a known '
                                 f'initializer; accepted {accepted}')

    @property
    def out_channels(self) -> List[int]:
        """Channels of each returned map, in ``out_indices`` order (a neck's ``in_channels``)."""
        return [self.embed_dims[i] for i in self.out_indices]

    def set_fused_attention(self, enabled: bool) -> None:
        """Switch every attention between its fused path and its plain reference path."""
        for module in self.modules():
            if isinstance(module, (WindowAttention, ChannelAttention)):
                module.fused = enabled

    def init_weights(self) -> None:
        """Official init (truncated-normal Linear weights, zero biases, unit LayerNorms), then
        load ``init_cfg.checkpoint`` when ``init_cfg`` is ``Pretrained``."""
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from davit_mm.checkpoint import load_pretrained  # the checkpoint module imports this one
            self.apply(_official_init)
            load_pretrained(self, cfg.get('checkpoint'), prefix=cfg.get('prefix'),
                            format=cfg.get('format', 'auto'), map_location=cfg.get('map_location', 'cpu'))
            self._is_init = True
        elif cfg is None:
            self.apply(_official_init)
            self._is_init = True
        else:
            super().init_weights()
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.stem] + list(self.stages[:self.frozen_stages])
        frozen += [getattr(self, f'norm{i}') for i in self.out_indices if i < self.frozen_stages]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'DaViT':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``(B, in_channels, H, W)`` -> one ``(B, C_i, ceil(H / 2^(i+2)), ...)`` map per out index."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():  # uint8 images, numpy
            got = f'dtype {x.dtype}' if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f'DaViT expects a float tensor (normalised images), got {got}')
        # Under torch.jit.trace sizes are traced values and comparing one warns that the trace may
        # not generalise; the channel count is fixed, and the stem's convolution checks it there.
        if x.dim() != 4 or (not torch.jit.is_tracing() and (x.shape[1] != self.in_channels
                                                             or x.shape[2] == 0 or x.shape[3] == 0)):
            raise ValueError(f'DaViT expects a (B, {self.in_channels}, H, W) tensor with H, W >= 1, got '
                             f'shape {tuple(x.shape)}')
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(_nhwc_to_nchw(out).contiguous())
        return tuple(outs)


def _official_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
