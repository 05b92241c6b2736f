"""Writers of synthetic checkpoints in every public DaViT key layout, for the loader tests.

Each starts from an official-layout state dict (``ReferenceDaViT.state_dict()``) and renames keys the
way that codebase names them, adding the non-backbone keys its files really carry (classifier
heads, detector necks, Florence-2's language model). The key names are those of each codebase's
public model definition and released checkpoints:

* official: the DaViT authors' code (github.com/dingmyu/davit): ``patch_embeds.N``,
  ``main_blocks.S.L.{0,1}`` (spatial, channel), ``cpe.{0,1}``, ``norms`` + ``head`` classifier;
* timm: timm's ``davit.py``: ``stem``, ``stages.S.downsample``, ``stages.S.blocks.L.{0,1}``,
  ``cpe1``/``cpe2``, ``head.norm`` + ``head.fc``;
* mmpretrain: its ``DaViT`` backbone: ``backbone.patch_embed``, the downsample at the end of the
  previous stage, ``spatial_block``/``channel_block``, ``attn.w_msa``, mmcv FFN names
  (``ffn.layers``), the classification norm as ``norm3``;
* Florence-2: the vision tower of Microsoft's remote code on the Hugging Face hub
  (``vision_tower.convs``/``blocks``, ``fn``/``dw`` wrappers) and of transformers' native
  ``Florence2`` model (``model.vision_tower.``, ``conv``, no wrappers).

They are written key by key from those names, independently of :mod:`davit_mm.checkpoint`'s
rules, so a round trip through the loader checks the converter rather than restating it.
"""
import re
from typing import Dict

import torch

StateDict = Dict[str, torch.Tensor]

_OFFICIAL_BLOCK = re.compile(r'^main_blocks\.(\d+)\.(\d+)\.([01])\.(.*)$')
_OFFICIAL_EMBED = re.compile(r'^patch_embeds\.(\d+)\.(proj|norm)\.(.*)$')
_BLOCK_NAME = {'0': 'spatial_block', '1': 'channel_block'}


def _classifier(sd: StateDict) -> StateDict:
    width = sd['norm3.weight'].shape[0]
    return {'weight': torch.randn(10, width), 'bias': torch.randn(10),
            'norm.weight': torch.rand(width), 'norm.bias': torch.randn(width)}


def official_classification(sd: StateDict) -> StateDict:
    """An official ImageNet checkpoint: no norm0..3, a ``norms`` + ``head`` classifier."""
    out = {k: v for k, v in sd.items() if not re.match(r'norm\d\.', k)}
    cls = _classifier(sd)
    out.update({'norms.weight': cls['norm.weight'], 'norms.bias': cls['norm.bias'],
                'head.weight': cls['weight'], 'head.bias': cls['bias']})
    return out


def official_detector(sd: StateDict) -> StateDict:
    """An official trained detector: backbone (with norm0..3) under ``backbone.``, plus a neck."""
    out = {f'backbone.{k}': v for k, v in sd.items()}
    out['neck.lateral_convs.0.conv.weight'] = torch.randn(8, 4, 1, 1)
    return out


def timm(sd: StateDict) -> StateDict:
    out = {}
    for key, value in sd.items():
        if re.match(r'norm\d\.', key):
            continue
        m = _OFFICIAL_EMBED.match(key)
        if m:
            stage, part, leaf = m.groups()
            part = 'conv' if part == 'proj' else 'norm'
            out[f'stem.{part}.{leaf}' if stage == '0' else f'stages.{stage}.downsample.{part}.{leaf}'] = value
            continue
        stage, layer, block, rest = _OFFICIAL_BLOCK.match(key).groups()
        rest = rest.replace('cpe.0.', 'cpe1.').replace('cpe.1.', 'cpe2.')
        out[f'stages.{stage}.blocks.{layer}.{block}.{rest}'] = value
    cls = _classifier(sd)
    out.update({'head.norm.weight': cls['norm.weight'], 'head.norm.bias': cls['norm.bias'],
                'head.fc.weight': cls['weight'], 'head.fc.bias': cls['bias']})
    return out


