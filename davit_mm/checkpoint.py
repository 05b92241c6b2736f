"""Reading, inspecting, converting and loading checkpoints: one reader for every file, one fit check
for every model.

- :func:`read_file` is the one place a checkpoint file (or URL) is opened; :func:`read_checkpoint`
  flattens it to ``{key: tensor}``, :func:`read_training_checkpoint` keeps a runner checkpoint whole.
- :func:`detect_format` / :func:`convert_state_dict` turn any backbone layout of
  :mod:`davit_mm.formats` into davit_mm's keys; :func:`convert_model_checkpoint` whole detectors and
  segmentors of the official code.
- :func:`compare_state_dict` + :func:`check_tensors` are the fit check: :func:`load_pretrained`
  (``init_cfg``) and :func:`check_checkpoint_fits` (the tools, ``load_from``) both go through them.

Files are read with ``torch.load(weights_only=True)`` (or safetensors); nothing is ever half-loaded:
keys the model does not have, shape mismatches and missing weights raise :class:`CheckpointError`
naming the first offending keys. A backbone may lack only its output norms ``norm0..3``, which
classification checkpoints never contain (they are reported in one line).
"""
import argparse
import glob
import os
import os.path as osp
import pickle
import pickletools
import re
import reprlib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log

from . import compat
from .fileio import HEAD_BYTES, file_kind, resolve_checkpoint, source_url
from .formats import (CLASSIFIER_KEY, DUAL_ATTENTION_BLOCK, FORMATS, LAYOUTS, MODEL_FORMATS,
                      MODEL_MODULES, OTHER_MODELS, Layout)

__all__ = ['FORMATS', 'LAYOUTS', 'MODEL_FORMATS', 'CheckpointError', 'read_file', 'read_checkpoint',
           'read_checkpoint_and_meta', 'read_training_checkpoint', 'detect_format',
           'convert_state_dict', 'describe_state_dict', 'compare_state_dict', 'check_tensors',
           'load_pretrained', 'detect_model_format', 'convert_model_checkpoint',
           'adapt_model_checkpoint', 'is_official_model', 'check_checkpoint_fits', 'latest_valid_checkpoint',
           'implied_channel_attention']

