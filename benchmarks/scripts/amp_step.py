"""Training-step speed of the default Fashion-MNIST model (configs/fashion_mnist.yaml) in fp32 and bf16 autocast,
NCHW and channels_last: whether bf16 is worth it on this CPU (docs/classification.md). ``--compile`` adds the bf16
channels_last step under ``torch.compile`` (and prints how long its first steps took: the compile, cold, with an
empty inductor cache as on a fresh machine); ``--profile``
prints where a bf16 channels_last step goes, self CPU time per op (``torch.profiler``, median over rounds).

    python benchmarks/scripts/amp_step.py [--threads 2] [--repeats 5] [--compile] [--profile]
"""

import collections
import os
import statistics
import tempfile
import time
from functools import partial

import timm
import torch
from _common import interleaved_times, make_parser, start


def step(amp: bool, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def make_step(amp: bool, channels_last: bool, compiled: bool = False) -> partial:
    model = timm.create_model('hs_resnet26_small', num_classes=10, in_chans=1, channels=[16, 32, 64, 128], w=16, s=3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(128, 1, 28, 28).contiguous(memory_format=fmt), torch.randint(0, 10, (128,))
    return partial(step, amp, torch.compile(model) if compiled else model, optimizer, x, y)


def print_profile(run: partial, rounds: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for _ in range(rounds):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        tables.append(collections.Counter({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}))
    ms = {k: statistics.median(t[k] for t in tables) for k in set().union(*tables)}
    total = sum(ms.values())
    print(f'bf16 channels_last step, profiled: {total:.0f} ms of self CPU time; the largest ops:')
    for key, value in sorted(ms.items(), key=lambda kv: -kv[1])[:12]:
        print(f'  {value:7.1f} ms {100 * value / total:5.1f} %  {key}')


def main() -> None:
    parser = make_parser(__doc__, repeats=5)
    parser.add_argument('--compile', action='store_true', help='add the bf16 channels_last step under torch.compile')
    parser.add_argument('--profile', action='store_true', help='print where a bf16 channels_last step goes')
    args = start(parser)
    variants = {}
    for amp in (False, True):
        for channels_last in (False, True):
            name = f'{"bf16" if amp else "fp32"} {"channels_last" if channels_last else "NCHW"}'
            variants[name] = make_step(amp, channels_last)
    if args.compile:
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = tempfile.mkdtemp()  # a cold compile: no kernels cached by earlier runs
        compiled = make_step(True, True, compiled=True)
        begin = time.perf_counter()
        compiled()
        compiled()
        print(f'bf16 channels_last compiled: first two steps (the compile) {time.perf_counter() - begin:.0f} s')
        variants['bf16 channels_last compiled'] = compiled
    for name, t in interleaved_times(variants, args.repeats).items():
        print(f'{name}: {128 / statistics.median(t):.0f} images/s')
    if args.profile:
        print_profile(variants['bf16 channels_last'], args.repeats)


if __name__ == '__main__':
    main()
