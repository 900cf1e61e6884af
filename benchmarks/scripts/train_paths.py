"""hs_resnet50 training step at batch 8: the production block (each activation stored once) against the plain
reference block (split, loop, concat), same weights, paired rounds (docs/performance.md, the AVX2 machine).

    python benchmarks/scripts/train_paths.py [--threads 2] [--repeats 25]

Prints each model's median step time and the production model's speed relative to the reference, taken within
each round (median and quartiles over the rounds).
"""

import copy
import statistics

import timm
import torch
from _common import interleaved_times, make_parser, start, training_step

from hsresnet.benchmark import paired_ratio
from hsresnet.reference import to_reference


def main() -> None:
    args = start(make_parser(__doc__, repeats=25))
    production = timm.create_model('hs_resnet50')
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    steps = {
        'production': training_step(production, x, y),
        'reference': training_step(to_reference(copy.deepcopy(production)), x, y),
    }
    times = interleaved_times(steps, args.repeats)
    for name, t in times.items():
        print(f'{name}: {statistics.median(t) * 1e3:.0f} ms per step (median of {args.repeats})')
    median, q1, q3 = paired_ratio(times['production'], times['reference'], 1.0)
    print(f'production speed / reference speed, paired: {median:.3f} (quartiles {q1:.3f}-{q3:.3f})')


if __name__ == '__main__':
    main()
