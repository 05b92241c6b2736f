"""A plain restatement of the official DaViT detection/segmentation backbone (github dingmyu/davit).

It keeps the official token layout ``(B, N, C)`` with an explicit ``(H, W)``, the official order of
operations and the official parameter names (``patch_embeds``, ``main_blocks``, ``cpe.0`` ...), so:

- tests load one random state dict into it and, converted, into :class:`davit_mm.models.DaViT`,
  and compare outputs: that checks numerics and the official-format converter together;
- ``tools/analysis/benchmark.py`` times it as the reference the fast backbone is measured against.

It is not registered and not meant for training: no init, no freezing, no checkpointing. The
Florence-2 switches (overlapped downsample, channel attention v2) are included so the Florence-2
variant can be checked the same way.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .davit import resolve_arch

Size = Tuple[int, int]


class RefMlp(nn.Module):

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefConvPosEnc(nn.Module):

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        B, N, C = x.shape
        H, W = size
        feat = self.proj(x.transpose(1, 2).view(B, C, H, W))
        return x + feat.flatten(2).transpose(1, 2)


class RefPatchEmbed(nn.Module):
    """Stem (patch 4, 7x7 conv, post-norm) or downsample (patch 2, pre-norm)."""

    def __init__(self, patch: int, in_chans: int, dim: int, overlapped: bool) -> None:
        super().__init__()
        self.patch = patch
        if patch == 4:
            self.proj = nn.Conv2d(in_chans, dim, 7, 4, 3)
            self.norm = nn.LayerNorm(dim)
        else:
            k, p = (3, 1) if overlapped else (2, 0)
            self.proj = nn.Conv2d(in_chans, dim, k, 2, p)
            self.norm = nn.LayerNorm(in_chans)

    def forward(self, x: torch.Tensor, size: Size) -> Tuple[torch.Tensor, Size]:
        H, W = size
        if x.dim() == 3:
            B, _, C = x.shape
            x = self.norm(x).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
        if W % self.patch:
            x = F.pad(x, (0, self.patch - W % self.patch))
        if H % self.patch:
            x = F.pad(x, (0, 0, 0, self.patch - H % self.patch))
        x = self.proj(x)
        new_size = (x.size(2), x.size(3))
        x = x.flatten(2).transpose(1, 2)
        if self.patch == 4:
            x = self.norm(x)
        return x, new_size


class RefWindowAttention(nn.Module):

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


class RefChannelAttention(nn.Module):

    def __init__(self, dim: int, groups: int, version: str) -> None:
        super().__init__()
        self.groups = groups
        self.version = version
        self.scale = (dim // groups) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.groups, C // self.groups).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.version == 'v1':
            attn = ((k * self.scale).transpose(-1, -2) @ v).softmax(dim=-1)
            x = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
        else:
            attn = ((q * N ** -0.5).transpose(-1, -2) @ k).softmax(dim=-1)
            x = (attn @ v.transpose(-1, -2)).transpose(-1, -2)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class RefBlock(nn.Module):
    """Spatial (``window_size`` given) or channel block, in the official token layout."""

    def __init__(self, dim: int, heads: int, window_size: int = 0, version: str = 'v1',
                 mlp_ratio: float = 4.) -> None:
        super().__init__()
        self.window_size = window_size
        self.cpe = nn.ModuleList([RefConvPosEnc(dim), RefConvPosEnc(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (RefWindowAttention(dim, heads) if window_size else
                     RefChannelAttention(dim, heads, version))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))

    def _windows(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        H, W = size
        B, _, C = x.shape
        ws = self.window_size
        x = x.view(B, H, W, C)
        pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        windows = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous()
        out = self.attn(windows.view(-1, ws * ws, C))
        out = out.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous()
        out = out.view(B, Hp, Wp, C)
        if pad_r or pad_b:
            out = out[:, :H, :W, :].contiguous()
        return out.view(B, H * W, C)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        x = self.cpe[0](x, size)
        cur = self.norm1(x)
        cur = self._windows(cur, size) if self.window_size else self.attn(cur)
        x = x + cur
        x = self.cpe[1](x, size)
        return x + self.mlp(self.norm2(x))


class ReferenceDaViT(nn.Module):
    """Official-layout DaViT returning NCHW maps for ``out_indices`` (eval-mode numerics)."""

    def __init__(self, arch='tiny', in_channels: int = 3, window_size: int = None,
                 overlapped_downsample: bool = None, channel_attention: str = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        spec = resolve_arch(arch, window_size=window_size, overlapped_downsample=overlapped_downsample,
                            channel_attention=channel_attention)
        dims, depths, heads = spec['embed_dims'], spec['depths'], spec['num_heads']
        window_size, overlapped, version = (spec['window_size'], spec['overlapped_downsample'],
                                            spec['channel_attention'])
        self.embed_dims = dims
        self.out_indices = tuple(out_indices)
        self.patch_embeds = nn.ModuleList([
            RefPatchEmbed(4 if i == 0 else 2, in_channels if i == 0 else dims[i - 1], dims[i],
                          overlapped) for i in range(len(dims))
        ])
        self.main_blocks = nn.ModuleList([
            nn.ModuleList([
                nn.ModuleList([RefBlock(dims[s], heads[s], window_size=window_size),
                               RefBlock(dims[s], heads[s], version=version)])
                for _ in range(depths[s])
            ]) for s in range(len(dims))
        ])
        for i in range(len(dims)):
            self.add_module(f'norm{i}', nn.LayerNorm(dims[i]))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x, size = self.patch_embeds[0](x, (x.size(2), x.size(3)))
        outs = []
        for s, layers in enumerate(self.main_blocks):
            if s > 0:
                x, size = self.patch_embeds[s](x, size)
            for spatial, channel in layers:
                x = channel(spatial(x, size), size)
            if s in self.out_indices:
                H, W = size
                out = getattr(self, f'norm{s}')(x)
                outs.append(out.view(-1, H, W, self.embed_dims[s]).permute(0, 3, 1, 2).contiguous())
        return outs
