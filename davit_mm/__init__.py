"""davit_mm: DaViT (Dual Attention Vision Transformer) backbones for OpenMMLab 2.0.

Importing the package applies the environment shims (:mod:`davit_mm.compat`) and registers
``DaViT`` into mmdet's and mmseg's model registries (:mod:`davit_mm.registry`).
"""
from . import compat
from .models import DaViT
from .registry import register_all_modules
from .version import __version__

compat.apply_all()
register_all_modules()

__all__ = ['DaViT', '__version__', 'register_all_modules']
