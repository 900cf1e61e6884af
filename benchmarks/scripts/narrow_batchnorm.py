"""Batch norm on the narrow channels_last tensors of the default Fashion-MNIST model: PyTorch's CPU kernel against
the training engine's wide-view form (``hsresnet.engine.batchnorm``; docs/classification.md).

Timed: forward + backward in training mode at each narrow shape of the main job's model and a few wider ones, bf16,
NCHW and channels_last through ``nn.BatchNorm2d``, and channels_last through the wide view (forced here for every
width, to show where it stops paying); then the main job's bf16 channels_last training step with every batch norm
plain against every one switched (``use_wide_batchnorm``, which takes the wide view below 16 channels only),
interleaved rounds.

    python benchmarks/scripts/narrow_batchnorm.py [--threads 2] [--repeats 15]
"""

import copy
import statistics
from functools import partial

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import interleaved_times, make_parser, start

from hsresnet.engine import batchnorm
from hsresnet.engine.batchnorm import use_wide_batchnorm

SHAPES = (
    (128, 4, 28, 28),
    (128, 6, 28, 28),
    (128, 12, 28, 28),
    (128, 8, 14, 14),
    (128, 16, 28, 28),
    (128, 24, 28, 28),
    (8, 33, 56, 56),
)


def bn_step(bn: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    bn(x).backward(grad)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    args = start(make_parser(__doc__, repeats=15))
    narrow = batchnorm.NARROW_CHANNELS
    batchnorm.NARROW_CHANNELS = 1 << 30  # every width through the wide view, for the per-shape timings
    for shape in SHAPES:
        plain = nn.BatchNorm2d(shape[1])
        wide = copy.deepcopy(plain)
        use_wide_batchnorm(wide)
        variants = {}
        for name, fmt, bn in (
            ('NCHW', torch.contiguous_format, plain),
            ('channels_last', torch.channels_last, plain),
            ('channels_last, wide view', torch.channels_last, wide),
        ):
            x = torch.randn(shape).bfloat16().contiguous(memory_format=fmt).requires_grad_()
            grad = torch.randn(shape).bfloat16().contiguous(memory_format=fmt)
            variants[name] = partial(bn_step, bn, x, grad)
        times = interleaved_times(variants, args.repeats * 3)
        cells = ', '.join(f'{name} {statistics.median(t) * 1e3:.2f} ms' for name, t in times.items())
        print(f'bf16 batch norm forward + backward {list(shape)}: {cells}', flush=True)
    batchnorm.NARROW_CHANNELS = narrow
    model = timm.create_model('hs_resnet26_small', num_classes=10, in_chans=1, channels=[16, 32, 64, 128], w=16, s=3)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    steps = {}
    for name in ('plain', 'wide view'):
        net = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if name == 'wide view':
            use_wide_batchnorm(net)
        steps[name] = partial(train_step, net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), x, y)
    times = interleaved_times(steps, args.repeats)
    ratio = statistics.median(p / w for p, w in zip(times['plain'], times['wide view']))
    rates = ', '.join(f'{name} {128 / statistics.median(t):.0f} images/s' for name, t in times.items())
    print(f'main job training step, bf16 channels_last: {rates}; wide view / plain speed {ratio:.3f} (paired median)')


if __name__ == '__main__':
    main()
