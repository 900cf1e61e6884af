"""hsresnet: HS-ResNet, the Hierarchical-Split block CNN (Yuan et al., arXiv 2010.07621), native to timm.

``import hsresnet`` registers the ``hs_resnet*`` family into timm, so ``timm.create_model('hs_resnet50')`` works.
"""

from . import baselines  # noqa: F401  (registers the same-skeleton baselines into timm)
from .factory import create_model
from .hsify import hsify
from .layers import HSBlock, HSStridedBlock, hs_widths
from .models import HSBottleneck, HSResNet
from .optimize import optimize

__version__ = '0.1.0'

__all__ = [
    'create_model',
    'hsify',
    'HSBlock',
    'HSStridedBlock',
    'HSBottleneck',
    'HSResNet',
    'hs_widths',
    'optimize',
    '__version__',
]
