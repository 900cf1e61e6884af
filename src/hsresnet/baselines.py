"""Same-skeleton baselines: HS-ResNet's network with another operator in place of the bottleneck's 3x3 conv.

For controlled comparisons (``hsresnet study``, docs/study.md) every model below is timm's ``ResNet`` with the
layout, stem and stage widths of an HS-ResNet; only the bottleneck differs, taken from timm as it stands:

- ``resnet``: a plain 3x3 conv (He et al. 2016), timm's ``Bottleneck``;
- ``res2net``: hierarchical residual 3x3 convs over 4 groups (Gao et al. 2019), timm's ``Bottle2neck``;
- ``resnest``: split attention with radix 2 (Zhang et al. 2020); strided blocks average-pool before the split
  attention (``avd_first``, the setting of timm's ``resnest50d_4s2x40d``), else the strided block's 3x3 runs at the
  input resolution and the model has 25 % more MACs than params at one width;
- ``skresnet``: selective kernels, 3x3 and dilated 3x3 paths on split inputs (Li et al. 2019);
- ``seresnet``: a 3x3 conv with squeeze-and-excitation on the block output (Hu et al. 2018).

``base_width`` sets each bottleneck's width as in timm (``floor(planes * base_width / 64)`` per group);
``hsresnet.study`` solves it so that params and MACs match an HS model's budget. ``<op>26_small`` share the stem and
widths of ``hs_resnet26_small`` (3x3 stride-1 stem, no max-pool, stages 32-64-128-256 planes; ``channels=``
changes them); ``res2net26`` is Res2Net on timm's ``resnet26`` skeleton (timm has ``resnet26`` itself).
"""

from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.res2net import Bottle2neck
from timm.models.resnest import ResNestBottleneck
from timm.models.resnet import Bottleneck, ResNet
from timm.models.sknet import SelectiveKernelBottleneck

from .models import LAYOUTS, use_small_input_stem

__all__ = ['OPERATORS', 'SMALL_CHANNELS']

# operator -> (bottleneck class, block_args, default base_width): timm's own settings for its 50-layer models
OPERATORS: Dict[str, tuple] = {
    'resnet': (Bottleneck, {}, 64),
    'res2net': (Bottle2neck, {'scale': 4}, 26),
    'resnest': (ResNestBottleneck, {'radix': 2, 'avd': True, 'avd_first': True}, 64),
    'skresnet': (SelectiveKernelBottleneck, {'sk_kwargs': {'split_input': True}}, 64),
    'seresnet': (Bottleneck, {'attn_layer': 'se'}, 64),
}
SMALL_CHANNELS = (32, 64, 128, 256)  # the stage widths of hs_resnet26_small


class SkeletonResNet(ResNet):
    """timm's ``ResNet`` with one of :data:`OPERATORS` in its bottlenecks and, with ``small_input``, the stem of
    ``hs_resnet26_small`` (:func:`hsresnet.models.use_small_input_stem`)."""

    def __init__(self, op: str, small_input: bool = False, block_args: Any = None, **kwargs):
        if op not in OPERATORS:
            raise ValueError(f'unknown operator {op!r}; choose one of {sorted(OPERATORS)}.')
        if 'block' in kwargs:
            raise ValueError(f'{op} baselines build their own blocks: pass base_width= (and block_args=) instead.')
        block, default_args, default_width = OPERATORS[op]
        kwargs.setdefault('base_width', default_width)
        super().__init__(block=block, block_args={**default_args, **(block_args or {})}, **kwargs)
        self.op, self.small_input = op, small_input
        if small_input:
            use_small_input_stem(self)


def _create(variant: str, op: str, pretrained: bool, kwargs: Dict[str, Any], **defaults) -> SkeletonResNet:
    return build_model_with_cfg(
        SkeletonResNet, variant, pretrained, op=op, layers=LAYOUTS[26], **{**defaults, **kwargs}
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1',
        'classifier': 'fc',
        **kwargs,
    }


_small = dict(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0)
default_cfgs = generate_default_cfgs({**{f'{op}26_small': _cfg(**_small) for op in OPERATORS}, 'res2net26': _cfg()})
SMALL = dict(small_input=True, channels=SMALL_CHANNELS)


@register_model
def resnet26_small(pretrained: bool = False, **kwargs) -> SkeletonResNet:
    """ResNet-26 (plain 3x3 conv) on the skeleton of ``hs_resnet26_small``."""
    return _create('resnet26_small', 'resnet', pretrained, kwargs, **SMALL)


@register_model
def res2net26_small(pretrained: bool = False, **kwargs) -> SkeletonResNet:
    """Res2Net-26 (scale 4) on the skeleton of ``hs_resnet26_small``."""
    return _create('res2net26_small', 'res2net', pretrained, kwargs, **SMALL)


@register_model
def resnest26_small(pretrained: bool = False, **kwargs) -> SkeletonResNet:
    """ResNeSt-26 (radix 2, avg-pool downsampling in the block) on the skeleton of ``hs_resnet26_small``."""
    return _create('resnest26_small', 'resnest', pretrained, kwargs, **SMALL)


@register_model
def skresnet26_small(pretrained: bool = False, **kwargs) -> SkeletonResNet:
    """Selective-kernel ResNet-26 (split inputs, as timm's skresnet50) on the skeleton of ``hs_resnet26_small``."""
    return _create('skresnet26_small', 'skresnet', pretrained, kwargs, **SMALL)


@register_model
def seresnet26_small(pretrained: bool = False, **kwargs) -> SkeletonResNet:
    """SE-ResNet-26 on the skeleton of ``hs_resnet26_small``."""
    return _create('seresnet26_small', 'seresnet', pretrained, kwargs, **SMALL)


@register_model
def res2net26(pretrained: bool = False, **kwargs) -> SkeletonResNet:
    """Res2Net-26 (scale 4) on timm's ``resnet26`` skeleton (7x7 stem, max-pool, stages 64-512 planes)."""
    return _create('res2net26', 'res2net', pretrained, kwargs)
