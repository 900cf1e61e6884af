"""hs_resnet50 training step at batch 8: the production block (each activation stored once) against the plain
reference block (split, loop, concat), same weights, paired rounds (docs/performance.md, the AVX2 machine).

    python benchmarks/scripts/train_paths.py [--threads 2] [--repeats 25]

Prints each model's median step time and the production model's speed relative to the reference, taken within
each round (median and quartiles over the rounds).
"""

import argparse
import copy
import statistics
import time

import timm
import torch
import torch.nn as nn

import hsresnet  # noqa: F401  (registers the models)
from hsresnet.benchmark import paired_ratio
from hsresnet.engine.allocator import keep_freed_memory
from hsresnet.reference import to_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=25)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    production = timm.create_model('hs_resnet50')
    models = {'production': production, 'reference': to_reference(copy.deepcopy(production))}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for name, m in models.items()}
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))

    def step(name: str) -> None:
        nn.functional.cross_entropy(models[name].train()(x), y).backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    times = {name: [] for name in models}
    for name in models:  # warm-up
        step(name)
    for r in range(args.repeats):
        for name in list(models)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f'{name}: {statistics.median(t) * 1e3:.0f} ms per step (median of {args.repeats})')
    median, q1, q3 = paired_ratio(times['production'], times['reference'], 1.0)
    print(f'production speed / reference speed, paired: {median:.3f} (quartiles {q1:.3f}-{q3:.3f})')


if __name__ == '__main__':
    main()
