"""Params and MACs of the HS block and HS-ResNet (Yuan et al., arXiv 2010.07621): closed form and counted.

Conventions (docs/complexity.md derives every term):

- ``params``: every parameter of the model, norm affine weight and bias and the classifier bias included.
- ``macs``: multiply-accumulates of the convolutions and linear layers, batch 1, which is what
  ``torch.utils.flop_counter.FlopCounterMode`` counts divided by 2. Norms, activations, pools, split/concat,
  residual adds and bias adds cost nothing in this convention.

The closed form follows the spec in ``docs/architecture.md`` and timm's ``ResNet`` (stem, max-pool, shortcuts, output
stride, head) and takes the same keyword arguments as :class:`hsresnet.HSResNet`; :func:`count_complexity`
counts a built model, on the meta device when possible. Tests check that both agree exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .factory import create_model
from .layers import DOWN_MODES, check_hs_args, hs_widths
from .models import D_VARIANT_KWARGS, LAYOUTS, PRESETS, group_width

__all__ = [
    'Complexity',
    'Fit',
    'D_VARIANT_KWARGS',
    'group_width',
    'check_network_args',
    'conv_complexity',
    'hs_block_complexity',
    'strided_block_complexity',
    'bottleneck_complexity',
    'hs_resnet_breakdown',
    'hs_resnet_complexity',
    'count_complexity',
    'build_timm_model',
    'count_timm_model',
    'solve_budget',
    'match_width',
    'preset_complexities',
    'DOWN_MODES',
    'STEM_TYPES',
]

SizeArg = Union[int, Sequence[int]]
STEM_TYPES = ('', 'deep')


@dataclasses.dataclass(frozen=True)
class Complexity:
    """Parameter count and multiply-accumulates (batch 1) of a module."""

    params: int = 0
    macs: int = 0

    def __add__(self, other: Complexity) -> Complexity:
        return Complexity(self.params + other.params, self.macs + other.macs)

    @property
    def mparams(self) -> float:
        """Parameters in millions."""
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        """MACs in billions (FLOPs in the ``FlopCounterMode`` sense are twice this)."""
        return self.macs / 1e9


def _size(size: SizeArg, name: str = 'input_size') -> Tuple[int, int]:
    """``224`` or ``(H, W)`` -> ``(H, W)``; refuse anything that is not one or two positive integers."""
    values = [size] if isinstance(size, int) else list(size)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f'{name}={size!r} is invalid; give one positive integer (square) or two (H, W).')
    return values[0], values[1]


def _out_size(size: Tuple[int, int], stride: int) -> Tuple[int, int]:
    """Output size ``floor((n - 1) / stride) + 1`` of every strided op in the network.

    It holds for the 7x7/3 conv (padding 3), 3x3 convs (padding = dilation), the 3x3/2 max-pool (padding 1),
    the 3x3/2 average pool of ``pool_conv`` (padding 1), 1x1 convs and the 2x2/2 ceil-mode avg-down pool.
    """
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


def conv_complexity(
    in_chs: int, out_chs: int, kernel: int, out_size: Tuple[int, int], groups: int = 1, norm: bool = True
) -> Complexity:
    """A bias-free ``kernel x kernel`` conv (+ a norm with 2 affine params per channel when ``norm``)."""
    weights = out_chs * (in_chs // groups) * kernel * kernel
    return Complexity(weights + (2 * out_chs if norm else 0), weights * out_size[0] * out_size[1])


def hs_block_complexity(width: int, s: int, size: SizeArg) -> Complexity:
    """The stride-1 HS cascade on an ``H x W`` map: ``F_i`` is a 3x3 conv ``c_i -> c_i`` + norm, ``i = 2..s``.

    params ``= sum_i (9 c_i^2 + 2 c_i)``, MACs ``= H W sum_i 9 c_i^2`` with ``c_2 = width``,
    ``c_i = width + floor(c_{i-1} / 2)``; the identity group ``y_1`` and the split/concat cost nothing.
    """
    h, w = _size(size, 'size')
    return Complexity(
        sum(9 * c * c + 2 * c for c in hs_widths(width, s)), h * w * sum(9 * c * c for c in hs_widths(width, s))
    )


def strided_block_complexity(width: int, s: int, size: SizeArg, stride: int = 2, down: str = 'pool_conv') -> Complexity:
    """The block at a downsampling position, on an ``H x W`` input (spec, "Strided blocks").

    ``pool_conv``: ``s - 1`` separate 3x3 convs ``width -> width`` (+ norm) at the output size, the pooled
    identity group is free: params ``= 9 (s-1) width^2 + 2 (s-1) width``, MACs ``= H' W' 9 (s-1) width^2``.
    ``conv``: one dense 3x3 conv on ``s * width`` channels: ``9 (s width)^2 + 2 s width`` and ``H' W' 9 (s width)^2``.
    ``H' = floor((H - 1) / stride) + 1``; with a dilated backbone the stride is 1 and ``H' = H``.
    """
    check_hs_args(width, s, down)
    out = _out_size(_size(size, 'size'), stride)
    if down == 'conv':
        return conv_complexity(s * width, s * width, 3, out)
    return conv_complexity((s - 1) * width, (s - 1) * width, 3, out, groups=s - 1)


def bottleneck_complexity(
    inplanes: int,
    planes: int,
    w: int,
    s: int,
    size: SizeArg,
    stride: int = 1,
    strided: bool = False,
    down: str = 'pool_conv',
    shortcut: bool = False,
) -> Complexity:
    """One :class:`hsresnet.HSBottleneck` on an ``H x W`` input.

    conv1 1x1 ``inplanes -> mid`` + norm at the input size; the HS block (``strided=False``) or the strided
    block; conv3 1x1 ``mid -> 4 planes`` + norm and, with ``shortcut``, the projection 1x1 conv + norm at the
    output size. The avg-down shortcut (``d`` models) has exactly the same counts: its pool costs nothing.
    """
    width = group_width(planes, w)
    check_hs_args(width, s, down)
    mid, out_chs = s * width, 4 * planes
    size = _size(size, 'size')
    out = _out_size(size, stride)
    total = conv_complexity(inplanes, mid, 1, size)
    if strided:
        total += strided_block_complexity(width, s, size, stride, down)
    else:
        if stride != 1:
            raise ValueError(f'HS block: stride={stride} needs strided=True; the stride-1 cascade does not stride.')
        total += hs_block_complexity(width, s, size)
    total += conv_complexity(mid, out_chs, 1, out)
    if shortcut:
        total += conv_complexity(inplanes, out_chs, 1, out)
    return total


def check_network_args(
    depth: int = 50,
    stem_type: str = '',
    output_stride: int = 32,
    num_classes: int = 1000,
    in_chans: int = 3,
    input_size: SizeArg = 224,
    **_,
) -> None:
    """Refuse network options HS-ResNet does not define, naming the option, the value and what is allowed."""
    _size(input_size)
    if depth not in LAYOUTS:
        raise ValueError(f'HS-ResNet: depth={depth!r} is invalid; choose one of {tuple(LAYOUTS)}.')
    if stem_type not in STEM_TYPES:
        raise ValueError(f'HS-ResNet: stem_type={stem_type!r} is invalid; choose one of {STEM_TYPES}.')
    if output_stride not in (8, 16, 32):
        raise ValueError(f'HS-ResNet: output_stride={output_stride!r} is invalid; choose 8, 16 or 32.')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f'HS-ResNet: num_classes={num_classes!r} is invalid; use an integer >= 0 (0: no head).')
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f'HS-ResNet: in_chans={in_chans!r} is invalid; use an integer >= 1.')


def hs_resnet_breakdown(
    w: int = 18,
    s: int = 5,
    depth: int = 50,
    down: str = 'pool_conv',
    input_size: SizeArg = 224,
    num_classes: int = 1000,
    in_chans: int = 3,
    output_stride: int = 32,
    stem_type: str = '',
    stem_width: int = 64,
    avg_down: bool = False,
    small_input: bool = False,
    channels: Sequence[int] = (64, 128, 256, 512),
) -> Dict[str, Complexity]:
    """Closed-form params/MACs of an HS-ResNet per part: ``stem``, ``layer1`` .. ``layer4`` and ``fc``.

    The keyword arguments are those of :class:`hsresnet.HSResNet` (``depth`` picks ``layers``), so
    ``HSResNet(LAYOUTS[depth], **kwargs)`` is the model these numbers describe. ``avg_down`` changes no count.
    """
    check_network_args(depth, stem_type, output_stride, num_classes, in_chans, input_size)
    for planes in channels:
        check_hs_args(group_width(planes, w), s, down)
    size = _size(input_size)
    parts: Dict[str, Complexity] = {}

    # stem (timm ResNet): 7x7/2 conv, or the deep stem (3x3/2, 3x3, 3x3); small_input: first conv 3x3/1, no pool
    first_kernel, first_stride = (3, 1) if small_input else (7 if stem_type == '' else 3, 2)
    size = _out_size(size, first_stride)
    if stem_type == 'deep':
        inplanes = 2 * stem_width
        stem = conv_complexity(in_chans, stem_width, first_kernel, size)
        stem += conv_complexity(stem_width, stem_width, 3, size) + conv_complexity(stem_width, inplanes, 3, size)
    else:
        inplanes = 64
        stem = conv_complexity(in_chans, inplanes, first_kernel, size)
    parts['stem'] = stem
    if not small_input:
        size = _out_size(size, 2)  # 3x3/2 max-pool

    # stages (timm make_blocks): once the nominal stride reaches output_stride, stages dilate instead
    net_stride = 4
    for idx, (planes, repeats) in enumerate(zip(channels, LAYOUTS[depth])):
        stride = 1 if idx == 0 else 2
        if net_stride >= output_stride:
            stride = 1
        else:
            net_stride *= stride
        stage = Complexity()
        for block_idx in range(repeats):
            first = block_idx == 0
            block_stride = stride if first else 1
            stage += bottleneck_complexity(
                inplanes,
                planes,
                w,
                s,
                size,
                stride=block_stride,
                strided=first and idx > 0,  # nominal position, not the effective stride (spec)
                down=down,
                shortcut=first and (stride != 1 or inplanes != 4 * planes),
            )
            size = _out_size(size, block_stride)
            inplanes = 4 * planes
        parts[f'layer{idx + 1}'] = stage

    # head: global average pool (free) + linear with bias
    parts['fc'] = Complexity(inplanes * num_classes + num_classes, inplanes * num_classes)
    return parts


def hs_resnet_complexity(w: int = 18, s: int = 5, depth: int = 50, **kwargs) -> Complexity:
    """Closed-form params/MACs of a whole HS-ResNet; keyword arguments as :func:`hs_resnet_breakdown`."""
    return sum(hs_resnet_breakdown(w, s, depth, **kwargs).values(), Complexity())


def count_complexity(model: nn.Module, input_size: SizeArg = 224, in_chans: Optional[int] = None) -> Complexity:
    """Count params and MACs of a built model: ``FlopCounterMode`` on one ``(1, C, H, W)`` input, halved.

    The input is made on the model's device and dtype, so a model built on the meta device costs no compute.
    The model runs in eval mode and is put back in its previous mode.
    """
    h, w = _size(input_size)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device('cpu')
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    in_chans = in_chans or getattr(model, 'in_chans', 3)
    x = torch.zeros(1, in_chans, h, w, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return Complexity(sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2)


def build_timm_model(name: str, device: Union[str, torch.device] = 'meta', **kwargs) -> nn.Module:
    """``create_model(name, **kwargs)`` without weights, on ``device``; an unknown name is a ValueError."""
    with torch.device(device):
        return create_model(name, pretrained=False, **kwargs)


def count_timm_model(name: str, input_size: SizeArg = 224, **kwargs) -> Complexity:
    """Params/MACs of a timm model (``hs_resnet*`` included) built on the meta device, same counter as ours.

    Counts of plain (JSON-able) arguments are remembered: the budget solver and study plans ask for the same ones
    many times."""
    try:
        key = json.dumps([name, input_size, kwargs], sort_keys=True)
    except TypeError:  # e.g. a norm_layer class: count every time
        return _count_timm_model(name, input_size, **kwargs)
    return _count_cached(key)


@functools.lru_cache(maxsize=4096)
def _count_cached(key: str) -> Complexity:
    name, input_size, kwargs = json.loads(key)
    return _count_timm_model(name, input_size if isinstance(input_size, int) else tuple(input_size), **kwargs)


def _count_timm_model(name: str, input_size: SizeArg, **kwargs) -> Complexity:
    model = build_timm_model(name, **kwargs)
    try:
        return count_complexity(model, input_size)
    except (NotImplementedError, RuntimeError, AssertionError, TypeError) as err:  # e.g. needs real data or a size
        raise ValueError(
            f'model {name!r} cannot be counted on the meta device ({type(err).__name__}: {err}); '
            'give the budget as params/MACs instead.'
        ) from err


@dataclasses.dataclass(frozen=True)
class Fit:
    """A configuration that fits a budget: its (w, s), counts, ratios to the budget and distance to it."""

    w: int
    s: int
    complexity: Complexity
    params_ratio: Optional[float]
    macs_ratio: Optional[float]
    distance: float


def solve_budget(
    params: Optional[float] = None,
    macs: Optional[float] = None,
    tolerance: float = 0.05,
    w_values: Iterable[int] = range(8, 33),
    s_values: Iterable[int] = range(2, 9),
    **net_kwargs,
) -> List[Fit]:
    """All (w, s) whose params and/or MACs lie within ``tolerance`` (relative) of the budget, closest first.

    The distance is the root of the summed squared relative deviations over the budgets given;
    ``net_kwargs`` (``depth``, ``down``, ``input_size`` ...) go to :func:`hs_resnet_complexity`.
    """
    budgets = {'params': params, 'macs': macs}
    if params is None and macs is None:
        raise ValueError('budget: give params=, macs= or both (a reference model gives both).')
    for key, value in budgets.items():
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ValueError(f'budget: {key}={value!r} is invalid; it must be a positive number.')
    if isinstance(tolerance, bool) or not 0 <= tolerance < 1:
        raise ValueError(f'budget: tolerance={tolerance!r} is invalid; give a fraction in [0, 1), e.g. 0.05.')
    fits = []
    for s in s_values:
        for w in w_values:
            c = hs_resnet_complexity(w, s, **net_kwargs)
            ratios = {k: (getattr(c, k) / v if v is not None else None) for k, v in budgets.items()}
            deviations = [abs(r - 1) for r in ratios.values() if r is not None]
            if max(deviations) <= tolerance:
                distance = math.sqrt(sum(d * d for d in deviations))
                fits.append(Fit(w, s, c, ratios['params'], ratios['macs'], distance))
    return sorted(fits, key=lambda f: (f.distance, f.s, f.w))


def match_width(
    name: str,
    budget: Complexity,
    knob: str = 'base_width',
    input_size: SizeArg = 224,
    tolerance: float = 0.05,
    values: Sequence[int] = range(1, 513),
    **kwargs,
) -> Tuple[int, Complexity]:
    """The value of the width argument ``knob`` of timm model ``name`` whose params and MACs come closest to
    ``budget`` (distance as in :func:`solve_budget`); a ValueError when even the closest is off by more than
    ``tolerance``. Both counts grow with the width, so a bisection on MACs finds the crossing and its neighbours are
    counted; values the model refuses (e.g. odd widths where a block needs even ones) are skipped.
    """

    values, counts = list(values), {}

    def at(i: int) -> Optional[Complexity]:
        if i not in counts:
            try:
                counts[i] = count_timm_model(name, input_size, **{**kwargs, knob: values[i]})
            except (ValueError, AssertionError):  # a width the model's blocks refuse
                counts[i] = None
        return counts[i]

    def valid(indices: Iterable[int]) -> Iterable[int]:
        return (i for i in indices if at(i) is not None)

    def distance(c: Complexity) -> float:
        return math.hypot(c.params / budget.params - 1, c.macs / budget.macs - 1)

    lo, hi = 0, len(values)  # the first valid value whose MACs reach the budget's lies in values[lo:hi], if any
    while lo < hi:
        mid = (lo + hi) // 2
        j = next(valid(range(mid, hi)), None)
        if j is None:
            hi = mid
        elif counts[j].macs >= budget.macs:
            hi = j
        else:
            lo = j + 1
    below = list(itertools.islice(valid(range(lo - 1, -1, -1)), 2))
    above = list(itertools.islice(valid(range(lo, len(values))), 2))
    counted = [(values[i], counts[i]) for i in below + above]
    if not counted:
        raise ValueError(f'{name}: no {knob} in {values[0]}..{values[-1]} builds a model with {kwargs}.')
    value, best = min(counted, key=lambda vc: distance(vc[1]))
    worst = max(abs(best.params / budget.params - 1), abs(best.macs / budget.macs - 1))
    if worst > tolerance:
        raise ValueError(
            f'{name}: the closest {knob}={value} gives {best.mparams:.3f} M params / {best.gmacs:.4f} GMACs, '
            f'{worst:.1%} off the budget of {budget.mparams:.3f} M / {budget.gmacs:.4f} G (tolerance {tolerance:.0%}); '
            'change another width argument or the tolerance.'
        )
    return value, best


def preset_complexities(**net_kwargs) -> Dict[str, Tuple[int, int, Complexity]]:
    """``{'hs_resnet50_18w_5s': (18, 5, Complexity), ...}`` for the named presets of the spec (depth 50)."""
    return {
        f'hs_resnet50_{name}': (w, s, hs_resnet_complexity(w, s, 50, **net_kwargs)) for name, (w, s) in PRESETS.items()
    }
