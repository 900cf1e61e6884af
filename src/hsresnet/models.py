"""HS-ResNet (Yuan et al., arXiv 2010.07621): ResNet with the Hierarchical-Split block, registered into timm.

The family reuses timm's ``ResNet`` skeleton (stem, stages, output stride, drop path, feature info, heads) and
only adds its bottleneck, as timm's ``res2net.py`` does. ``w`` is the group width per 64 planes (timm's
``base_width``), ``s`` the split count and ``down`` the strided-block style; every entry point takes all three.
"""

# No `from __future__ import annotations` here: TorchScript cannot resolve string annotations on the
# @torch.jit.unused methods of HSBottleneck (scripting the whole model then fails).
import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import ResNet

from .layers import HSBlock, HSStridedBlock, adapt_norm_layer, check_hs_args, has_hooks

__all__ = ['HSBottleneck', 'HSResNet', 'LAYOUTS', 'PRESETS', 'D_VARIANT_KWARGS', 'group_width', 'use_small_input_stem']

LAYOUTS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# (w, s) of the named ResNet-50 presets, see docs/architecture.md (budget-matched to ResNet-50 except 28w_6s)
PRESETS = {'18w_5s': (18, 5), '22w_4s': (22, 4), '16w_6s': (16, 6), '12w_8s': (12, 8), '28w_6s': (28, 6)}


def group_width(planes: int, w: int, where: str = 'a stage') -> int:
    """The group width of a bottleneck with ``planes``: ``floor(planes * w / 64)`` (spec, "The bottleneck")."""
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f'HS-ResNet: w={w!r} is invalid; w must be an integer >= 1 (the paper uses 12-28).')
    width = planes * w // 64
    if width < 1:
        raise ValueError(
            f'HS-ResNet: w={w} gives width floor({planes} * {w} / 64) = 0 at {where} ({planes} planes); '
            f'use w >= {math.ceil(64 / planes)}.'
        )
    return width


class HSBottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 conv is an HS block: 1x1 conv, HS block, 1x1 conv, residual add.

    The HS block takes the 3x3 conv's name (``conv2``) and brings its own norm and activation. The first block
    of stages 2-4 (``stride > 1``, or a dilation that grows there in a dilated network) gets the strided block.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        base_width: int = 18,
        s: int = 5,
        down: str = 'pool_conv',
        reduce_first: int = 1,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        aa_layer: Optional[Callable[..., nn.Module]] = None,
        drop_block: Optional[Callable[[], nn.Module]] = None,
        drop_path: Optional[nn.Module] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if cardinality != 1 or reduce_first != 1 or aa_layer is not None:
            raise ValueError(
                f'HSBottleneck supports cardinality=1, block_reduce_first=1 and aa_layer=None, got {cardinality}, '
                f'{reduce_first}, {aa_layer}: the HS block defines its own grouping (s) and downsampling (down).'
            )
        width = group_width(planes, base_width)
        check_hs_args(width, s, down)
        dd = {'device': device, 'dtype': dtype}
        mid = s * width
        first_dilation = first_dilation or dilation
        outplanes = planes * self.expansion

        self.conv1 = nn.Conv2d(inplanes, mid, 1, bias=False, **dd)
        self.bn1 = norm_layer(mid, **dd)
        self.act1 = act_layer(inplace=True)
        if stride > 1 or first_dilation != dilation:  # nominal downsampling position, see HSStridedBlock
            self.conv2 = HSStridedBlock(width, s, stride, first_dilation, down, norm_layer, act_layer, **dd)
        else:
            self.conv2 = HSBlock(width, s, dilation, norm_layer, act_layer, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.conv3 = nn.Conv2d(mid, outplanes, 1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    @torch.jit.unused
    def _fuse_conv2_conv3(self, x: torch.Tensor) -> bool:
        """Eager training: conv3 can take the HS block's pieces without their concat being stored
        (``forward_into`` of the block)."""
        return (
            isinstance(self.conv2, (HSBlock, HSStridedBlock))
            and isinstance(self.drop_block, nn.Identity)
            and torch.is_grad_enabled()
            and not has_hooks(self.conv2)
        )

    @torch.jit.unused
    def _conv2_conv3(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2.forward_into(x, self.conv3)

    def zero_init_last(self) -> None:
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        out = self.act1(self.bn1(self.conv1(x)))
        if not torch.jit.is_scripting() and self._fuse_conv2_conv3(out):
            out = self._conv2_conv3(out)
        else:
            out = self.conv3(self.drop_block(self.conv2(out)))
        out = self.bn3(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += shortcut
        return self.act3(out)


@torch.fx.wrap
def check_input_channels(x: torch.Tensor, in_chans: int) -> None:
    """Refuse an input whose channel count differs from the model's ``in_chans`` (not traced by fx)."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f'HS-ResNet input has shape {list(x.shape)} but the model was built with in_chans={in_chans}: pass an '
            f'(N, {in_chans}, H, W) tensor, or build the model with in_chans equal to the input channels.'
        )


class ChannelCheckedConv2d(nn.Conv2d):
    """The stem's first conv: an ``nn.Conv2d`` (same state_dict) that names a wrong input channel count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_channels(x, self.in_channels)
        return self._conv_forward(x, self.weight, self.bias)


class HSResNet(ResNet):
    """timm's ``ResNet`` built from ``HSBottleneck``s.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for HS-ResNet50.
        w: group width per 64 planes: a stage with ``planes`` has ``s`` groups of ``floor(planes * w / 64)``.
        s: split count (>= 2).
        down: strided block style, ``'pool_conv'`` (default) or ``'conv'``.
        small_input: for 28-64 px images: the stem's first conv is 3x3 with stride 1 and there is no max-pool.
            ``output_stride`` stays nominal (that of the 224 px stem): the real strides are 4x smaller, as
            ``feature_info`` reports.
        **kwargs: anything timm's ``ResNet`` takes (``num_classes``, ``in_chans``, ``output_stride``,
            ``stem_type``, ``avg_down``, ``channels``, ``drop_path_rate`` ...).
    """

    def __init__(
        self,
        layers: Sequence[int],
        w: int = 18,
        s: int = 5,
        down: str = 'pool_conv',
        small_input: bool = False,
        norm_layer: Any = nn.BatchNorm2d,
        output_stride: int = 32,
        channels: Sequence[int] = (64, 128, 256, 512),
        **kwargs,
    ):
        check_hs_args(group_width(min(channels), w, 'the narrowest stage'), s, down)
        if output_stride not in (8, 16, 32):
            raise ValueError(f'HS-ResNet: output_stride={output_stride!r} is invalid; choose 8, 16 or 32.')
        if 'block' in kwargs or 'block_args' in kwargs:
            raise ValueError('HS-ResNet builds its own blocks: pass w=, s= and down= instead of block/block_args.')
        super().__init__(
            block=HSBottleneck,
            layers=tuple(layers),
            base_width=w,
            block_args=dict(s=s, down=down),
            norm_layer=adapt_norm_layer(norm_layer),
            output_stride=output_stride,
            channels=tuple(channels),
            **kwargs,
        )
        self.w, self.s, self.down, self.small_input = w, s, down, small_input
        self.inplanes = self.num_features  # as in torchvision's ResNet: its _resnet_fpn_extractor reads it
        self._check_stem_channels(small_input)

    def _check_stem_channels(self, small_input: bool) -> None:
        """Make the first stem conv a ``ChannelCheckedConv2d`` (3x3 with stride 1 for small inputs)."""
        if small_input:
            use_small_input_stem(self, ChannelCheckedConv2d)
            return
        deep = isinstance(self.conv1, nn.Sequential)
        old = self.conv1[0] if deep else self.conv1
        new = ChannelCheckedConv2d(
            old.in_channels,
            old.out_channels,
            old.kernel_size,
            old.stride,
            old.padding,
            bias=False,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        new.weight = old.weight
        if deep:
            self.conv1[0] = new
        else:
            self.conv1 = new


def use_small_input_stem(model: ResNet, conv_layer: Callable[..., nn.Conv2d] = nn.Conv2d) -> ResNet:
    """Give a timm ``ResNet`` the stem for 28-64 px images, in place: its first conv becomes a freshly initialised
    3x3 ``conv_layer`` with stride 1 and the max-pool goes, so stage 1 sees the image at full resolution;
    ``feature_info`` reports the 4x smaller reductions. Shared by ``hs_resnet26_small`` and its baselines."""
    deep = isinstance(model.conv1, nn.Sequential)
    old = model.conv1[0] if deep else model.conv1
    new = conv_layer(
        old.in_channels, old.out_channels, 3, 1, 1, bias=False, device=old.weight.device, dtype=old.weight.dtype
    )
    if not new.weight.is_meta:
        nn.init.kaiming_normal_(new.weight, mode='fan_out', nonlinearity='relu')
    if deep:
        model.conv1[0] = new
    else:
        model.conv1 = new
    model.maxpool = nn.Identity()
    for info in model.feature_info:
        info['reduction'] = max(1, info['reduction'] // 4)
    return model


def _create_hs_resnet(variant: str, depth: int, pretrained: bool, kwargs: Dict[str, Any], **defaults) -> HSResNet:
    """Build ``variant`` with the layout of ``depth``; the user's kwargs override the variant's defaults."""
    return build_model_with_cfg(HSResNet, variant, pretrained, layers=LAYOUTS[depth], **{**defaults, **kwargs})


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
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2010.07621',
        **kwargs,
    }


_dcfg = dict(first_conv='conv1.0')
default_cfgs = generate_default_cfgs(
    {
        'hs_resnet26': _cfg(),
        'hs_resnet50': _cfg(),
        'hs_resnet101': _cfg(),
        'hs_resnet152': _cfg(),
        'hs_resnet26d': _cfg(**_dcfg),
        'hs_resnet50d': _cfg(**_dcfg),
        'hs_resnet101d': _cfg(**_dcfg),
        'hs_resnet152d': _cfg(**_dcfg),
        **{f'hs_resnet50_{name}': _cfg() for name in PRESETS},
        'hs_resnet26_small': _cfg(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
    }
)


D_VARIANT_KWARGS = dict(stem_type='deep', stem_width=32, avg_down=True)  # the 'd' variants: deep stem, avg-down


@register_model
def hs_resnet26(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-26, layout (2, 2, 2, 2), w=18, s=5 by default."""
    return _create_hs_resnet('hs_resnet26', 26, pretrained, kwargs)


@register_model
def hs_resnet50(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-50 = ``hs_resnet50_18w_5s``, budget-matched to ResNet-50 (see docs/architecture.md)."""
    return _create_hs_resnet('hs_resnet50', 50, pretrained, kwargs)


@register_model
def hs_resnet101(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-101, layout (3, 4, 23, 3), w=18, s=5 by default."""
    return _create_hs_resnet('hs_resnet101', 101, pretrained, kwargs)


@register_model
def hs_resnet152(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-152, layout (3, 8, 36, 3), w=18, s=5 by default."""
    return _create_hs_resnet('hs_resnet152', 152, pretrained, kwargs)


@register_model
def hs_resnet26d(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-26-D: deep 3x3 stem (32-32-64) and avg-down shortcuts."""
    return _create_hs_resnet('hs_resnet26d', 26, pretrained, kwargs, **D_VARIANT_KWARGS)


@register_model
def hs_resnet50d(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-50-D (PaddleClas ``vd``): deep 3x3 stem (32-32-64) and avg-down shortcuts."""
    return _create_hs_resnet('hs_resnet50d', 50, pretrained, kwargs, **D_VARIANT_KWARGS)


@register_model
def hs_resnet101d(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-101-D: deep 3x3 stem (32-32-64) and avg-down shortcuts."""
    return _create_hs_resnet('hs_resnet101d', 101, pretrained, kwargs, **D_VARIANT_KWARGS)


@register_model
def hs_resnet152d(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-152-D: deep 3x3 stem (32-32-64) and avg-down shortcuts."""
    return _create_hs_resnet('hs_resnet152d', 152, pretrained, kwargs, **D_VARIANT_KWARGS)


@register_model
def hs_resnet50_18w_5s(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-50, w=18, s=5: 25.4 M params / 4.22 GMACs, the preset closest to ResNet-50 (= hs_resnet50)."""
    return _create_hs_resnet('hs_resnet50_18w_5s', 50, pretrained, kwargs, w=18, s=5)


@register_model
def hs_resnet50_22w_4s(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-50, w=22, s=4: budget-matched to ResNet-50 (0.98x params, 1.01x MACs)."""
    return _create_hs_resnet('hs_resnet50_22w_4s', 50, pretrained, kwargs, w=22, s=4)


@register_model
def hs_resnet50_16w_6s(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-50, w=16, s=6: near ResNet-50's budget (1.05x params, 1.10x MACs)."""
    return _create_hs_resnet('hs_resnet50_16w_6s', 50, pretrained, kwargs, w=16, s=6)


@register_model
def hs_resnet50_12w_8s(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-50, w=12, s=8: near ResNet-50's budget (1.01x params, 1.06x MACs)."""
    return _create_hs_resnet('hs_resnet50_12w_8s', 50, pretrained, kwargs, w=12, s=8)


@register_model
def hs_resnet50_28w_6s(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-50, w=28, s=6: the name of Baidu's benchmark chart (81.26 % at 5.37 ms on a T4). With the spec's
    arithmetic it costs about 2x ResNet-50 (53.8 M params / 9.33 GMACs); the public record cannot resolve that."""
    return _create_hs_resnet('hs_resnet50_28w_6s', 50, pretrained, kwargs, w=28, s=6)


@register_model
def hs_resnet26_small(pretrained: bool = False, **kwargs) -> HSResNet:
    """HS-ResNet-26 for 28-64 px images (Fashion-MNIST, CIFAR): 3x3 stride-1 stem, no max-pool, half the channels
    of HS-ResNet-26 (stages 32-64-128-256 planes), w=24, s=4. Reductions (1, 1, 2, 4, 8)."""
    small = dict(w=24, s=4, small_input=True, channels=(32, 64, 128, 256))
    return _create_hs_resnet('hs_resnet26_small', 26, pretrained, kwargs, **small)
