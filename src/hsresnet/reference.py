"""A deliberately plain reference implementation of the HS block, written straight from the spec.

``docs/architecture.md`` (Yuan et al., arXiv 2010.07621, Sec. 3.1): split, loop, concat, nothing else. It
exists so that the production blocks in :mod:`hsresnet.layers` can be tested for equality against it and so that
``hsresnet benchmark`` can show the speed-up of the production block instead of claiming it. The modules take the
same constructor arguments and load the same ``state_dict`` as :class:`~hsresnet.layers.HSBlock` and
:class:`~hsresnet.layers.HSStridedBlock`; :func:`to_reference` swaps them into any model.
"""

from __future__ import annotations

import copy
from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import HSBlock, HSStridedBlock, adapt_norm_layer, check_hs_args, hs_widths

__all__ = ['ReferenceHSBlock', 'ReferenceHSStridedBlock', 'to_reference']


class ReferenceHSBlock(nn.Module):
    """The stride-1 cascade exactly as the spec writes it (same arguments and state_dict as ``HSBlock``).

    ``y_1 = x_1``, ``y_2 = F_2(x_2)``, ``y_i = F_i(cat(x_i, y_{i-1,2}))``; ``y_{i,1}`` is the first ``ceil(c_i/2)``
    channels of ``y_i``, ``y_{i,2}`` the rest; ``out = cat(y_1, y_{2,1}, ..., y_{s-1,1}, y_s)``.
    """

    def __init__(
        self,
        width: int,
        s: int,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.width, self.s = width, s
        self.widths = hs_widths(width, s)
        norm_layer = adapt_norm_layer(norm_layer)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False) for c in self.widths
        )
        self.bns = nn.ModuleList(norm_layer(c) for c in self.widths)
        self.act = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = torch.split(x, self.width, dim=1)  # x_1 .. x_s
        outs: List[torch.Tensor] = [xs[0]]  # y_1 = x_1
        forwarded = None
        for i in range(1, self.s):  # group i + 1 of the paper, F_{i+1} = convs[i - 1]
            inp = xs[i] if forwarded is None else torch.cat([xs[i], forwarded], dim=1)
            y = self.act(self.bns[i - 1](self.convs[i - 1](inp)))
            if i == self.s - 1:
                outs.append(y)  # y_s goes to the output whole
            else:
                c = y.shape[1]
                outs.append(y[:, : c - c // 2])  # y_{i,1}: the first ceil(c / 2) channels
                forwarded = y[:, c - c // 2 :]  # y_{i,2}: the last floor(c / 2) channels
        return torch.cat(outs, dim=1)


class ReferenceHSStridedBlock(nn.Module):
    """The strided block group by group, as the spec writes it (same arguments and state_dict as ``HSStridedBlock``).

    ``down='pool_conv'``: ``x_1`` through ``AvgPool2d(3, stride, padding=1)``, each of ``x_2 .. x_s`` through its
    own 3x3 strided conv (a slice of the shared grouped-conv weight) + norm + activation; concat in group order.
    The norm is per channel, so applying it once to the concatenated conv outputs is the per-group norm.
    ``down='conv'``: one dense 3x3 strided conv + norm + activation.
    """

    def __init__(
        self,
        width: int,
        s: int,
        stride: int = 2,
        dilation: int = 1,
        down: str = 'pool_conv',
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        check_hs_args(width, s, down)
        self.width, self.s, self.down = width, s, down
        self.stride, self.dilation = stride, dilation
        norm_layer = adapt_norm_layer(norm_layer)
        chs = s * width if down == 'conv' else (s - 1) * width
        groups = 1 if down == 'conv' else s - 1
        self.pool = None if down == 'conv' else nn.AvgPool2d(3, stride, padding=1)
        self.conv = nn.Conv2d(chs, chs, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)
        self.bn = norm_layer(chs)
        self.act = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return self.act(self.bn(self.conv(x)))
        xs = torch.split(x, self.width, dim=1)
        weights = torch.split(self.conv.weight, self.width, dim=0)  # group g: width -> width
        convs = [
            F.conv2d(xs[g + 1], weights[g], None, self.stride, self.dilation, self.dilation) for g in range(self.s - 1)
        ]
        return torch.cat([self.pool(xs[0]), self.act(self.bn(torch.cat(convs, dim=1)))], dim=1)


def to_reference(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``HSBlock``/``HSStridedBlock`` of ``model`` by its reference twin with the same
    weights, configuration, device and dtype, and return ``model``."""
    for name, child in list(model.named_children()):
        if isinstance(child, HSBlock):
            conv = child.convs[0]
            new = ReferenceHSBlock(child.width, child.s, conv.dilation[0], _norm_of(child.bns[0]), _act_of(child))
        elif isinstance(child, HSStridedBlock):
            conv = child.conv
            new = ReferenceHSStridedBlock(
                child.width, child.s, conv.stride[0], conv.dilation[0], child.down, _norm_of(child.bn), _act_of(child)
            )
        else:
            to_reference(child)
            continue
        new.load_state_dict(child.state_dict())
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        new.train(child.training)
        setattr(model, name, new)
    return model


def _norm_of(norm: nn.Module) -> Callable[..., nn.Module]:
    """A factory that rebuilds ``norm`` with another channel count (BatchNorm-like: same eps and momentum)."""
    kwargs = {k: getattr(norm, k) for k in ('eps', 'momentum') if hasattr(norm, k)}
    return lambda c: type(norm)(c, **kwargs)


def _act_of(block: nn.Module) -> Callable[..., nn.Module]:
    """A factory that returns copies of the block's activation module."""
    return lambda inplace=True: copy.deepcopy(block.act)
