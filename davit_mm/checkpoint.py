"""DaViT checkpoint formats: read, detect, convert to davit_mm's key layout, and load strictly.

Formats (keys shown for the stem; every block follows the same pattern):

==============  ==============================================  ===================================
format          where it comes from                             anchor key
==============  ==============================================  ===================================
``davit_mm``    this package (also timm's Florence-2 models)    ``stem.conv.weight`` + named blocks
``timm``        timm ``davit_{tiny,small,base}.msft_in1k``      ``stem.conv.weight`` + ``blocks.N.0``
``official``    github dingmyu/davit (classification, and       ``patch_embeds.0.proj.weight``
                trained detectors/segmentors under backbone.)
``mmpretrain``  mmpretrain ``davit-{t,s,b}_3rdparty_in1k``      ``patch_embed.projection.weight``
``florence2``   Florence-2 vision towers (``vision_tower.``),   ``convs.0.proj.weight`` (remote
                both the original and the transformers layout   code) / ``convs.0.conv.weight``
==============  ==============================================  ===================================

Any key prefix in front of the anchor (``backbone.``, ``vision_tower.``, ``module.``, ...) is found
automatically unless ``prefix`` is given. Files are read with ``torch.load(weights_only=True)`` (or
safetensors); nothing is ever half-loaded: keys the model does not have, shape mismatches and
missing weights raise :class:`CheckpointError` naming the arch and the first offending keys. The only
weights allowed to be absent are the output norms ``norm0..3``, which classification checkpoints
never contain (they are reported in one line).
"""
import argparse
import contextlib
import os
import os.path as osp
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log

from .fileio import resolve_checkpoint

Rule = Tuple[str, Union[str, Callable[[re.Match], str]]]

FORMATS = ('davit_mm', 'timm', 'official', 'mmpretrain', 'florence2')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


def _shift_stage(kind: str) -> Callable[[re.Match], str]:
    # mmpretrain keeps stage i's downsample at the end of stage i; davit_mm at the start of i + 1.
    return lambda m: f'stages.{int(m[1]) + 1}.downsample.{kind}.'


