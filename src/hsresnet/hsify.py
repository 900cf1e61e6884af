"""``hsify``: turn an existing torchvision or timm bottleneck ResNet/ResNeXt into its HS-ResNet counterpart.

Each bottleneck's 3x3 conv (``conv2``) becomes the HS block of Yuan et al. (arXiv 2010.07621, Sec. 3) and the 1x1
convs around it are resized to ``s * width`` channels, with ``width = floor(planes * w / 64)`` as in
``HSBottleneck`` (``docs/architecture.md``). Which weights carry over is documented in ``docs/hsify.md``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torchvision.models.resnet as tv_resnet
from timm.models import resnet as timm_resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from .layers import HSBlock, HSStridedBlock, adapt_norm_layer, check_hs_args
from .models import group_width

__all__ = ['hsify']

_BOTTLENECKS = (tv_resnet.Bottleneck, timm_resnet.Bottleneck)
_BASIC_BLOCKS = (tv_resnet.BasicBlock, timm_resnet.BasicBlock)
_SUPPORTED = (
    'plain torchvision.models.resnet.Bottleneck blocks (resnet50/101/152, resnext*, wide_resnet*, their detection '
    'and segmentation backbones) and timm.models.resnet.Bottleneck blocks without attention (se) or anti-aliasing '
    '(aa) layers (resnet26/50/101/152, their d/t variants, resnext*, wide_resnet*)'
)


@dataclass
class _Plan:
    """What one bottleneck becomes; built for every block before anything is changed."""

    path: str
    block: nn.Module
    width: int
    strided: bool
    norm1: Callable[..., nn.Module]
    norm2: Callable[..., nn.Module]
    norm3: Callable[..., nn.Module]
    act: Callable[..., nn.Module]


def _refuse(path: str, problem: str) -> ValueError:
    where = repr(path) if path else 'the model itself'
    return ValueError(f'hsify cannot convert {where}: {problem}. hsify supports {_SUPPORTED}.')


def _norm_factory(norm: nn.Module, path: str) -> Callable[..., nn.Module]:
    """``norm``'s class with its settings (eps, momentum ...), callable as ``norm_layer(C, device=, dtype=)``."""
    if type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        kwargs = dict(
            eps=norm.eps, momentum=norm.momentum, affine=norm.affine, track_running_stats=norm.track_running_stats
        )
        if isinstance(norm, nn.SyncBatchNorm):
            kwargs['process_group'] = norm.process_group
    elif type(norm) is FrozenBatchNorm2d:
        kwargs = dict(eps=norm.eps)
    else:
        raise _refuse(path, f'its norm layer is a {type(norm).__name__}; supported norms are BatchNorm2d, '
                      'SyncBatchNorm and torchvision FrozenBatchNorm2d')  # fmt: skip
    return adapt_norm_layer(functools.partial(type(norm), **kwargs))


def _act_factory(act: nn.Module, path: str) -> Callable[..., nn.Module]:
    """Copies of the block's activation (its settings kept), callable as ``act_layer(inplace=...)``."""
    if any(True for _ in act.parameters()):
        raise _refuse(path, f'its activation {type(act).__name__} has parameters')

    def act_layer(inplace: bool = False) -> nn.Module:
        new = copy.deepcopy(act)
        if hasattr(new, 'inplace'):
            new.inplace = inplace
        return new

    return act_layer


def _check_conv(conv: nn.Module, path: str, kernel: int) -> None:
    if type(conv) is not nn.Conv2d:
        raise _refuse(path, f'it is a {type(conv).__name__}, not an nn.Conv2d')
    square = len(set(conv.kernel_size)) == len(set(conv.stride)) == len(set(conv.dilation)) == 1
    if not square or conv.kernel_size[0] != kernel:
        raise _refuse(path, f'expected a square {kernel}x{kernel} conv, got kernel {conv.kernel_size}')
    if kernel == 1 and (conv.stride[0] != 1 or conv.groups != 1):
        raise _refuse(path, f'the 1x1 conv has stride {conv.stride} and groups {conv.groups}, expected 1 and 1 '
                      '(caffe-style blocks with the stride on conv1 are not supported)')  # fmt: skip
    if kernel == 3 and conv.padding != conv.dilation:
        raise _refuse(path, f'the 3x3 conv has padding {conv.padding} != dilation {conv.dilation}')


