"""davit_mm models: the DaViT backbone and the plain reference it is tested against."""
from .davit import ARCH_ZOO, ChannelAttention, DaViT, WindowAttention, resolve_arch
from .reference import ReferenceDaViT

__all__ = ['ARCH_ZOO', 'DaViT', 'ReferenceDaViT', 'WindowAttention', 'ChannelAttention',
           'resolve_arch']
