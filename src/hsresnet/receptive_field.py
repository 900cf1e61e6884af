"""Receptive fields of HS blocks and of trained networks (RQ1: does one block see several scales?).

Two measures of which input pixels an output position depends on:

- the theoretical receptive field: the extent of the inputs it can depend on at all. Measured, not derived: with
  every conv weight made positive, norms made identities and a positive input, no path through the module is
  silenced by a ReLU, so the gradient of the output's centre is non-zero exactly on its receptive field;
- the effective receptive field (Luo et al. 2016, "Understanding the Effective Receptive Field in Deep
  Convolutional Neural Networks"): the mean absolute gradient of the output's centre with respect to the input,
  over real images, and its size: the side of the smallest square around the centre that holds a fixed share of
  that gradient mass (95 % by default).

For one block the output is split into the channel groups of its output concat (``y_1``, ``y_{2,1}``, ...,
``y_s`` for the HS block, the spec's cascade in docs/architecture.md); the same is measured for a plain 3x3 conv and
for Res2Net's 3x3 part (timm's ``Bottle2neck`` with its 1x1 convs and shortcut removed) of the same width. For a
trained network every output channel of every stage gets its own effective field, whose spread shows how many
scales a stage mixes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import HSBlock

__all__ = [
    'Group',
    'block_groups',
    'effective_rf',
    'erf_size',
    'network_erf_sizes',
    'plain_conv',
    'res2net_part',
    'theoretical_rf',
]


@dataclass(frozen=True)
class Group:
    """A named slice of output channels, ``[start, stop)``."""

    name: str
    start: int
    stop: int


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def plain_conv(channels: int) -> nn.Module:
    """The single-scale baseline: a 3x3 conv + BN + ReLU on all channels (the operator the HS block replaces)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())


def res2net_part(width: int, scale: int) -> nn.Module:
    """timm's Res2Net bottleneck reduced to its 3x3 part on ``width * scale`` channels: conv1, conv3 (with their
    norms) and the shortcut become identities or zero, so the output is ``cat(y_1, ..., y_{scale-1}, x_scale)``."""
    from timm.models.res2net import Bottle2neck

    block = Bottle2neck(width * scale, 64, base_width=width, scale=scale, norm_layer=nn.BatchNorm2d)  # width w
    block.conv1, block.bn1, block.conv3, block.bn3 = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
    block.downsample = _Zero()  # set after construction: a shortcut given to the constructor would stop the cascade
    block.relu = nn.ReLU()  # also applied to the input (its bn1's activation): not in place on the caller's tensor
    return block


def block_groups(kind: str, width: int, s: int) -> Tuple[nn.Module, List[Group], List[int]]:
    """(module, its output groups, each group's theoretical receptive field by construction) of an ``'hs'`` block,
    a ``'res2net'`` 3x3 part or a plain ``'conv'``, all mapping ``s * width`` channels to as many."""
    if kind == 'hs':
        block = HSBlock(width, s)
        sizes = [width, *block.out_widths]
        names = ['y_1'] + [f'y_{{{i},1}}' for i in range(2, s)] + [f'y_{s}']
        fields = [1] + [1 + 2 * (i - 1) for i in range(2, s + 1)]
    elif kind == 'res2net':
        block = res2net_part(width, s)
        sizes = [width] * s
        names = [f'y_{i}' for i in range(1, s)] + [f'x_{s}']
        fields = [3 + 2 * i for i in range(s - 1)] + [1]
    elif kind == 'conv':
        block, sizes, names, fields = plain_conv(width * s), [width * s], ['all'], [3]
    else:
        raise ValueError(f'unknown block kind {kind!r}; choose hs, res2net or conv.')
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return block.eval(), [Group(n, a, a + c) for n, a, c in zip(names, starts, sizes)], fields


