"""hs_resnet50 at batch 8: eager fp32 against ``hsresnet.optimize(model)`` with and without ``compile=True``
(inductor with freezing), interleaved medians (docs/performance.md, the AVX2 machine).

    python benchmarks/scripts/optimize_compile.py [--threads 2] [--repeats 5]
"""

import statistics
from functools import partial

import timm
import torch
from _common import interleaved_times, make_parser, start

import hsresnet


def main() -> None:
    args = start(make_parser(__doc__, repeats=5))
    model = timm.create_model('hs_resnet50').eval()
    x = torch.randn(8, 3, 224, 224)
    variants = {
        'eager fp32': model,
        'optimize()': hsresnet.optimize(model),
        'optimize(compile=True)': hsresnet.optimize(model, compile=True),
    }
    with torch.inference_mode():
        expected = model(x)
        for name, run in variants.items():  # warm-up (and compilation), with the largest difference to eager
            print(f'{name}: max abs difference to eager {(run(x) - expected).abs().max().item():.2e}')
        times = interleaved_times({name: partial(run, x) for name, run in variants.items()}, args.repeats)
    base = statistics.median(times['eager fp32'])
    for name, t in times.items():
        print(f'{name}: {8 / statistics.median(t):.2f} images/s, {base / statistics.median(t):.2f}x eager')


if __name__ == '__main__':
    main()
