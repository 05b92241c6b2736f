"""davit_mm: DaViT (Dual Attention Vision Transformer) backbones for OpenMMLab 2.0.

Importing the package applies the environment shims its installed versions need
(:func:`davit_mm.compat.apply_at_import`) and registers ``DaViT`` and its hooks into mmdet's and
mmseg's registries (:mod:`davit_mm.registry`). docs/architecture.md draws the modules.
"""
from . import compat
from .models import DaViT
from .registry import register_all_modules
from .version import __version__

compat.apply_at_import()
register_all_modules()

__all__ = ['DaViT', '__version__', 'register_all_modules']