def _centre_gradient(module: nn.Module, x: torch.Tensor, groups: Sequence[Group]) -> List[torch.Tensor]:
    """Per group: the gradient of the group's channels at the output's centre (summed over channels and batch) with
    respect to ``x``, as an absolute (N, H, W) map summed over input channels."""
    x = x.detach().requires_grad_(True)
    out = module(x)
    cy, cx = out.shape[-2] // 2, out.shape[-1] // 2
    grads = []
    for i, g in enumerate(groups):
        (grad,) = torch.autograd.grad(out[:, g.start : g.stop, cy, cx].sum(), x, retain_graph=i < len(groups) - 1)
        grads.append(grad.abs().sum(1))
    return grads


def theoretical_rf(module: nn.Module, channels: int, groups: Sequence[Group], size: int = 33) -> List[int]:
    """Side of the bounding box of the inputs each group's centre output can depend on (see the module docstring)."""
    probe = copy.deepcopy(module).eval()
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(m.weight.abs() + 0.01)
            elif isinstance(m, nn.modules.batchnorm._NormBase):
                m.reset_parameters()  # running mean 0, var 1, weight 1, bias 0: an identity up to eps
    grads = _centre_gradient(probe, torch.ones(1, channels, size, size), groups)
    sides = []
    for grad in grads:
        rows, cols = torch.nonzero(grad[0] > 0, as_tuple=True)
        sides.append(int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 1)
    return sides


def effective_rf(module: nn.Module, images: torch.Tensor, groups: Sequence[Group], batch: int = 64) -> torch.Tensor:
    """The mean absolute centre gradient of each group over ``images`` (N, C, H, W): a (groups, H, W) tensor."""
    total = torch.zeros(len(groups), *images.shape[-2:])
    for i in range(0, len(images), batch):
        grads = _centre_gradient(module, images[i : i + batch], groups)
        total += torch.stack([g.sum(0) for g in grads])
    return total / len(images)


def erf_size(heatmap: torch.Tensor, share: float = 0.95) -> int:
    """Side (odd, in pixels) of the smallest square around the map's centre pixel holding ``share`` of its mass."""
    h, w = heatmap.shape
    cy, cx = h // 2, w // 2
    total = float(heatmap.sum())
    if total <= 0:
        return 0
    for r in range(max(h, w)):
        inside = heatmap[max(cy - r, 0) : cy + r + 1, max(cx - r, 0) : cx + r + 1].sum()
        if float(inside) >= share * total - 1e-12 * total:
            return 2 * r + 1
    return 2 * max(h, w) - 1


def network_erf_sizes(
    model: nn.Module,
    images: torch.Tensor,
    stages: Sequence[str],
    share: float = 0.95,
    channels: Optional[int] = 64,
    batch: int = 64,
) -> Dict[str, List[int]]:
    """Per stage (a submodule name such as ``layer2``): the effective receptive field size, over ``images``, of the
    centre position of each of ``channels`` output channels spread evenly over the stage (all with ``None``).

    Each channel costs one backward pass per batch, so a sample of the channels keeps a 512-channel stage cheap."""
    model = model.eval()
    captured: Dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in stages
    ]
    sums: Dict[str, torch.Tensor] = {}
    try:
        for i in range(0, len(images), batch):
            x = images[i : i + batch].detach().requires_grad_(True)
            captured.clear()
            model(x)
            for name in stages:
                out = captured[name]
                cy, cx = out.shape[-2] // 2, out.shape[-1] // 2
                count = out.shape[1] if channels is None else min(channels, out.shape[1])
                picked = torch.linspace(0, out.shape[1] - 1, count).round().long().unique().tolist()
                maps = []
                for c in picked:
                    (grad,) = torch.autograd.grad(out[:, c, cy, cx].sum(), x, retain_graph=True)
                    maps.append(grad.abs().sum((0, 1)))
                sums[name] = torch.stack(maps) + sums.get(name, 0)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: [erf_size(m, share) for m in maps] for name, maps in sums.items()}