_OUTPUT_NORM = re.compile(r'^norm(\d+)\.')
_STAGE = re.compile(r'^stages\.(\d+)\.')
_UNWRAP_KEYS = ('state_dict', 'model', 'module', 'model_state_dict')
# Layers of detection/segmentation heads whose shapes depend on num_classes.
_CLASS_SPECIFIC = ('cls', 'conv_seg', 'conv_logits', 'fc_reg')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------------------- reading
def read_file(path: str, map_location: Union[str, torch.device] = 'cpu') -> object:
    """The content of a checkpoint file or http(s) URL (cached: :mod:`davit_mm.fileio`), as saved.

    Accepts ``.pth``/``.pt``/``.bin``/``.ckpt`` files written by ``torch.save`` (read with
    ``weights_only=True``) and ``.safetensors``.

    Raises:
        TypeError: ``path`` is not a str/PathLike.
        CheckpointError: the file is missing, not a file, not a checkpoint, corrupt or truncated,
            or holds pickled objects other than tensors and plain data.
        DownloadError: a URL neither cached nor downloadable (:mod:`davit_mm.fileio`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a path (str), got {type(path).__name__}: {path!r}')
    check_map_location(map_location)
    url = os.fspath(path)
    path = resolve_checkpoint(url)  # a URL: its cached or downloaded copy
    if url == path:  # a cached download already resolved (the tools' load_from), or a local file
        url = source_url(path) or path
    if not osp.exists(path):
        raise CheckpointError(f'checkpoint={path!r}: no such file')
    if not osp.isfile(path):
        raise CheckpointError(f'checkpoint={path!r} is not a regular file')
    size = osp.getsize(path)
    try:
        try:
            with open(path, 'rb') as f:
                kind = file_kind(f.read(HEAD_BYTES), size)
        except OSError as exc:  # e.g. a file of another user's umask on a shared cache or work dir
            raise CheckpointError(f'checkpoint={path!r} cannot be read: '
                                  f'{exc.strerror or exc}') from exc
        if kind is None:
            raise CheckpointError(f'checkpoint={path!r} is not a PyTorch checkpoint (neither a '
                                  f'torch.save archive, a pickle nor a safetensors file; '
                                  f'{size} bytes)')
        if kind == 'safetensors':  # by content: Hugging Face's cache stores them without extension
            return _read_safetensors(path, map_location)
        return _read_torch_file(path, kind, map_location)
    except CheckpointError as exc:
        if url == path:
            raise
        raise CheckpointError(f'{exc} (the cached download of {url}: delete the file to download '
                              f'it again)') from exc


def check_map_location(map_location: object) -> None:
    """Refuse a ``map_location`` that ``torch.load`` would reject or that names a device this
    machine lacks, before any file is read (so that the error names the argument, not the file).

    Raises:
        TypeError: not a str, torch.device, dict or function.
        ValueError: not a device name, or a CUDA device on a machine without one.
    """
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return
    accepted = ("accepted a device ('cpu', 'cuda', 'cuda:0', ...), a dict or a function, as "
                'torch.load takes')
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f'map_location={map_location!r} ({type(map_location).__name__}): {accepted}')
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f'map_location={map_location!r} is not a device: {accepted}') from exc
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"map_location={map_location!r}: this machine has no CUDA device; use 'cpu'")
    if device.type == 'cpu' and device.index is not None:  # torch.load: "don't know how to restore"
        raise ValueError(f"map_location={map_location!r}: torch.load takes the CPU as 'cpu', "
                         f"without an index")


def read_checkpoint(path: str, map_location: Union[str, torch.device] = 'cpu') -> Dict[str, torch.Tensor]:
    """:func:`read_file` as a flat ``{key: tensor}`` dict: a ``state_dict``/``model``/``module``
    wrapper is unwrapped; non-tensor entries (epoch, args, ...) are dropped.

    Raises:
        CheckpointError: as :func:`read_file`, or the file holds no tensors.
    """
    return _flatten(read_file(path, map_location), path)


def read_checkpoint_and_meta(path: str, map_location: Union[str, torch.device] = 'cpu'
                             ) -> Tuple[Dict[str, torch.Tensor], dict]:
    """:func:`read_checkpoint`, and the file's ``meta`` dict (empty for safetensors files and
    files without one), for tools that carry it over."""
    content = read_file(path, map_location)
    meta = content.get('meta') if isinstance(content, dict) else None
    return _flatten(content, path), meta if isinstance(meta, dict) else {}


def read_training_checkpoint(path: str) -> dict:
    """A checkpoint written by tools/train.py (or mmdet/mmseg), whole (``state_dict``, ``meta``,
    ``optimizer``, ...), or a :class:`CheckpointError` saying why it cannot be one."""
    content = read_file(path)
    if not isinstance(content, dict):
        raise CheckpointError(f'checkpoint={path!r} holds a {type(content).__name__}, not a model '
                              f'checkpoint')
    state_dict = content.get('state_dict', content)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint={path!r}: its 'state_dict' is a "
                              f'{type(state_dict).__name__}, not a dict of tensors')
    return content


def check_resumable(checkpoint: dict, path: str) -> List[str]:
    """What mmengine's ``Runner.resume`` reads from a training checkpoint (``meta`` with the epoch
    and iteration, ``message_hub``), or a :class:`CheckpointError` naming what is missing;
    returns the parts a resume restores when present and otherwise starts afresh without a word
    (``optimizer``, ``param_schedulers``) that this one lacks."""
    meta = checkpoint.get('meta')
    missing = []
    if not isinstance(meta, dict):
        missing.append("'meta'")
    else:
        missing += [f"meta[{key!r}]" for key in ('epoch', 'iter')
                    if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool)]
    if not isinstance(checkpoint.get('message_hub'), dict):
        missing.append("'message_hub'")
    if missing:
        if _is_backbone_file(checkpoint):
            what, instead = ('the weights of a DaViT backbone alone',
                             f'init_cfg (--cfg-options model.backbone.init_cfg.checkpoint={path})')
        else:
            what, instead = 'model weights', f'load_from (--cfg-options load_from={path})'
        raise CheckpointError(
            f'checkpoint {path!r} cannot be resumed from: it has no {", ".join(missing)}, which a '
            f'checkpoint written during training has (this one holds {what}); to train '
            f'from its weights, start a new run with {instead} instead of --resume')
    return [key for key in ('optimizer', 'param_schedulers') if key not in checkpoint]


def _lone_backbone(state_dict: Dict[str, torch.Tensor], modules: Sequence[str] = ()) -> str:
    """``'DaViT weights in FORMAT format[ under PREFIX]'`` when ``state_dict`` holds one DaViT
    backbone and no weights of a detector's/segmentor's other modules (:data:`MODEL_MODULES`, and
    ``modules``): a classifier, convert_checkpoint.py's output. ``''`` otherwise."""
    try:
        layout, prefix = detect_format(state_dict)
    except (CheckpointError, TypeError):
        return ''
    others = set(MODEL_MODULES) | set(modules)
    if any(key.split('.')[0] in others for key in state_dict):
        return ''  # a whole model
    return f'DaViT weights in {LAYOUTS[layout].format} format' + (f' under {prefix!r}' if prefix else '')


