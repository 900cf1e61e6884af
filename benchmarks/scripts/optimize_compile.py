"""hs_resnet50 at batch 8: eager fp32 against ``hsresnet.optimize(model)`` with and without ``compile=True``
(inductor with freezing), interleaved medians (docs/performance.md, the AVX2 machine).

    python benchmarks/scripts/optimize_compile.py [--threads 2] [--repeats 5]
"""

import argparse
import statistics
import time

import timm
import torch

import hsresnet
from hsresnet.engine.allocator import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model('hs_resnet50').eval()
    x = torch.randn(8, 3, 224, 224)
    variants = {
        'eager fp32': model,
        'optimize()': hsresnet.optimize(model),
        'optimize(compile=True)': hsresnet.optimize(model, compile=True),
    }
    times = {name: [] for name in variants}
    with torch.inference_mode():
        expected = model(x)
        for name, run in variants.items():  # warm-up (and compilation), with the largest difference to eager
            print(f'{name}: max abs difference to eager {(run(x) - expected).abs().max().item():.2e}')
        for _ in range(args.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times['eager fp32'])
    for name, t in times.items():
        print(f'{name}: {8 / statistics.median(t):.2f} images/s, {base / statistics.median(t):.2f}x eager')


if __name__ == '__main__':
    main()
