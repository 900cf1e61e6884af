"""Batch-1 3x3 convs of hs_resnet50 that torch sends to its native conv instead of oneDNN (input of at most 20 480
elements), timed both ways (docs/performance.md, "What the production block does").

    python benchmarks/scripts/conv_dispatch.py [--threads 2] [--repeats 30]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = ((144, 7), (216, 7), (252, 7), (270, 7), (72, 14))  # (channels, size): stage-4 cascade, first of stage 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for channels, size in SHAPES:
        x, w = torch.randn(1, channels, size, size), torch.randn(channels, channels, 3, 3)
        paths = {
            'native (torch default)': lambda x=x, w=w: F.conv2d(x, w, None, 1, 1),
            'oneDNN': lambda x=x, w=w: torch.ops.aten.mkldnn_convolution(x, w, None, [1, 1], [1, 1], [1, 1], 1),
        }
        times = {name: [] for name in paths}
        with torch.inference_mode():
            torch.testing.assert_close(*(f() for f in paths.values()), rtol=1e-3, atol=1e-3)
            for _ in range(args.repeats):
                for name, conv in paths.items():
                    start = time.perf_counter()
                    for _ in range(3):
                        conv()
                    times[name].append((time.perf_counter() - start) / 3)
        cells = ', '.join(f'{name} {statistics.median(t) * 1e3:.3f} ms' for name, t in times.items())
        print(f'{channels} channels at {size}x{size}: {cells}')


if __name__ == '__main__':
    main()
