"""Environment shims. Each one works around one named upstream problem, as narrowly as possible, and
is applied once when davit_mm is imported (``custom_imports`` in every davit_mm config does that in
every training/testing process).
"""
import pickle

import torch

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


def apply_all() -> None:
    """Apply every shim that fits the installed environment (idempotent)."""
    allow_mmengine_checkpoints()
