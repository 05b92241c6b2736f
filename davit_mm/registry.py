"""The one place where davit_mm registers its modules into OpenMMLab registries.

Importing :mod:`davit_mm` calls :func:`register_all_modules`, so ``custom_imports =
dict(imports=['davit_mm'])`` in a config is enough for ``type='DaViT'`` to build under
``default_scope='mmdet'`` and ``default_scope='mmseg'``. Each library is used only if installed.
"""
import importlib
import importlib.util
from typing import Dict, List

from mmengine.fileio import register_backend

# The libraries whose registries davit_mm fills, and whose configs its tools run.
LIBRARIES = ('mmdet', 'mmseg')
# The file backend davit_mm's configs give the CheckpointHook (backend_args).
ATOMIC_BACKEND = 'davit_mm_atomic'


def _to_register(library: str) -> Dict[str, List[type]]:
    """Registry name -> davit_mm classes to put into ``library``'s registries."""
    from .engine import (OfficialCheckpointHook, PositionSeededDataset, PositionSeededSampler,
                         RandomStateHook, RunnerCheckpointsHook)
    from .models import DaViT
    from .transforms import CheckAnnotationSize, CheckSegMap
    models = [DaViT]
    if library == 'mmdet':
        from .tta import DetTTAModelWithMasks
        models.append(DetTTAModelWithMasks)
    transforms = [CheckAnnotationSize] if library == 'mmdet' else [CheckSegMap]
    return dict(MODELS=models, HOOKS=[RandomStateHook, OfficialCheckpointHook, RunnerCheckpointsHook],
                DATASETS=[PositionSeededDataset], DATA_SAMPLERS=[PositionSeededSampler],
                TRANSFORMS=transforms)


def register_all_modules() -> List[str]:
    """Register davit_mm's models, hooks and data checks into mmdet's and mmseg's registries, and its
    checkpoint file backend into mmengine's; returns the libraries used.

    Idempotent. A library that is installed but fails to import (e.g. an mmcv it refuses)
    raises its own error rather than being skipped silently.
    """
    from .engine import AtomicLocalBackend
    register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)
    used = []
    for library in LIBRARIES:
        if importlib.util.find_spec(library) is None:
            continue
        registries = importlib.import_module(f'{library}.registry')
        for registry_name, classes in _to_register(library).items():
            registry = getattr(registries, registry_name)
            for cls in classes:
                existing = registry.module_dict.get(cls.__name__)
                if existing is cls:
                    continue
                if existing is not None:
                    raise KeyError(f'{library} already has a {registry_name} entry named '
                                   f'{cls.__name__!r} ({existing.__module__}); davit_mm cannot '
                                   f'register its own')
                registry.register_module(module=cls)
        used.append(library)
    return used