def _is_backbone_file(checkpoint: object) -> bool:
    """Whether a file's content (wrappers and all) is one DaViT backbone alone (:func:`_lone_backbone`)."""
    try:
        return bool(_lone_backbone(_flatten(checkpoint, 'the checkpoint')))
    except CheckpointError:
        return False


def _read_safetensors(path: str, map_location) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # an optional dependency
        raise CheckpointError(f'checkpoint={path!r} is a .safetensors file; install the '
                              f'"safetensors" package to read it') from exc
    # torch.load's other kinds of map_location, for a file whose tensors were all saved from the CPU
    if map_location is None:
        map_location = 'cpu'
    elif isinstance(map_location, dict):
        map_location = map_location.get('cpu', 'cpu')
    elif callable(map_location):
        raise ValueError(f'map_location={map_location!r}: a function is taken for torch.save files; '
                         f'{path!r} is a .safetensors file: give a device (or a dict) instead')
    check_map_location(map_location)
    try:
        return load_file(path, device=str(map_location))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f'checkpoint={path!r} is not a readable safetensors file: {exc}') from exc


def _read_torch_file(path: str, kind: str, map_location='cpu') -> object:
    """``torch.load(path, weights_only=True)`` of a ``kind`` ``'zip'`` (torch.save) or
    ``'pickle'`` (torch < 1.6) file, with a :class:`CheckpointError` saying why it cannot be read
    (corrupt or truncated, a plain pickle, pickled objects other than tensors)."""
    if kind == 'zip':  # a truncated archive keeps its magic: refused here as corrupt
        _check_archive(path)
    # Checkpoints written by timm-based training scripts (the official classification weights)
    # carry their argparse Namespace, mmengine's runner its message hub: plain data, allowed here
    # for this read only. torch < 2.5 has no safe_globals: such files are then refused with the
    # re-save advice below.
    try:
        with compat.globals_allowed([argparse.Namespace, *compat.runner_checkpoint_globals()]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        refused = next((line for line in reason if 'Unsupported' in line or 'GLOBAL' in line),
                       reason[0] if reason else '')
        if kind == 'pickle' and not _is_legacy_torch_file(path):
            raise CheckpointError(
                f'checkpoint={path!r} is a plain Python pickle (written by pickle.dump, not '
                f'torch.save): davit_mm reads torch.save and safetensors files. If you trust the '
                f'file, re-save its weights with torch.save') from exc
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


def _check_archive(path: str) -> None:
    """Read every member of a torch.save archive against the CRC-32 stored for it: ``torch.load``
    does not check them, so flipped bytes in a tensor's data would load as weights. Members saved
    without one (CRC 0: ``compute_crc32=False``) are not checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as member:  # raises at the end on a CRC mismatch
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f'checkpoint={path!r} is not a readable PyTorch checkpoint (corrupt '
                              f'or truncated?): {type(exc).__name__}: {exc}') from exc


def _is_legacy_torch_file(path: str) -> bool:
    """Whether a pickle file starts as ``torch.save`` (torch < 1.6 format) writes it: its first
    object is torch's magic number. Read by walking the opcodes, nothing is unpickled."""
    magic = getattr(torch.serialization, 'MAGIC_NUMBER', 0x1950a86a20f9469cfc6c)
    with open(path, 'rb') as f:
        try:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name == 'STOP':
                    return False
                if arg == magic and opcode.name in ('LONG1', 'LONG4', 'INT', 'LONG'):
                    return True
        except (ValueError, EOFError, pickle.UnpicklingError):
            return False
    return False


def _flatten(obj: object, path: str) -> Dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {'state_dict': {'model': {...}}}
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in _UNWRAP_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None or not (any(isinstance(v, torch.Tensor) for v in inner.values())
                                 or any(isinstance(inner.get(k), dict) for k in _UNWRAP_KEYS)):
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

    ``layout`` is a key of :data:`davit_mm.formats.LAYOUTS`; ``prefix`` is the text before every
    backbone key.

    Raises:
        ValueError: unknown ``format``.
        TypeError: ``state_dict`` is not a dict with str keys, or ``prefix`` not a str.
        CheckpointError: no DaViT keys, the requested format/prefix is absent, or several
            backbones (prefixes) are present and ``prefix`` was not given.
    """
    _check_state_dict(state_dict)
    if format != 'auto' and format not in FORMATS:
        raise ValueError(f"format={format!r}: accepted 'auto' or one of {FORMATS}")
    if prefix is not None:
        prefix = _check_prefix(prefix, " (or None to detect it)")
    layouts = [layout for layout in LAYOUTS.values() if format in ('auto', layout.format)]
    found: Dict[Tuple[str, str], None] = {}
    for key in state_dict:
        for layout in layouts:
            if not key.endswith(layout.anchor):
                continue
            key_prefix = key[:-len(layout.anchor)]
            if (prefix is None or key_prefix == prefix) and (key_prefix == '' or key_prefix.endswith('.')) \
                    and _is_dual_attention_layout(state_dict, layout, key_prefix):
                found[(layout.name, key_prefix)] = None
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


def _check_state_dict(state_dict: object, argument: str = 'state_dict') -> None:
    """Refuse what is not a flat ``{str: tensor}`` dict (a path, None, a list), naming
    ``argument``; values are :func:`check_tensors`' to check.

    Raises:
        TypeError: not a dict (a Mapping), or a key that is not a str.
    """
    if not isinstance(state_dict, Mapping):
        hint = ' (a file: read it with read_checkpoint)' if isinstance(state_dict, (str, os.PathLike)) else ''
        raise TypeError(f'{argument}={reprlib.repr(state_dict)} ({type(state_dict).__name__}): '
                        f'accepted a dict of tensors {{name: tensor}}{hint}')
    key = next((key for key in state_dict if not isinstance(key, str)), None)
    if key is not None:
        raise TypeError(f'{argument} has the key {key!r} ({type(key).__name__}): accepted a dict '
                        f'of tensors whose keys are str')


def _check_prefix(prefix: object, also: str = " ('' for none)") -> str:
    """``prefix`` ending with its dot, as mmengine's Pretrained init reads ``prefix='backbone'``."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix={prefix!r} ({type(prefix).__name__}): accepted a str such as "
                        f"'backbone.'{also}")
    return prefix + '.' if prefix and not prefix.endswith('.') else prefix


