"""Batch-1 3x3 convs of hs_resnet50 that torch sends to its native conv instead of oneDNN (input of at most 20 480
elements), timed both ways (docs/performance.md, "What the production block does").

    python benchmarks/scripts/conv_dispatch.py [--threads 2] [--repeats 30]
"""

import statistics
from functools import partial

import torch
import torch.nn.functional as F
from _common import interleaved_times, make_parser, start

SHAPES = ((144, 7), (216, 7), (252, 7), (270, 7), (72, 14))  # (channels, size): stage-4 cascade, first of stage 3
CALLS = 3  # per timed call: one conv takes well under a millisecond


def native(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    for _ in range(CALLS):
        out = F.conv2d(x, w, None, 1, 1)
    return out


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    for _ in range(CALLS):
        out = torch.ops.aten.mkldnn_convolution(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    return out


def main() -> None:
    args = start(make_parser(__doc__, repeats=30))
    for channels, size in SHAPES:
        x, w = torch.randn(1, channels, size, size), torch.randn(channels, channels, 3, 3)
        with torch.inference_mode():
            torch.testing.assert_close(native(x, w), onednn(x, w), rtol=1e-3, atol=1e-3)
            variants = {'native (torch default)': partial(native, x, w), 'oneDNN': partial(onednn, x, w)}
            times = interleaved_times(variants, args.repeats)
        cells = ', '.join(f'{name} {statistics.median(t) / CALLS * 1e3:.3f} ms' for name, t in times.items())
        print(f'{channels} channels at {size}x{size}: {cells}')


if __name__ == '__main__':
    main()
