"""The one place where davit_mm registers its modules into OpenMMLab registries.

Importing :mod:`davit_mm` calls :func:`register_all_modules`, so ``custom_imports =
dict(imports=['davit_mm'])`` in a config is enough for ``type='DaViT'`` to build under
``default_scope='mmdet'`` and ``default_scope='mmseg'``. Each library is used only if installed.
"""
import importlib
import importlib.util
from typing import List

# (registry attribute in <library>.registry, classes to register)
_LIBRARIES = ('mmdet', 'mmseg')


def _models_to_register() -> List[type]:
    from .models import DaViT
    return [DaViT]


def register_all_modules() -> List[str]:
    """Register davit_mm's models into mmdet's and mmseg's ``MODELS``; returns the libraries used.

    Idempotent. A library that is installed but fails to import (e.g. an mmcv it refuses)
    raises its own error rather than being skipped silently.
    """
    used = []
    for library in _LIBRARIES:
        if importlib.util.find_spec(library) is None:
            continue
        registry = importlib.import_module(f'{library}.registry').MODELS
        for cls in _models_to_register():
            existing = registry.module_dict.get(cls.__name__)
            if existing is cls:
                continue
            if existing is not None:
                raise KeyError(f'{library} already has a model named {cls.__name__!r} '
                               f'({existing.__module__}); davit_mm cannot register its own')
            registry.register_module(module=cls)
        used.append(library)
    return used