def _is_strided(block: nn.Module, next_block: Optional[nn.Module]) -> bool:
    """Nominal downsampling position (architecture.md): stride > 1, or the first block of a stage whose dilation grows.

    timm's Bottleneck stores its stage's dilation (``first_dilation != dilation`` marks that block, as in
    ``HSBottleneck``); torchvision's does not, so its next block in the stage, which has the grown dilation, tells.
    """
    stride, dilation = block.conv2.stride[0], block.conv2.dilation[0]
    if stride > 1:
        return True
    stage_dilation = getattr(block, 'dilation', None)
    if isinstance(stage_dilation, int):
        return dilation != stage_dilation
    return next_block is not None and next_block.conv2.dilation[0] > dilation


def _plan(model: nn.Module, w: int) -> List[_Plan]:
    """Check every bottleneck and decide what it becomes; raises before the model is touched."""
    blocks = [(p, m) for p, m in model.named_modules() if isinstance(m, _BOTTLENECKS)]
    for path, block in blocks:
        if type(block) not in _BOTTLENECKS:
            raise _refuse(
                path, f'it is a {type(block).__name__}, a subclass hsify does not know (its forward may differ)'
            )
    if not blocks:
        basic = [p for p, m in model.named_modules() if isinstance(m, _BASIC_BLOCKS)]
        found = (
            f'its residual blocks are BasicBlocks (first: {basic[0]!r}: two 3x3 convs, no 1x1 convs to resize)'
            if basic
            else 'it holds no ResNet bottleneck block'
        )
        raise ValueError(
            f'hsify found nothing to convert in {type(model).__name__}: {found}. hsify supports {_SUPPORTED}.'
        )

    stage_of = [p.rpartition('.')[0] for p, _ in blocks]  # the Sequential that holds the block
    plans = []
    for i, (path, block) in enumerate(blocks):
        timm_block = isinstance(block, timm_resnet.Bottleneck)
        _check_conv(block.conv1, f'{path}.conv1', 1)
        _check_conv(block.conv2, f'{path}.conv2', 3)
        _check_conv(block.conv3, f'{path}.conv3', 1)
        if timm_block and block.se is not None:
            raise _refuse(f'{path}.se', f'attention module {type(block.se).__name__} (the HS block has none)')
        if timm_block and not isinstance(block.aa, nn.Identity):
            raise _refuse(
                f'{path}.aa', f'anti-aliasing layer {type(block.aa).__name__} (the HS block downsamples itself)'
            )
        if not timm_block and type(block.relu) is not nn.ReLU:
            raise _refuse(f'{path}.relu', f'torchvision blocks share one activation, which must be nn.ReLU, got '
                          f'{type(block.relu).__name__}')  # fmt: skip
        outplanes = block.conv3.out_channels
        if outplanes % block.expansion:
            raise _refuse(f'{path}.conv3', f'{outplanes} output channels is not a multiple of {block.expansion}')
        planes = outplanes // block.expansion
        width = group_width(planes, w, repr(path))
        same_stage = i + 1 < len(blocks) and stage_of[i + 1] == stage_of[i]
        nxt = blocks[i + 1][1] if same_stage else None
        plans.append(
            _Plan(
                path=path,
                block=block,
                width=width,
                strided=_is_strided(block, nxt),
                norm1=_norm_factory(block.bn1, f'{path}.bn1'),
                norm2=_norm_factory(block.bn2, f'{path}.bn2'),
                norm3=_norm_factory(block.bn3, f'{path}.bn3'),
                act=_act_factory(block.act2 if timm_block else block.relu, path),
            )
        )
    return plans


def _like(new: nn.Module, old: nn.Module, channels_last: bool) -> nn.Module:
    """Give a new module the mode, trainability and memory format of the module it replaces (device/dtype are
    set at construction)."""
    new.train(old.training)
    old_param = next(old.parameters(), None)
    if old_param is not None:
        new.requires_grad_(old_param.requires_grad)
    if channels_last:
        new.to(memory_format=torch.channels_last)
    return new