def _layout(layout: object) -> Layout:
    """The :data:`LAYOUTS` record named ``layout``, or a ValueError listing the names."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f'layout={layout!r}: accepted one of {tuple(LAYOUTS)} (the layouts '
                         f'detect_format returns)')
    return LAYOUTS[layout]


def _is_dual_attention_layout(state_dict: Dict[str, torch.Tensor], layout: Layout, prefix: str) -> bool:
    """Whether the keys under ``prefix`` are a DaViT in ``layout``: its block keys (where layouts
    share an anchor) are there, and renamed they hold spatial and channel attention blocks."""
    keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    if layout.block_key and not any(re.match(layout.block_key, k) for k in keys):
        return False
    converted = convert_state_dict({k: v for k, v in state_dict.items() if k.startswith(prefix)},
                                   layout.name, prefix).state_dict
    return any(DUAL_ATTENTION_BLOCK.match(k) for k in converted)


def guess_model(state_dict: Dict[str, torch.Tensor]) -> Optional[Tuple[str, str]]:
    """``(model family, a key that shows it)`` for a checkpoint of a known non-DaViT backbone."""
    for name, pattern in OTHER_MODELS:
        key = next((k for k in state_dict if pattern.search(k)), None)
        if key is not None:
            return name, key
    return None


def layout_format(layout: str) -> str:
    """The user-facing format name of a layout (``'florence2_hf'`` -> ``'florence2'``)."""
    return _layout(layout).format


@dataclass
class Conversion:
    """A state dict renamed to davit_mm's layout.

    Attributes:
        state_dict: backbone tensors under davit_mm names (no prefix).
        sources: davit_mm name -> the key it came from.
        classifier: original keys of classifier weights (``head``, ``norms``, and the layout's
            classification norm when it is the only output norm); they are not part of a
            backbone and are left out of ``state_dict``.
    """
    state_dict: Dict[str, torch.Tensor]
    sources: Dict[str, str]
    classifier: List[str]


def convert_state_dict(state_dict: Dict[str, torch.Tensor], layout: str,
                       prefix: str = '') -> Conversion:
    """Rename the backbone keys under ``prefix`` to davit_mm's layout (keys outside are ignored, and
    so are those of another backbone of the layout under a longer prefix, e.g. an EMA copy).

    Raises:
        ValueError: ``layout`` is not a key of :data:`LAYOUTS`.
        TypeError: ``state_dict`` is not a dict with str keys, or ``prefix`` not a str.
    """
    _check_state_dict(state_dict)
    spec = _layout(layout)
    prefix = _check_prefix(prefix)
    rules = [(re.compile(pattern), repl) for pattern, repl in spec.rules]
    # Another backbone of this layout inside the prefix (an EMA copy under 'ema.' when the prefix
    # is ''): its keys are not this backbone's.
    others = tuple({key[:-len(spec.anchor)] for key in state_dict
                    if key.endswith(spec.anchor) and key.startswith(prefix) and key != prefix + spec.anchor
                    and key[:-len(spec.anchor)].endswith('.')})
    converted: Dict[str, torch.Tensor] = {}
    sources: Dict[str, str] = {}
    classifier: List[str] = []
    for key, value in state_dict.items():
        if not key.startswith(prefix) or (others and key.startswith(others)):
            continue
        name = key[len(prefix):]
        if CLASSIFIER_KEY.match(name):
            classifier.append(key)
            continue
        for pattern, repl in rules:
            name = pattern.sub(repl, name)
        converted[name] = value
        sources[name] = key
    if spec.classification_norm:
        norms = [k for k in converted if _OUTPUT_NORM.match(k)]
        if norms and all(k.startswith(spec.classification_norm + '.') for k in norms):
            for k in norms:
                classifier.append(sources.pop(k))
                del converted[k]
    return Conversion(converted, sources, classifier)


def describe_state_dict(state_dict: Dict[str, torch.Tensor]) -> str:
    """Infer the arch of a davit_mm-layout state dict, e.g. for error messages."""
    _check_state_dict(state_dict)
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
    text = f'embed_dims={tuple(dims)}, depths={tuple(depths)}'
    if len(dims) > 1 and state_dict['stages.1.downsample.conv.weight'].shape[-1] == 3:
        text += (", with overlapped 3 x 3 downsampling as Florence-2's vision tower "
                 "(arch='florence2-base'/'florence2-large')")
    return text


# ------------------------------------------------------------------------------------ fit check
@dataclass
class Fit:
    """How a state dict compares with a model's, key by key.

    ``missing``/``unexpected``/``mismatched`` are the problems; ``tolerated`` the keys the caller
    allowed to be absent, extra or of another shape.
    """
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    tolerated: List[str] = field(default_factory=list)

    def problems(self, state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> str:
        """The problems in one line ('' when it fits)."""
        parts = []
        if self.mismatched:
            parts.append('shape mismatches: ' + ', '.join(
                f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                for k in self.mismatched[:4]))
        if self.unexpected:
            keys = 'key' if len(self.unexpected) == 1 else 'keys'
            parts.append(f'{len(self.unexpected)} {keys} the model does not have: {self.unexpected[:4]}')
        if self.missing:
            weights = 'weight' if len(self.missing) == 1 else 'weights'
            parts.append(f'{len(self.missing)} model {weights} the checkpoint lacks: {self.missing[:4]}')
        return '; '.join(parts)


def compare_state_dict(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor],
                       may_lack: Callable[[str], bool] = lambda key: False,
                       may_have: Callable[[str], bool] = lambda key: False,
                       may_differ: Callable[[str], bool] = lambda key: False) -> Fit:
    """Compare ``state`` with a model's state dict ``own``: model keys absent from ``state``,
    keys of ``state`` the model does not have, and shape mismatches; keys for which ``may_lack``,
    ``may_have`` or ``may_differ`` say so are tolerated instead."""
    _check_state_dict(state, 'state')
    _check_state_dict(own, 'own')
    fit = Fit()
    for key in own:
        if key not in state:
            (fit.tolerated if may_lack(key) else fit.missing).append(key)
        elif isinstance(state[key], torch.Tensor) and tuple(state[key].shape) != tuple(own[key].shape):
            # (a value that is not a tensor is check_tensors' to name)
            (fit.tolerated if may_differ(key) else fit.mismatched).append(key)
    for key in state:
        if key not in own:
            (fit.tolerated if may_have(key) else fit.unexpected).append(key)
    return fit


def check_tensors(state_dict: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], source: str) -> None:
    """Refuse, before anything is copied, tensors that cannot be the weights they would replace.

    Every tensor of ``state_dict`` whose key is in ``own`` (the model's state dict) must be dense,
    hold data (not on the meta device), have the same shape, be floating point where the model's
    is (integer buffers such as BN's ``num_batches_tracked`` must keep their exact dtype) and hold
    only finite values. ``load_state_dict`` would otherwise cast integers silently, load NaN/Inf
    (a detector that then scores mAP 0), or fail on a sparse tensor after copying others.

    Raises:
        CheckpointError: naming each problem and its first offending keys.
        TypeError: ``state_dict`` or ``own`` is not a dict with str keys.
    """
    _check_state_dict(state_dict)
    _check_state_dict(own, 'own')
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
        elif value.is_floating_point() and not bool(_finite(value).all()):
            bad = int((~_finite(value)).sum())
            problems.setdefault('NaN/Inf values', []).append(f'{key} ({bad} of {value.numel()})')
    if problems:
        raise CheckpointError(f'{source}: tensors that cannot be loaded, nothing was: ' + '; '.join(
            f'{len(keys)} with {what}: {", ".join(keys[:5])}{", ..." if len(keys) > 5 else ""}'
            for what, keys in problems.items()))


def implied_channel_attention(layout: str, meta: Optional[dict] = None) -> Optional[str]:
    """The channel attention (``'v1'``/``'v2'``) a file of ``layout`` holds, or None when it may be
    either: davit_mm's keys are the same for both, but a file ``tools/convert_checkpoint.py``
    wrote names it (``meta['channel_attention']``) or the format it was converted from
    (``meta['source_format']``)."""
    spec = _layout(layout)
    meta = meta if isinstance(meta, dict) else {}
    if spec.channel_attention or layout != 'davit_mm':
        return spec.channel_attention
    if meta.get('channel_attention') in ('v1', 'v2'):
        return meta['channel_attention']
    sources = [lay.channel_attention for lay in LAYOUTS.values() if lay.format == meta.get('source_format')]
    return sources[0] if sources else None


def _finite(value: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite``, also for the 8-bit float dtypes it is not implemented for (checked as
    the fp32 values they are loaded as)."""
    return torch.isfinite(value.float() if value.element_size() == 1 else value)


# ---------------------------------------------------------------------------- backbone loading
def load_pretrained(model: torch.nn.Module, checkpoint: Union[str, Dict[str, torch.Tensor]],
                    prefix: Optional[str] = None, format: str = 'auto',
                    map_location: Union[str, torch.device] = 'cpu') -> Dict[str, List[str]]:
    """Load a DaViT checkpoint of any supported format into a :class:`DaViT`, all or nothing.

    Args:
        model: the backbone.
        checkpoint: a path/URL, or an already-read flat state dict.
        prefix: text before the backbone keys (e.g. ``'backbone.'``; ``'backbone'`` reads the
            same, as in mmengine); None detects it.
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
        TypeError: ``model`` is not a :class:`DaViT`.
    """
    from .models.davit import DaViT
    if not isinstance(model, DaViT):
        raise TypeError(f'model={type(model).__name__}: accepted a davit_mm DaViT backbone (of a '
                        f'detector or segmentor: its .backbone)')
    if checkpoint is None:
        raise CheckpointError("init_cfg=dict(type='Pretrained') needs checkpoint=PATH")
    source = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else 'the given state dict'
    state_dict, meta = ((checkpoint, {}) if isinstance(checkpoint, dict)
                        else read_checkpoint_and_meta(checkpoint, map_location))
    layout, found_prefix = detect_format(state_dict, prefix, format)
    spec = LAYOUTS[layout]
    fmt = spec.format
    arch = f'DaViT(arch={model.arch!r})'
    implied = implied_channel_attention(layout, meta)
    if implied and implied != model.channel_attention:
        converted_from = meta.get('source_format')
        kind = (f'a {fmt} checkpoint' if spec.channel_attention else
                f'converted from a {converted_from} checkpoint (its meta says so)')
        hint = (" (use arch='florence2-base' or 'florence2-large')"
                if 'florence2' in (fmt, converted_from) else '')
        raise CheckpointError(f'{source} is {kind}, whose channel attention is '
                              f"'{implied}', but {arch} uses channel_attention="
                              f"'{model.channel_attention}'{hint}")
    conversion = convert_state_dict(state_dict, layout, found_prefix)
    converted, classifier = conversion.state_dict, conversion.classifier

    own = model.state_dict()
    fit = compare_state_dict(converted, own, may_lack=lambda key: bool(_OUTPUT_NORM.match(key)),
                             may_have=lambda key: _not_built(model, key))
    problems = fit.problems(converted, own)
    if problems:
        raise CheckpointError(
            f'{source} ({fmt} format, prefix {found_prefix!r}) does not fit {arch} with '
            f'embed_dims={model.embed_dims}, depths={model.depths}: the checkpoint looks like '
            f'{describe_state_dict(converted)}; {problems}')
    check_tensors(converted, own, str(source))
    model.load_state_dict({k: v for k, v in converted.items() if k in own}, strict=False)
    norms_missing = [k for k in fit.tolerated if k in own]
    skipped = [k for k in fit.tolerated if k not in own]

    parts = [f'Loaded {len(converted) - len(skipped)} DaViT tensors from {source} ({fmt} format, '
             f'prefix {found_prefix!r})']
    if norms_missing:
        norms = sorted({k.split('.')[0] for k in norms_missing})
        parts.append(f'not in the checkpoint, left at init: {", ".join(norms)}')
    if classifier:
        # named after the prefix, which the line gives: 'module.backbone.head' read as the backbone
        names = [key[len(found_prefix):] for key in classifier]
        parts.append(f'dropped {len(classifier)} classifier tensors ({_summarise(names)})')
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
def detect_model_format(state_dict: Dict[str, torch.Tensor], meta: Optional[dict] = None) -> Optional[str]:
    """The :data:`MODEL_FORMATS` key of a whole trained detector/segmentor state dict of another
    codebase, or None (a backbone-only file, a davit_mm model, anything else)."""
    _check_state_dict(state_dict)
    modules = {key.split('.')[0] for key in state_dict} - {'backbone'}
    meta = meta if isinstance(meta, dict) else {}
    candidates = [fmt for fmt in MODEL_FORMATS.values()
                  if 'backbone.' + LAYOUTS[fmt.backbone_layout].anchor in state_dict]
    if not modules or not candidates:
        return None
    # The first whose version or modules the file shows; else the last (e.g. unknown modules only,
    # which its conversion then names).
    return next((fmt.name for fmt in candidates if fmt.version_key in meta or modules & set(fmt.modules)),
                candidates[-1].name)


def _model_anchors() -> List[str]:
    return sorted({'backbone.' + LAYOUTS[fmt.backbone_layout].anchor for fmt in MODEL_FORMATS.values()})


_SOURCE_META_KEYS = ('mmcv_version', 'mmdet_version', 'mmseg_version', 'epoch', 'iter', 'time',
                     'exp_name', 'seed', 'config')  # kept as a record of where converted weights came from


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
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source}: its 'state_dict' is a {type(state_dict).__name__}, not a "
                              f'dict of tensors')
    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    name = detect_model_format(state_dict, meta)
    if name is None:
        raise CheckpointError(
            f'{source} is not a whole detector/segmentor of the official DaViT code (expected '
            f'backbone keys such as {_model_anchors()} next to neck/head keys); its keys start with '
            f'{sorted(state_dict)[:5]}')
    fmt = MODEL_FORMATS[name]
    unknown = sorted({key.split('.')[0] for key in state_dict} - {'backbone', *fmt.modules})
    if unknown:
        raise CheckpointError(f'{source}: keys under {unknown}, which models of {fmt.written_by} '
                              f"do not have; accepted: 'backbone' and {list(fmt.modules)}")
    backbone = convert_state_dict(state_dict, fmt.backbone_layout, 'backbone.')
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
    """``(checkpoint, note)`` ready for ``model``, when ``model`` has a davit_mm :class:`DaViT`
    backbone: a whole official DaViT detector/segmentor checkpoint is converted
    (:func:`convert_model_checkpoint`); in it and in a whole model of davit_mm's layout (e.g. one
    ``tools/convert_checkpoint.py`` wrote), backbone weights for stages/output norms that the model
    does not build (``norm0`` for RetinaNet, whose FPN starts at stage 2) are left out. ``note``
    says what was done in one line; the input is never modified. Any other checkpoint is returned
    as it is, with an empty note."""
    from .models.davit import DaViT
    model = _unwrapped(model)
    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, DaViT) or not isinstance(checkpoint, dict):
        return checkpoint, ''
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, dict):
        return checkpoint, ''
    official = is_official_model(checkpoint)
    notes = []
    if official:
        conversion = convert_model_checkpoint(checkpoint, source)
        checkpoint = conversion.checkpoint  # a new dict
        notes.append(f'a model of {MODEL_FORMATS[conversion.format].written_by}; converted '
                     f"{len(conversion.renamed)} keys to davit_mm's layout")
        state_dict = checkpoint['state_dict']
    own = model.state_dict()
    unused = {key for key in state_dict if key.startswith(('backbone.', 'module.backbone.'))
              and key not in own and _not_built(backbone, key.split('backbone.', 1)[1])}
    if unused:
        state_dict = {key: value for key, value in state_dict.items() if key not in unused}
        checkpoint = dict(checkpoint, state_dict=state_dict) if 'state_dict' in checkpoint else state_dict
        notes.append(f'not used by this model (out_indices={backbone.out_indices}): '
                     f'{_summarise(sorted(unused))} ({len(unused)} tensors)')
    if official and conversion.dropped:
        notes.append(f'dropped {_summarise(conversion.dropped)}')
    return checkpoint, (f'{source}: ' + '; '.join(notes) if notes else '')


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and test-time-augmentation wrappers (their ``.module``)."""
    while hasattr(model, 'module'):
        model = model.module
    return model


def is_official_model(checkpoint: object) -> bool:
    """Whether ``checkpoint`` is a whole detector/segmentor of the official DaViT code
    (:data:`MODEL_FORMATS`), which :func:`adapt_model_checkpoint` converts."""
    if not isinstance(checkpoint, dict):
        return False
    state_dict = checkpoint.get('state_dict', checkpoint)
    meta = checkpoint.get('meta')
    return isinstance(state_dict, dict) and detect_model_format(state_dict, meta) is not None


def check_checkpoint_fits(model: torch.nn.Module, path: str, allow_class_mismatch: bool = False,
                          checkpoint: Optional[dict] = None) -> str:
    """Compare a detector/segmentor checkpoint with the built model, key by key.

    Evaluating (``allow_class_mismatch=False``) needs every weight present with its shape.
    Fine-tuning from it (``True``) may differ in the class-count-dependent layers of the heads
    (another ``num_classes``), which are then left at init; returns a one-line note about them.
    ``checkpoint`` is the file's content when it was already read. A whole detector/segmentor of
    another codebase (:data:`MODEL_FORMATS`) is compared as converted for this model
    (:func:`adapt_model_checkpoint`), which is how it is loaded.

    Raises:
        CheckpointError: an unreadable file (:func:`read_training_checkpoint`), missing or
            unexpected keys, other shape mismatches (another model or size), or tensors that
            cannot be loaded (:func:`check_tensors`), naming the first ones.
    """
    state = checkpoint if checkpoint is not None else read_training_checkpoint(path)
    model = _unwrapped(model)
    state, _ = adapt_model_checkpoint(model, state, path)
    state = state.get('state_dict', state)
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    own = model.state_dict()

    def class_specific(key: str) -> bool:
        return any(part in key.split('.')[-2] for part in _CLASS_SPECIFIC)

    fit = compare_state_dict(state, own, may_differ=lambda key: allow_class_mismatch and class_specific(key))
    problems = fit.problems(state, own)
    if problems:
        hint = (' (its class-specific layers differ: was it trained with another num_classes?)'
                if any(class_specific(k) for k in fit.mismatched) else '')
        theirs, ours = ({key.split('.')[0] for key in keys} & set(MODEL_MODULES) for keys in (state, own))
        if theirs and not theirs & ours:
            hint = (f' (it is a whole model with {sorted(theirs)}, where the config\'s model has '
                    f'{sorted(ours)}: a checkpoint of another kind of model)')
        backbone_alone = _backbone_alone(state, own)
        if backbone_alone:
            hint = (f' (it holds a backbone alone: {backbone_alone}; give it as '
                    f'model.backbone.init_cfg.checkpoint to train from, and here a whole model\'s)')
        raise CheckpointError(f"checkpoint {path!r} does not fit the config's model{hint}: {problems}")
    check_tensors({k: v for k, v in state.items() if k not in fit.tolerated}, own, f'checkpoint {path!r}')
    if fit.tolerated:
        return (f'{len(fit.tolerated)} class-specific tensors of {path} differ in shape (another '
                f'num_classes) and stay at init: {", ".join(fit.tolerated[:6])}')
    return ''


def _backbone_alone(state_dict: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> str:
    """What says that ``state_dict`` is a backbone, not a model like ``own``: its keys are the
    model's ``backbone.*`` keys, or it holds one DaViT backbone of a public format and nothing of
    the model's other modules (:func:`_lone_backbone`); else ``''``."""
    if state_dict and {f'backbone.{k}' for k in state_dict} <= set(own):
        return "its keys are the model's backbone.* keys"
    return _lone_backbone(state_dict, {key.split('.')[0] for key in own} - {'backbone'})