# Layout -> ordered (pattern, replacement) rules turning its keys into davit_mm keys.
_RULES: Dict[str, List[Rule]] = {
    'davit_mm': [],
    'timm': [
        (r'^(stages\.\d+\.blocks\.\d+)\.0\.', r'\1.spatial_block.'),
        (r'^(stages\.\d+\.blocks\.\d+)\.1\.', r'\1.channel_block.'),
    ],
    'official': [
        (r'^patch_embeds\.0\.proj\.', 'stem.conv.'),
        (r'^patch_embeds\.0\.norm\.', 'stem.norm.'),
        (r'^patch_embeds\.(\d+)\.proj\.', r'stages.\1.downsample.conv.'),
        (r'^patch_embeds\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'),
        (r'^main_blocks\.(\d+)\.(\d+)\.0\.', r'stages.\1.blocks.\2.spatial_block.'),
        (r'^main_blocks\.(\d+)\.(\d+)\.1\.', r'stages.\1.blocks.\2.channel_block.'),
        (r'\.cpe\.0\.', '.cpe1.'),
        (r'\.cpe\.1\.', '.cpe2.'),
    ],
    'mmpretrain': [
        (r'^patch_embed\.projection\.', 'stem.conv.'),
        (r'^patch_embed\.norm\.', 'stem.norm.'),
        (r'^stages\.(\d+)\.downsample\.projection\.', _shift_stage('conv')),
        (r'^stages\.(\d+)\.downsample\.norm\.', _shift_stage('norm')),
        (r'\.attn\.w_msa\.', '.attn.'),
        (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'),
        (r'\.ffn\.layers\.1\.', '.mlp.fc2.'),
    ],
    # Florence-2 as published with its remote code (microsoft/Florence-2-*).
    'florence2': [
        (r'^convs\.0\.proj\.', 'stem.conv.'),
        (r'^convs\.0\.norm\.', 'stem.norm.'),
        (r'^convs\.(\d+)\.proj\.', r'stages.\1.downsample.conv.'),
        (r'^convs\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'),
        (r'^blocks\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
        (r'\.conv([12])\.fn\.dw\.', r'.cpe\1.proj.'),
        (r'\.(?:window|channel)_attn\.norm\.', '.norm1.'),
        (r'\.(?:window|channel)_attn\.fn\.', '.attn.'),
        (r'\.ffn\.norm\.', '.norm2.'),
        (r'\.ffn\.fn\.net\.', '.mlp.'),
    ],
    # Florence-2 as converted for transformers' native Florence2 model (model.vision_tower.).
    'florence2_hf': [
        (r'^convs\.0\.conv\.', 'stem.conv.'),
        (r'^convs\.0\.norm\.', 'stem.norm.'),
        (r'^convs\.(\d+)\.conv\.', r'stages.\1.downsample.conv.'),
        (r'^convs\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'),
        (r'^blocks\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
        (r'\.conv([12])\.', r'.cpe\1.proj.'),
        (r'\.(?:window|channel)_attn\.', '.attn.'),
        (r'\.ffn\.', '.mlp.'),
    ],
}
# The key that identifies each layout (after its prefix), and the format it belongs to.
_ANCHORS: Dict[str, Tuple[str, str]] = {
    'davit_mm': ('stem.conv.weight', 'davit_mm'),
    'timm': ('stem.conv.weight', 'timm'),
    'official': ('patch_embeds.0.proj.weight', 'official'),
    'mmpretrain': ('patch_embed.projection.weight', 'mmpretrain'),
    'florence2': ('convs.0.proj.weight', 'florence2'),
    'florence2_hf': ('convs.0.conv.weight', 'florence2'),
}
# Channel attention each foreign format implies (davit_mm's own files hold either).
_FORMAT_CHANNEL_ATTENTION = {'timm': 'v1', 'official': 'v1', 'mmpretrain': 'v1', 'florence2': 'v2'}
_CLASSIFIER = re.compile(r'^(head|norms)(\.|$)')
_OUTPUT_NORM = re.compile(r'^norm(\d+)\.')
_STAGE = re.compile(r'^stages\.(\d+)\.')
_UNWRAP_KEYS = ('state_dict', 'model', 'module', 'model_state_dict')


# --------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str, map_location: Union[str, torch.device] = 'cpu') -> Dict[str, torch.Tensor]:
    """Read a checkpoint file (or http(s) URL, cached: :mod:`davit_mm.fileio`) into a flat
    ``{key: tensor}`` dict.

    Accepts ``.pth``/``.pt``/``.bin``/``.ckpt`` files written by ``torch.save`` (read with
    ``weights_only=True``) and ``.safetensors``. A ``state_dict``/``model``/``module`` wrapper is
    unwrapped; non-tensor entries (epoch, args, ...) are dropped.

    Raises:
        TypeError: ``path`` is not a str/PathLike.
        CheckpointError: the file is missing, unreadable, refused by ``weights_only`` or holds no
            tensors.
        DownloadError: a URL neither cached nor downloadable (:mod:`davit_mm.fileio`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a path (str), got {type(path).__name__}: {path!r}')
    path = resolve_checkpoint(os.fspath(path))  # a URL: its cached or downloaded copy
    if not osp.exists(path):
        raise CheckpointError(f'checkpoint={path!r}: no such file')
    if not osp.isfile(path):
        raise CheckpointError(f'checkpoint={path!r} is not a regular file')
    if path.endswith('.safetensors'):
        obj = _read_safetensors(path, map_location)
    else:
        obj = load_torch_file(path, map_location)
    return _flatten(obj, path)


def read_checkpoint_and_meta(path: str, map_location: Union[str, torch.device] = 'cpu'
                             ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """:func:`read_checkpoint`, and the file's ``meta`` dict (empty for safetensors files and
    files without one), for tools that carry it over."""
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path).endswith('.safetensors'):
        return read_checkpoint(path, map_location), {}
    path = os.fspath(path)
    local = resolve_checkpoint(path)  # a URL: its cached or downloaded copy
    if not osp.isfile(local):
        return read_checkpoint(local, map_location), {}  # its error names the problem
    obj = load_torch_file(local, map_location)
    meta = obj.get('meta') if isinstance(obj, dict) and isinstance(obj.get('meta'), dict) else {}
    return _flatten(obj, local), meta


def _read_safetensors(path: str, map_location) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # an optional dependency
        raise CheckpointError(f'checkpoint={path!r} is a .safetensors file; install the '
                              f'"safetensors" package to read it') from exc
    try:
        return load_file(path, device=str(map_location))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f'checkpoint={path!r} is not a readable safetensors file: {exc}') from exc


def load_torch_file(path: str, map_location='cpu') -> object:
    """``torch.load(path, weights_only=True)``, with a :class:`CheckpointError` saying why a file
    cannot be read (not a checkpoint, corrupt or truncated, pickled objects other than tensors)."""
    with open(path, 'rb') as f:
        head = f.read(2)
    # torch.save writes a zip archive ('PK'); files from torch < 1.6 are a pickle (PROTO 0x80).
    # A truncated archive keeps its magic and fails in torch.load below, as corrupt.
    if head != b'PK' and head[:1] != b'\x80':
        raise CheckpointError(f'checkpoint={path!r} is not a PyTorch checkpoint (neither a '
                              f'torch.save archive nor a pickle; {osp.getsize(path)} bytes)')
    # Checkpoints written by timm-based training scripts (the official classification weights)
    # carry their argparse Namespace; it is plain data, so it is allowed here and nowhere else.
    # torch < 2.5 has no safe_globals: such files are then refused with the re-save advice below.
    allow_namespace = (torch.serialization.safe_globals([argparse.Namespace])
                       if hasattr(torch.serialization, 'safe_globals') else contextlib.nullcontext())
    try:
        with allow_namespace:
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        refused = next((line for line in reason if 'Unsupported' in line or 'GLOBAL' in line),
                       reason[0] if reason else '')
        if 'Weights only load failed' in str(exc):
            raise CheckpointError(
                f'checkpoint={path!r} holds pickled objects that weights_only loading refuses '
                f'({refused.strip()}). davit_mm only reads tensors from checkpoints; if you trust '
                f'the file, re-save its weights: torch.save(torch.load(path, weights_only=False)'
                f"['state_dict'], 'clean.pth')") from exc
        raise CheckpointError(f'checkpoint={path!r} is not a PyTorch checkpoint: {exc}') from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f'checkpoint={path!r} is not a readable PyTorch checkpoint (corrupt '
                              f'or truncated?): {type(exc).__name__}: {exc}') from exc


def _flatten(obj: object, path: str) -> Dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {'state_dict': {'model': {...}}}
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _UNWRAP_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or not any(isinstance(v, torch.Tensor) for v in inner.values()):
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f'checkpoint={path!r} holds a {type(obj).__name__}, not a state dict')
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f'checkpoint={path!r} holds no tensors (top-level keys: '
                              f'{sorted(map(str, obj))[:10]})')
    return tensors


# ----------------------------------------------------------------------------- detect / convert
def detect_format(state_dict: Dict[str, torch.Tensor], prefix: Optional[str] = None,
                  format: str = 'auto') -> Tuple[str, str]:
    """Return ``(layout, prefix)`` for a flat state dict.

    ``layout`` is a key of the conversion table (a format name, or ``'florence2_hf'`` for the
    transformers layout of Florence-2). ``prefix`` is the text before every backbone key.

    Raises:
        ValueError: unknown ``format``.
        CheckpointError: no DaViT keys, the requested format/prefix is absent, or several
            backbones (prefixes) are present and ``prefix`` was not given.
    """
    if format != 'auto' and format not in FORMATS:
        raise ValueError(f"format={format!r}: accepted 'auto' or one of {FORMATS}")
    layouts = [name for name, (_, fmt) in _ANCHORS.items() if format in ('auto', fmt)]
    found: Dict[Tuple[str, str], None] = {}
    for key in state_dict:
        for layout in layouts:
            anchor = _ANCHORS[layout][0]
            if key.endswith(anchor):
                key_prefix = key[:-len(anchor)]
                if (prefix is None or key_prefix == prefix) and (key_prefix == '' or key_prefix.endswith('.')):
                    found[(_refine(layout, state_dict, key_prefix), key_prefix)] = None
    # Other backbones share anchor keys (mmdet/mmpretrain Swin has patch_embed.projection and
    # stages.N.downsample; timm RegNets have stem.conv): a DaViT has spatial and channel blocks.
    found = {(layout, key_prefix): None for layout, key_prefix in found
             if _has_dual_attention_blocks(state_dict, layout, key_prefix)}
    if not found:
        wanted = 'DaViT' if format == 'auto' else f'{format}-format DaViT'
        where = '' if prefix is None else f' under prefix={prefix!r}'
        other = guess_model(state_dict)
        looks = f'it looks like a {other[0]} checkpoint (key {other[1]!r}); ' if other else ''
        raise CheckpointError(f'no {wanted} weights found{where}; {looks}the checkpoint starts '
                              f'with keys {sorted(state_dict)[:5]}')
    if len(found) > 1:
        raise CheckpointError(f'the checkpoint holds several DaViT backbones {sorted(found)}; '
                              f'choose one with prefix=...')
    return next(iter(found))


def _refine(layout: str, state_dict: Dict[str, torch.Tensor], prefix: str) -> str:
    # timm and davit_mm share the stem; timm numbers the two blocks of a layer (.0/.1).
    if layout in ('davit_mm', 'timm'):
        timm_block = re.compile(re.escape(prefix) + r'stages\.\d+\.blocks\.\d+\.[01]\.')
        return 'timm' if any(timm_block.match(k) for k in state_dict) else 'davit_mm'
    return layout


_DUAL_ATTENTION_BLOCK = re.compile(r'^stages\.\d+\.blocks\.\d+\.(spatial|channel)_block\.attn\.qkv\.')


def _has_dual_attention_blocks(state_dict: Dict[str, torch.Tensor], layout: str, prefix: str) -> bool:
    converted = convert_state_dict({k: v for k, v in state_dict.items() if k.startswith(prefix)},
                                   layout, prefix).state_dict
    return any(_DUAL_ATTENTION_BLOCK.match(k) for k in converted)


# Keys that identify other backbones, to say what a checkpoint that is not DaViT looks like.
_OTHER_MODELS: List[Tuple[str, re.Pattern]] = [
    ('Swin Transformer', re.compile(r'relative_position_bias_table$|(^|\.)layers\.\d+\.blocks\.\d+\.attn\.')),
    ('ResNet/ResNeXt', re.compile(r'(^|\.)layer[1-4]\.\d+\.(conv|bn)[123]\.')),
    ('ConvNeXt', re.compile(r'(^|\.)downsample_layers\.\d+\.|(^|\.)stages\.\d+\.\d+\.(dw|depthwise_)conv\.')),
    ('Vision Transformer', re.compile(r'(^|\.)(cls_token|pos_embed)$')),
]


def guess_model(state_dict: Dict[str, torch.Tensor]) -> Optional[Tuple[str, str]]:
    """``(model family, a key that shows it)`` for a checkpoint of a known non-DaViT backbone."""
    for name, pattern in _OTHER_MODELS:
        key = next((k for k in state_dict if pattern.search(k)), None)
        if key is not None:
            return name, key
    return None


def check_tensors(state_dict: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], source: str) -> None:
    """Refuse, before anything is copied, tensors that cannot be the weights they would replace.

    Every tensor of ``state_dict`` whose key is in ``own`` (the model's state dict) must be dense,
    hold data (not on the meta device), have the same shape, be floating point where the model's
    is (integer buffers such as BN's ``num_batches_tracked`` must keep their exact dtype) and hold
    only finite values. ``load_state_dict`` would otherwise cast integers silently, load NaN/Inf
    (a detector that then scores mAP 0), or fail on a sparse tensor after copying others.

    Raises:
        CheckpointError: naming each problem and its first offending keys.
    """
    problems: Dict[str, List[str]] = {}
    for key, value in state_dict.items():
        target = own.get(key)
        if target is None:
            continue
        if not isinstance(value, torch.Tensor):
            problems.setdefault('values that are not tensors', []).append(f'{key} ({type(value).__name__})')
        elif value.layout != torch.strided:
            problems.setdefault('not dense tensors', []).append(f'{key} ({value.layout})')
        elif value.is_meta:
            problems.setdefault('tensors without data (meta device)', []).append(key)
        elif tuple(value.shape) != tuple(target.shape):
            problems.setdefault('shape mismatches', []).append(
                f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}')
        elif value.is_floating_point() != target.is_floating_point() or (
                not target.is_floating_point() and value.dtype != target.dtype):
            problems.setdefault('wrong dtypes', []).append(f'{key}: {value.dtype}, model {target.dtype}')
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            problems.setdefault('NaN/Inf values', []).append(f'{key} ({bad} of {value.numel()})')
    if problems:
        raise CheckpointError(f'{source}: tensors that cannot be loaded, nothing was: ' + '; '.join(
            f'{len(keys)} with {what}: {", ".join(keys[:5])}{", ..." if len(keys) > 5 else ""}'
            for what, keys in problems.items()))


def layout_format(layout: str) -> str:
    """The user-facing format name of a layout (``'florence2_hf'`` -> ``'florence2'``)."""
    return _ANCHORS[layout][1]


@dataclass
class Conversion:
    """A state dict renamed to davit_mm's layout.

    Attributes:
        state_dict: backbone tensors under davit_mm names (no prefix).
        sources: davit_mm name -> the key it came from.
        classifier: original keys of classifier weights (``head``, ``norms``, and mmpretrain's
            ``norm3`` when it is the only output norm, i.e. the classification norm); they are not
            part of a backbone and are left out of ``state_dict``.
    """
    state_dict: Dict[str, torch.Tensor]
    sources: Dict[str, str]
    classifier: List[str]


def convert_state_dict(state_dict: Dict[str, torch.Tensor], layout: str,
                       prefix: str = '') -> Conversion:
    """Rename the backbone keys under ``prefix`` to davit_mm's layout (keys outside are ignored)."""
    rules = [(re.compile(pattern), repl) for pattern, repl in _RULES[layout]]
    converted: Dict[str, torch.Tensor] = {}
    sources: Dict[str, str] = {}
    classifier: List[str] = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if _CLASSIFIER.match(name):
            classifier.append(key)
            continue
        for pattern, repl in rules:
            name = pattern.sub(repl, name)
        converted[name] = value
        sources[name] = key
    if layout == 'mmpretrain':
        norms = [k for k in converted if _OUTPUT_NORM.match(k)]
        if norms and all(k.startswith('norm3.') for k in norms):
            for k in norms:
                classifier.append(sources.pop(k))
                del converted[k]
    return Conversion(converted, sources, classifier)


def describe_state_dict(state_dict: Dict[str, torch.Tensor]) -> str:
    """Infer the arch of a davit_mm-layout state dict, e.g. for error messages."""
    dims, depths = [], []
    stage = 0
    while True:
        conv = 'stem.conv.weight' if stage == 0 else f'stages.{stage}.downsample.conv.weight'
        if conv not in state_dict:
            break
        dims.append(state_dict[conv].shape[0])
        layers = {int(m[1]) for k in state_dict
                  for m in [re.match(rf'stages\.{stage}\.blocks\.(\d+)\.', k)] if m}
        depths.append(len(layers))
        stage += 1
    if not dims:
        return 'an unrecognised layout'
    return f'embed_dims={tuple(dims)}, depths={tuple(depths)}'


# ----------------------------------------------------------------------------------------- load
def load_pretrained(model: torch.nn.Module, checkpoint: Union[str, Dict[str, torch.Tensor]],
                    prefix: Optional[str] = None, format: str = 'auto',
                    map_location: Union[str, torch.device] = 'cpu') -> Dict[str, List[str]]:
    """Load a DaViT checkpoint of any supported format into a :class:`DaViT`, all or nothing.

    Args:
        model: the backbone.
        checkpoint: a path/URL, or an already-read flat state dict.
        prefix: text before the backbone keys (e.g. ``'backbone.'``); None detects it.
        format: ``'auto'`` or one of :data:`FORMATS`.
        map_location: passed to ``torch.load``.

    Returns:
        A report: ``{'missing': [...], 'classifier': [...], 'skipped': [...]}`` (model keys left
        at init, classifier keys dropped, checkpoint keys for stages/norms the model did not
        build).

    Raises:
        CheckpointError: unreadable file, no DaViT weights, a different size or variant
            (shape mismatch, unknown keys, weights missing), or a format that implies a
            different channel attention than the model's.
    """
    if checkpoint is None:
        raise CheckpointError("init_cfg=dict(type='Pretrained') needs checkpoint=PATH")
    source = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else 'the given state dict'
    state_dict = read_checkpoint(checkpoint, map_location) if not isinstance(checkpoint, dict) else checkpoint
    layout, found_prefix = detect_format(state_dict, prefix, format)
    fmt = layout_format(layout)
    arch = f'DaViT(arch={model.arch!r})'
    wanted_attention = _FORMAT_CHANNEL_ATTENTION.get(fmt)
    if wanted_attention and wanted_attention != model.channel_attention:
        hint = " (use arch='florence2-base' or 'florence2-large')" if fmt == 'florence2' else ''
        raise CheckpointError(f'{source} is a {fmt} checkpoint, whose channel attention is '
                              f"'{wanted_attention}', but {arch} uses channel_attention="
                              f"'{model.channel_attention}'{hint}")
    conversion = convert_state_dict(state_dict, layout, found_prefix)
    converted, classifier = conversion.state_dict, conversion.classifier

    own = model.state_dict()
    skipped, unexpected, mismatched = [], [], []
    for key, value in converted.items():
        if key not in own:
            (skipped if _not_built(model, key) else unexpected).append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}')
    missing = [k for k in own if k not in converted]
    norms_missing = [k for k in missing if _OUTPUT_NORM.match(k)]
    other_missing = [k for k in missing if not _OUTPUT_NORM.match(k)]
    if mismatched or unexpected or other_missing:
        problems = []
        if mismatched:
            problems.append(f'shape mismatches: {mismatched[:5]}')
        if unexpected:
            problems.append(f'keys the model does not have: {unexpected[:5]}')
        if other_missing:
            problems.append(f'model weights the checkpoint lacks: {other_missing[:5]}')
        raise CheckpointError(
            f'{source} ({fmt} format, prefix {found_prefix!r}) does not fit {arch} with '
            f'embed_dims={model.embed_dims}, depths={model.depths}: the checkpoint looks like '
            f'{describe_state_dict(converted)}; ' + '; '.join(problems))
    check_tensors(converted, own, str(source))
    model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False)

    parts = [f'Loaded {len(converted) - len(skipped)} DaViT tensors from {source} ({fmt} format, '
             f'prefix {found_prefix!r})']
    if norms_missing:
        norms = sorted({k.split('.')[0] for k in norms_missing})
        parts.append(f'not in the checkpoint, left at init: {", ".join(norms)}')
    if classifier:
        parts.append(f'dropped {len(classifier)} classifier tensors ({_summarise(classifier)})')
    if skipped:
        parts.append(f'skipped {len(skipped)} tensors of stages/norms this model does not build '
                     f'(out_indices={model.out_indices}): {_summarise(skipped)}')
    print_log('; '.join(parts), logger='current')
    return dict(missing=norms_missing, classifier=classifier, skipped=skipped)


def _not_built(model: torch.nn.Module, key: str) -> bool:
    """A checkpoint key for a stage after the model's last one, or an unused output norm."""
    stage = _STAGE.match(key)
    if stage:
        return int(stage[1]) >= len(model.stages)
    norm = _OUTPUT_NORM.match(key)
    return bool(norm) and int(norm[1]) not in model.out_indices


def _summarise(keys: Sequence[str]) -> str:
    heads = sorted({'.'.join(k.split('.')[:2]) for k in keys})
    return ', '.join(heads[:6]) + (', ...' if len(heads) > 6 else '')


# ------------------------------------------------------------- whole detectors and segmentors
@dataclass(frozen=True)
class ModelFormat:
    """The layout of whole trained models (backbone, neck, heads) written by another codebase.

    Attributes:
        library: the library whose davit_mm configs evaluate these models.
        written_by: what wrote them.
        version_key: the ``meta`` entry naming that library's version.
        modules: top-level modules next to ``backbone`` (anything else is refused).
        rules: renames of neck/head keys into the names of ``library``'s current release.
        checked: the neck/head modules of davit_mm's configs whose parameter names were compared
            between the two releases' code.
    """
    library: str
    written_by: str
    version_key: str
    modules: Tuple[str, ...]
    rules: Tuple[Rule, ...]
    checked: Tuple[str, ...]


# The official DaViT code (github dingmyu/davit) trained its 15 released detectors/segmentors with
# mmdet 2.11 / mmseg 0.11 (mmcv-full 1.3); their backbone keys are the official layout under
# 'backbone.', with an output norm for every stage. In the modules our configs use, mmdet 3.x and
# mmseg 1.x name every parameter as those releases did (FPN lateral_convs/fpn_convs.N.conv;
# RetinaHead cls_convs/reg_convs.N.conv, retina_cls, retina_reg; RPNHead rpn_conv/rpn_cls/rpn_reg;
# Shared2FCBBoxHead shared_fcs.N, fc_cls, fc_reg; FCNMaskHead convs.N.conv, upsample, conv_logits;
# UPerHead psp_modules.N.1, bottleneck, lateral_convs, fpn_convs, fpn_bottleneck, conv_seg, ConvModule
# conv/bn; FCNHead convs.N, conv_seg), so their rename lists are empty.
MODEL_FORMATS: Dict[str, ModelFormat] = {
    'official_mmdet2': ModelFormat(
        library='mmdet', written_by='the official DaViT code (mmdet 2.11)',
        version_key='mmdet_version', modules=('neck', 'rpn_head', 'roi_head', 'bbox_head'), rules=(),
        checked=('FPN', 'RetinaHead', 'RPNHead', 'StandardRoIHead', 'Shared2FCBBoxHead', 'FCNMaskHead')),
    'official_mmseg0': ModelFormat(
        library='mmseg', written_by='the official DaViT code (mmseg 0.11)',
        version_key='mmseg_version', modules=('decode_head', 'auxiliary_head'), rules=(),
        checked=('UPerHead', 'FCNHead')),
}
_OFFICIAL_BACKBONE_ANCHOR = 'backbone.' + _ANCHORS['official'][0]
# mmcv 1.x meta entries worth keeping as a record of where converted weights came from (the
# optimizer state and hook messages of the old runner are not).
_SOURCE_META_KEYS = ('mmcv_version', 'mmdet_version', 'mmseg_version', 'epoch', 'iter', 'time',
                     'exp_name', 'seed', 'config')


def detect_model_format(state_dict: Dict[str, torch.Tensor], meta: Optional[dict] = None) -> Optional[str]:
    """The :data:`MODEL_FORMATS` key of a whole official detector/segmentor state dict, or None
    (a backbone-only file, a davit_mm model, anything else)."""
    if _OFFICIAL_BACKBONE_ANCHOR not in state_dict:
        return None
    modules = {key.split('.')[0] for key in state_dict} - {'backbone'}
    if not modules:
        return None
    meta = meta if isinstance(meta, dict) else {}
    segmentor = 'mmseg_version' in meta or bool(modules & set(MODEL_FORMATS['official_mmseg0'].modules))
    return 'official_mmseg0' if segmentor else 'official_mmdet2'


@dataclass
class ModelConversion:
    """A whole-model checkpoint converted to davit_mm's layout.

    Attributes:
        checkpoint: ``{'state_dict': ..., 'meta': ...}`` for mmdet 3.x / mmseg 1.x models.
        format: the :data:`MODEL_FORMATS` key it came from.
        renamed: new key -> old key, for every key whose name changed.
        dropped: keys of the source that are not model weights (classifier leftovers).
    """
    checkpoint: dict
    format: str
    renamed: Dict[str, str]
    dropped: List[str]


def convert_model_checkpoint(checkpoint: dict, source: str = 'the checkpoint') -> ModelConversion:
    """Convert a whole official DaViT detector/segmentor checkpoint (mmcv 1.x: ``meta``,
    ``state_dict``, ``optimizer``) to davit_mm's layout, all keys at once.

    Backbone keys are renamed as for the official backbone format; neck/head keys by the format's
    rules. ``meta`` keeps the class names (and palette) as ``dataset_meta``, which mmdet 3.x /
    mmseg 1.x read, and a record of the source under ``converted_from``; the old optimizer state
    is dropped.

    Raises:
        CheckpointError: not a whole official detector/segmentor, or keys under modules that
            such models do not have.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not a checkpoint dict')
    state_dict = checkpoint.get('state_dict', checkpoint)
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    name = detect_model_format(state_dict, meta)
    if name is None:
        raise CheckpointError(
            f'{source} is not a whole detector/segmentor of the official DaViT code (expected '
            f'{_OFFICIAL_BACKBONE_ANCHOR!r} next to neck/head keys); its keys start with '
            f'{sorted(state_dict)[:5]}')
    fmt = MODEL_FORMATS[name]
    unknown = sorted({key.split('.')[0] for key in state_dict} - {'backbone', *fmt.modules})
    if unknown:
        raise CheckpointError(f'{source}: keys under {unknown}, which models of {fmt.written_by} '
                              f"do not have; accepted: 'backbone' and {list(fmt.modules)}")
    backbone = convert_state_dict(state_dict, 'official', 'backbone.')
    converted = {f'backbone.{key}': value for key, value in backbone.state_dict.items()}
    renamed = {f'backbone.{key}': old for key, old in backbone.sources.items()
               if old != f'backbone.{key}'}
    rules = [(re.compile(pattern), repl) for pattern, repl in fmt.rules]
    for key, value in state_dict.items():
        if key.startswith('backbone.'):
            continue
        new = key
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        converted[new] = value
        if new != key:
            renamed[new] = key
    new_meta = dict(converted_from=dict(format=name, source=str(source),
                                        **{k: meta[k] for k in _SOURCE_META_KEYS if k in meta}))
    if meta.get('CLASSES') is not None:
        dataset_meta = dict(classes=tuple(meta['CLASSES']))
        if meta.get('PALETTE') is not None:
            dataset_meta['palette'] = [tuple(color) for color in meta['PALETTE']]
        new_meta['dataset_meta'] = dataset_meta
    return ModelConversion(dict(state_dict=converted, meta=new_meta), name, renamed,
                           sorted(backbone.classifier))


def adapt_model_checkpoint(model: torch.nn.Module, checkpoint: dict,
                           source: str = 'the checkpoint') -> Tuple[dict, str]:
    """``(checkpoint, note)`` ready for ``model``: a whole official DaViT detector/segmentor
    checkpoint is converted (:func:`convert_model_checkpoint`) when ``model`` has a davit_mm
    :class:`DaViT` backbone, and its backbone weights for stages/output norms that the model does
    not build (``norm0`` for RetinaNet, whose FPN starts at stage 2) are left out; ``note`` says
    so in one line. Any other checkpoint is returned as it is, with an empty note."""
    from .models.davit import DaViT
    while hasattr(model, 'module'):  # DDP and test-time-augmentation wrappers
        model = model.module
    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, DaViT) or not isinstance(checkpoint, dict):
        return checkpoint, ''
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, dict) or detect_model_format(state_dict, checkpoint.get('meta')) is None:
        return checkpoint, ''
    conversion = convert_model_checkpoint(checkpoint, source)
    converted = conversion.checkpoint['state_dict']
    unused = [key for key in converted
              if key.startswith('backbone.') and _not_built(backbone, key[len('backbone.'):])]
    for key in unused:
        del converted[key]
    fmt = MODEL_FORMATS[conversion.format]
    note = (f'{source}: a model of {fmt.written_by}; converted {len(conversion.renamed)} keys to '
            f"davit_mm's layout")
    if unused:
        note += (f'; not used by this model (out_indices={backbone.out_indices}): '
                 f'{_summarise(unused)} ({len(unused)} tensors)')
    if conversion.dropped:
        note += f'; dropped {_summarise(conversion.dropped)}'
    return conversion.checkpoint, note