def _init(module: nn.Module) -> None:
    """timm's ResNet init for new layers: kaiming-normal (fan_out, relu) convs; norms keep their fresh 1/0 affine."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _convert(plan: _Plan, s: int, down: str, zero_init_last: bool) -> None:
    block, width = plan.block, plan.width
    mid = s * width
    conv1, conv2, conv3 = block.conv1, block.conv2, block.conv3
    dd = {'device': conv2.weight.device, 'dtype': conv2.weight.dtype}
    cl = conv2.weight.is_contiguous(memory_format=torch.channels_last) and not conv2.weight.is_contiguous()

    if conv1.out_channels != mid:
        new_conv1 = nn.Conv2d(conv1.in_channels, mid, 1, bias=conv1.bias is not None, **dd)
        _init(new_conv1)
        new_bn1 = plan.norm1(mid, **dd)
        block.conv1, block.bn1 = _like(new_conv1, conv1, cl), _like(new_bn1, block.bn1, cl)

    stride, dilation = conv2.stride[0], conv2.dilation[0]
    if plan.strided:
        hs = HSStridedBlock(width, s, stride, dilation, down, plan.norm2, plan.act, **dd)
    else:
        hs = HSBlock(width, s, dilation, plan.norm2, plan.act, **dd)
    _init(hs)
    _like(hs, conv2, cl)
    for m in hs.modules():
        if isinstance(m, type(block.bn2)):
            _like(m, block.bn2, cl)
    block.conv2 = hs
    block.bn2 = nn.Identity().train(block.bn2.training)
    if isinstance(block, timm_resnet.Bottleneck):
        # the HS block ends in its own activation, as in HSBottleneck
        block.act2 = nn.Identity().train(block.act2.training)
    elif getattr(hs, 'down', None) == 'conv':
        # torchvision re-applies its shared ReLU after conv2: a no-op on the HS output (>= 0), but in place on the
        # strided conv's own ReLU output it would overwrite a tensor autograd keeps for that ReLU's backward.
        block.relu = nn.ReLU(inplace=False).train(block.relu.training)

    if conv3.in_channels != mid:
        new_conv3 = nn.Conv2d(mid, conv3.out_channels, 1, bias=conv3.bias is not None, **dd)
        _init(new_conv3)
        new_bn3 = plan.norm3(conv3.out_channels, **dd)
        if zero_init_last and getattr(new_bn3, 'weight', None) is not None:
            with torch.no_grad():
                new_bn3.weight.zero_()
        block.conv3, block.bn3 = _like(new_conv3, conv3, cl), _like(new_bn3, block.bn3, cl)


def hsify(
    model: nn.Module, w: int = 18, s: int = 5, down: str = 'pool_conv', *, zero_init_last: bool = True
) -> nn.Module:
    """Convert a torchvision or timm bottleneck ResNet/ResNeXt into its HS-ResNet counterpart, in place.

    In every bottleneck, ``conv2`` (the 3x3 conv) becomes an ``HSBlock``, or an ``HSStridedBlock`` at a nominal
    downsampling position (architecture.md); ``bn2`` becomes ``nn.Identity``; ``conv1``/``bn1`` and ``conv3``/``bn3``
    are rebuilt for ``s * floor(planes * w / 64)`` channels when that differs from their old width. Norm class,
    activation, dilation, device, dtype, train/eval mode and ``requires_grad`` of the replaced layers are kept.
    Stem, shortcuts and head keep their weights (see docs/hsify.md). A converted timm ``resnet50`` has exactly the
    state_dict of ``timm.create_model('hs_resnet50', w=w, s=s, down=down)``.

    Args:
        model: any module holding torchvision or timm ``Bottleneck`` blocks; changed in place (deepcopy it first to
            keep the original).
        w: group width per 64 planes (``width = floor(planes * w / 64)``); ``planes`` is the block's output
            channels / 4 for ResNets, ResNeXts and wide ResNets alike.
        s: split count, >= 2.
        down: strided-block style, ``'pool_conv'`` or ``'conv'``.
        zero_init_last: zero the gamma of every rebuilt ``bn3``, so each converted block starts as its shortcut.

    Returns:
        ``model`` itself, converted.

    Raises:
        ValueError: bad ``w``/``s``/``down``, no bottleneck in ``model``, or a bottleneck hsify cannot convert (the
            message names the module).
    """
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f'hsify: w={w!r} is invalid; w must be an integer >= 1 (the paper uses 12-28).')
    check_hs_args(1, s, down)
    plans = _plan(model, w)
    for plan in plans:
        _convert(plan, s, down, zero_init_last)
    return model
