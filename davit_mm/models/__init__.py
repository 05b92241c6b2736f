"""davit_mm models: the DaViT backbone. (:mod:`davit_mm.models.reference` holds the plain restatement
of the official code it is tested and benchmarked against; it is not part of the API.)"""
from .davit import ARCH_ZOO, ChannelAttention, DaViT, WindowAttention, resolve_arch

__all__ = ['ARCH_ZOO', 'DaViT', 'WindowAttention', 'ChannelAttention', 'resolve_arch']