def latest_valid_checkpoint(work_dir: str) -> Optional[Tuple[str, dict]]:
    """``(path, content)`` of the newest checkpoint in ``work_dir`` that loads, for ``--resume``
    without a path.

    mmengine takes whatever ``last_checkpoint`` names; a checkpoint truncated by a kill (with
    writers other than davit_mm's atomic one) would then stop the resume with a load error.
    Broken candidates are skipped with a warning naming them; None when there is none.
    """
    candidates, folder = [], osp.abspath(work_dir)
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named:
            # A work dir copied or moved from elsewhere: its pointer still names the original's
            # file, so the work dir's own file of that name is taken; without one (CheckpointHook's
            # out_dir writes elsewhere) the named file.
            own = osp.join(folder, osp.basename(named))
            candidates.append(own if osp.isfile(own) else named)
    numbered = []
    for path in glob.glob(osp.join(folder, '*.pth')):
        # not best_*_iter_N.pth: mmengine saves those without optimizer and scheduler states
        match = re.fullmatch(r'(epoch|iter)_(\d+)\.pth', osp.basename(path))
        if match:
            numbered.append((int(match[2]), path))
    candidates += [path for _, path in sorted(numbered, reverse=True)]
    seen, broken = set(), []
    for path in candidates:
        # last_checkpoint holds an absolute path, the glob the work dir's spelling of it
        if osp.realpath(path) in seen:
            continue
        seen.add(osp.realpath(path))
        try:
            content = read_training_checkpoint(path)
            check_resumable(content, path)
        except CheckpointError as exc:
            print_log(f'davit_mm: not resuming from {path}: {exc}', logger='current', level=30)
            broken.append(path)
            continue
        if broken:
            print_log(f'davit_mm: resuming from {path}, the newest complete checkpoint in '
                      f'{work_dir} (skipped: {", ".join(broken)})', logger='current')
        return path, content
    return None
