"""Environment shims. Each one works around one named upstream problem, as narrowly as possible, and
is applied once when davit_mm is imported (``custom_imports`` in every davit_mm config does that in
every training/testing process).
"""
import os.path as osp
import pickle
from typing import List

import torch
import torch.distributed as dist

_applied = set()


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


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read the checkpoints mmengine's runner writes.

    Upstream problem: torch >= 2.6 defaults ``torch.load`` to ``weights_only=True``, and mmengine
    0.10.7's ``CheckpointLoader`` calls ``torch.load`` without ``weights_only``, so ``load_from``,
    ``resume`` and ``tools/test.py`` fail on the runner's own checkpoints, whose ``message_hub``
    holds ``HistoryBuffer`` objects with numpy arrays (mmengine issue 1655; fixed upstream after
    0.10.7). Instead of turning ``weights_only`` off, this allowlists exactly the globals those
    checkpoints contain (found with ``torch.serialization.get_unsafe_globals_in_checkpoint``).
    """
    if 'mmengine_checkpoints' in _applied or not hasattr(torch.serialization, 'add_safe_globals'):
        return
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
    torch.serialization.add_safe_globals(safe)
    _applied.add('mmengine_checkpoints')


_SYNC_BN_TYPES = ('SyncBN', 'SyncBatchNorm', 'MMSyncBN')


def _replace_sync_bn(node) -> int:
    """Turn every SyncBN norm config inside a (nested) config into BN; returns how many."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in _SYNC_BN_TYPES:
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def adapt_config_to_machine(cfg, launcher: str = 'none') -> List[str]:
    """Make one config run unchanged on 8 GPUs, 1 GPU or a CPU-only machine; returns what changed.

    The single place davit_mm's tools adapt a config to the machine (and refuse what cannot run:
    mixed precision without a GPU):

    - SyncBN (the paper's segmentation setting) only works on CUDA with several processes, and
      has no CPU implementation: it becomes BN for a non-distributed or CPU-only run.
    - Upstream problem: mmengine 0.10.7's ``_init_dist_pytorch`` calls ``torch.cuda.set_device``
      and its runner wraps the model in DDP with ``device_ids=[LOCAL_RANK]`` unconditionally, so
      ``--launcher pytorch`` cannot run on a machine without CUDA. Here the process group is
      initialised with gloo first (mmengine then skips its own init) and the wrapper gets
      ``device_ids=None``, which is what DDP needs for CPU modules.
    """
    distributed = launcher != 'none'
    cuda = torch.cuda.is_available()
    notes = []
    optim_wrapper = cfg.get('optim_wrapper') or {}
    if optim_wrapper.get('type') == 'AmpOptimWrapper' and not cuda:
        raise ValueError("optim_wrapper.type='AmpOptimWrapper' (--amp or an *_amp config) needs a "
                         "GPU: mmengine's AmpOptimWrapper supports cuda/npu/mlu/musa only, and this "
                         "machine has no CUDA device; train without --amp here")
    if not (distributed and cuda):
        converted = _replace_sync_bn(cfg.get('model', {}))
        if converted:
            notes.append(f'SyncBN -> BN in {converted} norm configs (SyncBN needs CUDA and several '
                         f'processes)')
    if distributed and not cuda:
        if launcher != 'pytorch':
            raise ValueError(f'--launcher {launcher!r} needs CUDA; on a CPU-only machine use '
                             f"--launcher 'pytorch' (tools/dist_train.sh / dist_test.sh)")
        env_cfg = cfg.setdefault('env_cfg', {})
        env_cfg['dist_cfg'] = dict(env_cfg.get('dist_cfg', {}), backend='gloo')
        if not dist.is_initialized():
            dist.init_process_group(backend='gloo')
        wrapper = dict(cfg.get('model_wrapper_cfg') or dict(
            type='MMDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False)))
        wrapper['device_ids'] = None
        cfg.model_wrapper_cfg = wrapper
        notes.append('no CUDA: distributed over gloo, DDP without device_ids')
    return notes


def close_distributed() -> None:
    """Tear the process group down once the run is over.

    Upstream problem: mmengine 0.10.7 never destroys the process group it (or
    :func:`adapt_config_to_machine`) created; a process then exiting while gloo's threads are
    still running can die with "terminate called without an active exception" (SIGABRT) after
    a successful run, and NCCL warns about the leak. The barrier keeps ranks from tearing down
    while others still communicate.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def name_unreadable_images() -> None:
    """Make an image file that cannot be decoded fail with its name.

    Upstream problem: mmcv 2.1's ``LoadImageFromFile`` (used by mmdet and mmseg) lets the decoder's
    error through as it is: a 0-byte or corrupt image stops training with cv2's
    ``(-215:Assertion failed) !buf.empty()`` and no file name, somewhere among thousands of images.
    """
    if 'unreadable_images' in _applied:
        return
    import functools

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


def allow_davit_mm_config_scope() -> None:
    """Let configs inherit davit_mm's configs as ``_base_ = ['davit_mm::davit_maskrcnn_1x_coco.py']``.

    Upstream problem: mmengine 0.10.7 resolves ``PACKAGE::PATH`` bases only for the OpenMMLab
    packages it lists (``MODULE2PACKAGE``; others fail an assertion), only for a PATH with a folder
    (``mmdet::retinanet/x.py``; ``davit_mm::x.py`` is refused by a regex), and finds the package's
    ``.mim/configs`` through the distribution's location, which for an editable (PEP 660) install
    is site-packages, where no ``davit_mm`` folder exists. For the ``davit_mm`` scope only, this
    accepts a PATH without folder and points the lookup at the ``davit_mm`` package that is
    imported, whose ``.mim/configs`` holds the configs (a copy in a wheel, a symlink in a checkout).
    Every other scope goes through mmengine unchanged. Applies in processes that import davit_mm
    before parsing a config: davit_mm's tools (also when run by mim) and scripts that
    ``import davit_mm`` first.
    """
    if 'config_scope' in _applied:
        return
    import os.path as osp

    from mmengine.config import config as config_module
    from mmengine.config import utils as config_utils
    package_and_path, installed_path = (config_module._get_package_and_cfg_path,
                                        config_module.get_installed_path)

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
    _applied.add('config_scope')


def apply_all() -> None:
    """Apply every shim that fits the installed environment (idempotent)."""
    allow_mmengine_checkpoints()
    name_unreadable_images()
    allow_davit_mm_config_scope()
