"""Eager fp32 inference of resnet50 and hs_resnet50 split into time in convolutions and time elsewhere, and the
convolutions that lose the most time against resnet50's average conv rate (docs/performance.md, "Where the time
goes"). Times each ``nn.Conv2d`` call with forward (pre-)hooks: no profiler, whose per-op overhead inflates
models with many small ops.

    python benchmarks/scripts/conv_time.py [--batch-size 8] [--threads 2] [--repeats 5]
"""

import collections
import time

import timm
import torch
import torch.nn as nn
from _common import make_parser, start


def conv_times(model: nn.Module, x: torch.Tensor, repeats: int):
    """Mean forward time, and per conv shape (in, out, input size, kernel, stride, groups): calls, seconds, MACs."""
    stats = collections.defaultdict(lambda: [0, 0.0, 0])

    def before(module, args):
        module._started = time.perf_counter()

    def after(module, args, out):
        key = (module.in_channels, module.out_channels, args[0].shape[-1], module.kernel_size[0], module.stride[0],
               module.groups)  # fmt: skip
        entry = stats[key]
        entry[0] += 1
        entry[1] += time.perf_counter() - module._started
        entry[2] += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        model(x)
        handles = [h for m in convs for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        total = (time.perf_counter() - start) / repeats
    for h in handles:
        h.remove()
    return total, {k: (n / repeats, t / repeats, macs / repeats) for k, (n, t, macs) in stats.items()}


def main() -> None:
    parser = make_parser(__doc__, repeats=5)
    parser.add_argument('--batch-size', '-b', type=int, default=8)
    parser.add_argument('--top', type=int, default=10, help='conv shapes to list')
    args = start(parser)
    x = torch.randn(args.batch_size, 3, 224, 224)
    reference_rate = None
    for name in ('resnet50', 'hs_resnet50'):
        total, stats = conv_times(timm.create_model(name).eval(), x, args.repeats)
        conv_s = sum(t for _, t, _ in stats.values())
        macs = sum(m for _, _, m in stats.values())
        reference_rate = reference_rate or macs / conv_s
        print(f'{name}: {total * 1e3:.0f} ms per forward, convolutions {conv_s * 1e3:.0f} ms at '
              f'{macs / conv_s / 1e9:.1f} GMAC/s, elsewhere {(total - conv_s) * 1e3:.0f} ms')  # fmt: skip
        lost = {k: t - m / reference_rate for k, (_, t, m) in stats.items()}
        for key in sorted(lost, key=lost.get, reverse=True)[: args.top]:
            n, t, m = stats[key]
            cin, cout, size, k, stride, groups = key
            shape = f'{k}x{k} {cin}->{cout} at {size}x{size}, stride {stride}, groups {groups}'
            print(f'  {shape}: {n:.0f} calls, {t * 1e3:.1f} ms, {m / t / 1e9:.1f} GMAC/s, '
                  f'{lost[key] * 1e3:+.1f} ms at its own rate instead of resnet50\'s')  # fmt: skip


if __name__ == '__main__':
    main()