def mmpretrain(sd: StateDict) -> StateDict:
    """mmpretrain classifier: ``backbone.`` prefix, downsample at the end of the previous stage,
    ``w_msa`` in window attention, mmcv FFN naming, the classification norm as ``norm3``."""
    out = {}
    leaf_names = {'mlp.fc1.': 'ffn.layers.0.0.', 'mlp.fc2.': 'ffn.layers.1.',
                  'cpe.0.': 'cpe1.', 'cpe.1.': 'cpe2.'}
    for key, value in sd.items():
        if re.match(r'norm[012]\.', key):
            continue
        if key.startswith('norm3.'):
            out[f'backbone.{key}'] = torch.rand_like(value)  # the classification norm
            continue
        m = _OFFICIAL_EMBED.match(key)
        if m:
            stage, part, leaf = m.groups()
            part = 'projection' if part == 'proj' else 'norm'
            name = (f'patch_embed.{part}.{leaf}' if stage == '0' else
                    f'stages.{int(stage) - 1}.downsample.{part}.{leaf}')
            out[f'backbone.{name}'] = value
            continue
        stage, layer, block, rest = _OFFICIAL_BLOCK.match(key).groups()
        for old, new in leaf_names.items():
            rest = rest.replace(old, new)
        if block == '0':
            rest = rest.replace('attn.', 'attn.w_msa.')
        out[f'backbone.stages.{stage}.blocks.{layer}.{_BLOCK_NAME[block]}.{rest}'] = value
    cls = _classifier(sd)
    out.update({'head.fc.weight': cls['weight'], 'head.fc.bias': cls['bias']})
    return out


def florence2(sd: StateDict, transformers_layout: bool = False) -> StateDict:
    """A whole Florence-2 checkpoint: the vision tower plus projector and language-model keys.

    ``transformers_layout`` gives transformers' native naming (``model.vision_tower.``, ``conv``,
    no ``fn``/``dw`` wrappers) instead of the original remote-code naming (``vision_tower.``).
    """
    prefix = 'model.vision_tower.' if transformers_layout else 'vision_tower.'
    out = {}
    for key, value in sd.items():
        if re.match(r'norm\d\.', key):
            continue
        m = _OFFICIAL_EMBED.match(key)
        if m:
            stage, part, leaf = m.groups()
            if part == 'proj' and transformers_layout:
                part = 'conv'
            out[f'{prefix}convs.{stage}.{part}.{leaf}'] = value
            continue
        stage, layer, block, rest = _OFFICIAL_BLOCK.match(key).groups()
        attn = 'window_attn' if block == '0' else 'channel_attn'
        if transformers_layout:
            names = {'cpe.0.proj.': 'conv1.', 'cpe.1.proj.': 'conv2.', 'norm1.': 'norm1.',
                     'norm2.': 'norm2.', 'attn.': f'{attn}.', 'mlp.': 'ffn.'}
        else:
            names = {'cpe.0.proj.': 'conv1.fn.dw.', 'cpe.1.proj.': 'conv2.fn.dw.',
                     'norm1.': f'{attn}.norm.', 'norm2.': 'ffn.norm.', 'attn.': f'{attn}.fn.',
                     'mlp.': 'ffn.fn.net.'}
        head = next(old for old in names if rest.startswith(old))
        rest = names[head] + rest[len(head):]
        out[f'{prefix}blocks.{stage}.{layer}.{_BLOCK_NAME[block]}.{rest}'] = value
    out['image_projection'] = torch.randn(4, 4)
    out['language_model.model.encoder.layers.0.fc1.weight'] = torch.randn(4, 4)
    return out


def davit_mm_detector(davit_sd: StateDict) -> StateDict:
    """What davit_mm's own runner writes: the backbone under ``backbone.`` next to neck/head."""
    out = {f'backbone.{k}': v for k, v in davit_sd.items()}
    out['bbox_head.retina_cls.weight'] = torch.randn(9, 8, 3, 3)
    return out
