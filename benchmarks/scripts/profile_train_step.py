"""torch.profiler on a training step (batch 8) of two models, by default hs_resnet50 with the production block and
with the plain reference block (same weights): self CPU time per op, and the backward time of each conv weight shape,
where they differ most; medians over profiled steps that alternate between the two models (docs/performance.md,
"Training"). ``name@reference`` is the model with the reference block; ``--amp`` trains in bf16 autocast with model
and input channels_last, as ``hsresnet train --amp --channels-last`` does.

    python benchmarks/scripts/profile_train_step.py [--models hs_resnet50 resnet50] [--amp] [--threads 2] \
        [--repeats 5] [--top 12]
"""

import collections
import copy
import statistics
from functools import partial
from typing import Callable, Counter, Dict, List, Tuple

import timm
import torch
from _common import make_parser, start, training_step
from torch.profiler import ProfilerActivity, profile

from hsresnet.reference import to_reference


def profile_step(step: Callable[[], None]) -> Tuple[Counter, Counter]:
    """One profiled step: milliseconds of self CPU time per op, and of ``convolution_backward`` per weight shape."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    ops, conv_backward = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        ops[event.key] += event.self_cpu_time_total / 1e3
    for event in prof.events():
        if event.name == 'aten::convolution_backward':
            conv_backward[tuple(event.input_shapes[2])] += event.cpu_time_total / 1e3
    return ops, conv_backward


def autocast_step(step: Callable[[], None]) -> None:
    with torch.autocast('cpu', torch.bfloat16):
        step()


def medians(tables: List[Counter]) -> Counter:
    """Per key, the median over the rounds (0 where a round lacks the key)."""
    return collections.Counter({k: statistics.median(t[k] for t in tables) for k in set().union(*tables)})


def print_differences(title: str, tables: Dict[str, Counter], top: int) -> None:
    (name_a, a), (name_b, b) = tables.items()
    totals = f'{name_a} {sum(a.values()):.0f} ms, {name_b} {sum(b.values()):.0f} ms per step'
    print(f'{title}: {totals} (medians); the largest differences:')
    for key in sorted(set(a) | set(b), key=lambda k: -abs(a[k] - b[k]))[:top]:
        print(f'  {str(key):55s} {name_a} {a[key]:7.1f} ms  {name_b} {b[key]:7.1f} ms')


def main() -> None:
    parser = make_parser(__doc__, repeats=5)
    parser.add_argument('--top', type=int, default=12)
    parser.add_argument('--models', nargs=2, default=['hs_resnet50', 'hs_resnet50@reference'])
    parser.add_argument('--amp', action='store_true', help='bf16 autocast, model and input channels_last')
    args = start(parser)
    memory_format = torch.channels_last if args.amp else torch.contiguous_format
    x, y = torch.randn(8, 3, 224, 224).to(memory_format=memory_format), torch.randint(0, 1000, (8,))
    models = {}
    for name in args.models:
        base, _, kind = name.partition('@')
        models[name] = copy.deepcopy(models[base]) if base in models else timm.create_model(base)
        if kind == 'reference':
            to_reference(models[name])
    steps = {}
    for name, model in models.items():
        step = training_step(model.to(memory_format=memory_format), x, y)
        steps[name] = partial(autocast_step, step) if args.amp else step
    for step in steps.values():  # warm-up
        step()
        step()
    rounds: Dict[str, List[Tuple[Counter, Counter]]] = {name: [] for name in steps}
    for r in range(args.repeats):  # alternate, so that a slow phase of the machine hits both alike
        for name in list(steps)[:: 1 if r % 2 == 0 else -1]:
            rounds[name].append(profile_step(steps[name]))
    for i, title in enumerate(('self CPU time per op', 'convolution_backward per weight shape')):
        print_differences(title, {name: medians([p[i] for p in runs]) for name, runs in rounds.items()}, args.top)


if __name__ == '__main__':
    main()
