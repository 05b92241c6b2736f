"""Environment shims: each works around one named upstream problem, only on the versions that have it
(:data:`SHIMS` says which), as narrowly as possible.

- :func:`runner_checkpoint_globals` (torch >= 2.6 with mmengine <= 0.10.7): what mmengine's runner
  checkpoints hold besides tensors, allowed for ``torch.load(weights_only=True)`` only while a
  davit_mm read or a runner with :class:`davit_mm.engine.RunnerCheckpointsHook` is at work (never
  process-wide).
- :func:`torchscript_onnx_export` (torch >= 2.9 with mmdeploy <= 1.3.1) and
  :func:`onnx_cast_long` (mmdeploy <= 1.3.1 with a torch whose ONNX symbolics lack
  ``_cast_Long``): what mmdeploy needs of torch's ONNX export, while ``tools/export_onnx.py``
  runs it.
- :func:`name_unreadable_images` (mmcv 2.x) and :func:`allow_davit_mm_config_scope`
  (mmengine <= 0.10.7) are applied when davit_mm is imported (:func:`apply_at_import`): every
  process that builds datasets or parses configs with davit_mm imports it first (``custom_imports``).
- :func:`make_evaluator_output_dirs` (mmseg <= 1.2.2): the label map folder of a distributed
  evaluation, made by the tools before the runner is built.
"""
import contextlib
import functools
import os
import os.path as osp
import pickle
import re
from typing import ContextManager, Dict, Iterator, List, Sequence, Tuple

import torch

_applied = set()


def _version(text: str) -> Tuple[int, ...]:
    """``'2.13.0+cpu'`` -> ``(2, 13, 0)``."""
    parts = []
    for part in text.split('+')[0].split('.')[:3]:
        digits = re.match(r'\d*', part)[0]  # '0rc1' -> 0
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _installed(package: str) -> Tuple[int, ...]:
    import importlib
    return _version(importlib.import_module(package).__version__)


# Shim -> (package, first affected version, last version known to be affected; None: no fix yet).
SHIMS: Dict[str, Tuple[Tuple[str, Tuple[int, ...], Tuple[int, ...]], ...]] = {
    'runner_checkpoint_globals': (('torch', (2, 6), (99, )), ('mmengine', (0, 0), (0, 10, 7))),
    'torchscript_onnx_export': (('torch', (2, 9), (99, )), ('mmdeploy', (0, 0), (1, 3, 1))),
    'onnx_cast_long': (('mmdeploy', (0, 0), (1, 3, 1)), ),  # and only where torch lacks it
    'name_unreadable_images': (('mmcv', (2, 0), (2, 2, 0)), ),
    'allow_davit_mm_config_scope': (('mmengine', (0, 0), (0, 10, 7)), ),
    'make_evaluator_output_dirs': (('mmseg', (1, 0), (1, 2, 2)), ),
}


def needed(shim: str) -> bool:
    """Whether the installed packages are the versions :data:`SHIMS` lists for ``shim``."""
    for package, first, last in SHIMS[shim]:
        version = _installed(package)
        if not (first <= version and version[:len(last)] <= last):
            return False
    return True


# --------------------------------------------------------- torch.load(weights_only) vs mmengine
def _restricted_getattr(obj, name: str):
    """``getattr`` for the unpickler, limited to ``HistoryBuffer``'s statistics methods.

    mmengine pickles the ``_statistics_methods`` dict of every ``HistoryBuffer`` as
    ``getattr(HistoryBuffer, 'min')`` etc.; anything else is refused.
    """
    from mmengine.logging import HistoryBuffer
    allowed = {'min', 'max', 'current', 'mean'} | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'davit_mm refuses getattr({obj!r}, {name!r}) while loading a '
                                 f'checkpoint with weights_only=True')


def runner_checkpoint_globals() -> List[object]:
    """The globals mmengine's runner checkpoints hold besides tensors, for
    ``torch.serialization.safe_globals`` ([] where the shim is not needed).

    Upstream problem: torch >= 2.6 defaults ``torch.load`` to ``weights_only=True``, and mmengine
    0.10.7's ``CheckpointLoader`` calls ``torch.load`` without ``weights_only``, so ``load_from``,
    ``resume`` and ``tools/test.py`` fail on the runner's own checkpoints, whose ``message_hub``
    holds ``HistoryBuffer`` objects with numpy arrays (mmengine issue 1655; fixed upstream after
    0.10.7). Instead of turning ``weights_only`` off, exactly the globals those checkpoints contain
    are allowed (found with ``torch.serialization.get_unsafe_globals_in_checkpoint``).
    """
    if not needed('runner_checkpoint_globals'):
        return []
    import numpy as np
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    safe = [HistoryBuffer, np.ndarray, np.dtype, (_restricted_getattr, 'builtins.getattr')]
    # Register numpy's helpers under both module paths: files written with numpy 1.x name
    # numpy.core.multiarray, files written with numpy 2.x name numpy._core.multiarray.
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        safe += [(multiarray._reconstruct, f'{module}._reconstruct'),
                 (multiarray.scalar, f'{module}.scalar')]
    # numpy 2 pickles dtypes of arrays through their dtype classes (e.g. numpy.dtypes.Float64DType).
    if hasattr(np, 'dtypes'):
        safe += [cls for cls in vars(np.dtypes).values()
                 if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return safe


@contextlib.contextmanager
def globals_allowed(objects: List[object]) -> Iterator[None]:
    """Within this block ``torch.load`` (weights_only) also accepts ``objects`` (torch >= 2.5;
    older torch has no ``safe_globals`` and the block allows nothing more). Only the objects not
    allowed yet are added, and only they are removed at the end: torch's ``safe_globals`` removes
    all it was given when its block ends, so an inner block naming an object would disallow it
    for the rest of an outer one."""
    if not hasattr(torch.serialization, 'safe_globals'):
        yield
        return
    allowed = torch.serialization.get_safe_globals()
    new = [obj for obj in objects if obj not in allowed]
    with torch.serialization.safe_globals(new) if new else contextlib.nullcontext():
        yield


def runner_checkpoints_readable() -> ContextManager[None]:
    """Within this block, ``torch.load`` (weights_only) reads mmengine's runner checkpoints."""
    return globals_allowed(runner_checkpoint_globals())


# ---------------------------------------------------------------- mmdeploy vs torch.onnx.export
@contextlib.contextmanager
def torchscript_onnx_export() -> Iterator[None]:
    """Within this block, ``torch.onnx.export`` uses the TorchScript exporter unless its caller
    names another (``dynamo=True``).

    Upstream problem: mmdeploy (checked up to 1.3.1, its latest release) calls
    ``torch.onnx.export`` without ``dynamo=``, and torch 2.9 made ``dynamo=True`` its default.
    Every export through mmdeploy then fails, whatever the backbone (mmdeploy's rewriters patch
    the model for TorchScript tracing; torch.export meets them and refuses the inputs' structure,
    and mmdeploy's cleanup fails on top with ``KeyError: -1``). Does nothing where the versions
    do not need it.
    """
    if not needed('torchscript_onnx_export'):
        yield
        return
    export = torch.onnx.export
    torch.onnx.export = functools.partial(export, dynamo=False)
    try:
        yield
    finally:
        torch.onnx.export = export


@contextlib.contextmanager
def onnx_cast_long() -> Iterator[None]:
    """Within this block, ``torch.onnx.symbolic_opset9._cast_Long`` exists.

    Upstream problem: mmdeploy's ONNX symbolic of mmcv's RoIAlign (checked up to 1.3.1; for
    every backend but TensorRT and PPLNN, ONNX Runtime's included, so every Mask R-CNN export to
    it) imports that helper, which newer torch no longer has (torch 2.13: ``ImportError: cannot
    import name '_cast_Long'``).
    It is a cast to int64; it is added for the block only, where the module lacks it.
    """
    import importlib
    # The module that ``from torch.onnx.symbolic_opset9 import ...`` reads (newer torch's
    # ``torch.onnx`` also has an attribute of that name: another module).
    symbolic_opset9 = importlib.import_module('torch.onnx.symbolic_opset9')
    if not needed('onnx_cast_long') or hasattr(symbolic_opset9, '_cast_Long'):
        yield
        return

    def _cast_Long(g, value, non_blocking):  # noqa: N802 (the name mmdeploy imports)
        return g.op('Cast', value, to_i=torch.onnx.TensorProtoDataType.INT64)

    symbolic_opset9._cast_Long = _cast_Long
    try:
        yield
    finally:
        del symbolic_opset9._cast_Long


# ------------------------------------------------------------------------------- mmcv images
def name_unreadable_images() -> None:
    """Make an image file that cannot be decoded fail with its name.

    Upstream problem: mmcv 2.x's ``LoadImageFromFile`` (used by mmdet and mmseg; checked up to
    2.2.0) lets the decoder's error through as it is: a 0-byte or corrupt image stops training with
    cv2's ``(-215:Assertion failed) !buf.empty()`` and no file name, somewhere among thousands.
    """
    if 'unreadable_images' in _applied or not needed('name_unreadable_images'):
        return
    from mmcv.transforms import LoadImageFromFile
    load = LoadImageFromFile.transform

    @functools.wraps(load)
    def transform(self, results: dict):
        try:
            return load(self, results)
        except Exception as exc:
            path = str(results.get('img_path'))
            if path in str(exc):  # e.g. FileNotFoundError already names it
                raise
            size = f'{osp.getsize(path)} bytes' if osp.isfile(path) else 'not a file'
            raise ValueError(f'cannot read image {path!r} ({size}): {type(exc).__name__}: '
                             f'{str(exc).strip()}') from exc

    LoadImageFromFile.transform = transform
    _applied.add('unreadable_images')


# --------------------------------------------------------------------- mmengine config scopes
def allow_davit_mm_config_scope() -> None:
    """Let configs inherit davit_mm's configs as ``_base_ = ['davit_mm::davit_maskrcnn_1x_coco.py']``.

    Upstream problem: mmengine 0.10.7 resolves ``PACKAGE::PATH`` bases only for the OpenMMLab
    packages it lists (``MODULE2PACKAGE``; others fail an assertion), only for a PATH with a folder
    (``mmdet::retinanet/x.py``; ``davit_mm::x.py`` is refused by a regex), and finds the package's
    ``.mim/configs`` through the distribution's location, which for an editable (PEP 660) install
    is site-packages, where no ``davit_mm`` folder exists. For the ``davit_mm`` scope only, this
    accepts a PATH without folder and points the lookup at the ``davit_mm`` package that is
    imported, whose ``.mim/configs`` holds the configs (a copy in a wheel, a symlink in a checkout).
    It also leaves what such a base brings without ``_scope_='davit_mm'``, which mmengine would
    put on every dict with a ``type``: davit_mm has no registries of its own (its modules are in
    mmdet's and mmseg's), so a hook or dataset built in that scope was looked up in mmengine's
    root registry and not found (``RandomStateHook is not in the mmengine::hook registry``). The
    dicts build under the config's ``default_scope``, as when the config is used by its path.
    Every other scope goes through mmengine unchanged.
    """
    if 'config_scope' in _applied or not needed('allow_davit_mm_config_scope'):
        return
    from mmengine.config import config as config_module
    from mmengine.config import utils as config_utils
    package_and_path, installed_path = (config_module._get_package_and_cfg_path,
                                        config_module.get_installed_path)
    cfg_path_and_scope = config_module.Config._get_cfg_path

    def get_cfg_path(cfg_path: str, filename: str):
        path, scope = cfg_path_and_scope(cfg_path, filename)
        return path, None if scope == 'davit_mm' else scope

    def get_package_and_cfg_path(cfg_path: str):
        scope, _, path = cfg_path.partition('::')
        if scope == 'davit_mm' and path and '::' not in path:
            return 'davit_mm', path
        return package_and_path(cfg_path)

    def get_installed_path(package: str) -> str:
        if package == 'davit_mm':
            return osp.dirname(osp.abspath(__file__))
        return installed_path(package)

    config_utils.MODULE2PACKAGE.setdefault('davit_mm', 'davit_mm')
    config_module._get_package_and_cfg_path = get_package_and_cfg_path
    config_module.get_installed_path = get_installed_path
    config_module.Config._get_cfg_path = staticmethod(get_cfg_path)
    _applied.add('config_scope')


# ------------------------------------------------------------------ mmseg label map folders
def make_evaluator_output_dirs(cfg, splits: Sequence[str]) -> None:
    """Create the ``output_dir`` of the ``splits``' evaluators (mmseg's ``IoUMetric``: where
    ``tools/test.py --out`` puts the label maps) on every process of an mmseg config.

    Upstream problem: mmseg 1.2.2's ``IoUMetric`` creates its ``output_dir`` on the main process
    only (in its constructor), while every process writes the label maps of its own images into
    it. In a distributed run a process that reached its first image before the main process had
    built the metric stopped with ``FileNotFoundError`` (``dist_test.sh CONFIG CKPT 2 --out DIR``
    with a new DIR), after the other processes' share of the evaluation.
    """
    if cfg.get('default_scope') != 'mmseg' or not needed('make_evaluator_output_dirs'):
        return
    for split in splits:
        if cfg.get(f'{split}_cfg') is None:
            continue
        evaluators = cfg.get(f'{split}_evaluator') or []
        for evaluator in evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]:
            output_dir = evaluator.get('output_dir') if isinstance(evaluator, dict) else None
            if isinstance(output_dir, str) and output_dir:
                os.makedirs(output_dir, exist_ok=True)


def apply_at_import() -> None:
    """The shims every process importing davit_mm needs, where its versions need them (idempotent)."""
    name_unreadable_images()
    allow_davit_mm_config_scope()
