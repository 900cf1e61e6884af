"""Two changes tried on the AVX2 machine and dropped (docs/performance.md, "The AVX2 machine again"), eager fp32:

1. hs_resnet50's 1x1 convs whose channel count is not a multiple of 8 (90, 180) as one matmul on the (C, H*W) view:
   timed alone (a warm loop) and inside the model (whole forwards, interleaved).
2. The strided block's grouped 3x3 conv (4 groups, stride 2) against one conv per group, alone, at batch 8 and 1.

    python benchmarks/scripts/dropped_variants.py [--threads 2] [--repeats 15]
"""

import copy
import statistics
from functools import partial
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import interleaved_times, make_parser, start

from hsresnet.models import HSBottleneck


class MatmulConv1x1(nn.Conv2d):
    """A 1x1 stride-1 conv computed as ``weight (O, C) @ x (N, C, H*W)`` on contiguous NCHW input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            return super().forward(x)
        n, c, h, w = x.shape
        return torch.matmul(self.weight.view(self.out_channels, c), x.view(n, c, h * w)).view(n, -1, h, w)


def interleaved_ms(variants: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median milliseconds per call of each variant, without autograd."""
    with torch.inference_mode():
        return {name: statistics.median(t) * 1e3 for name, t in interleaved_times(variants, repeats).items()}


def per_group(x: torch.Tensor, weight: torch.Tensor, groups: List[slice]) -> torch.Tensor:
    """The grouped conv as one stride-2 conv per group, concatenated."""
    return torch.cat([F.conv2d(x[:, g], weight[g], None, 2, 1) for g in groups], 1)


def main() -> None:
    args = start(make_parser(__doc__, repeats=15))

    print('1. odd-channel 1x1 convs as matmul, alone (batch 8):')
    for cin, cout, size in ((90, 256, 56), (256, 90, 56), (180, 512, 28), (512, 180, 28)):
        x, w = torch.randn(8, cin, size, size), torch.randn(cout, cin, 1, 1)
        ms = interleaved_ms(
            {'conv': partial(F.conv2d, x, w), 'matmul': partial(torch.matmul, w.view(cout, cin), x.flatten(2))},
            args.repeats,
        )
        print(f'   {cin}->{cout} at {size}x{size}: conv {ms["conv"]:.2f} ms, matmul {ms["matmul"]:.2f} ms')
    model = timm.create_model('hs_resnet50').eval()
    patched = copy.deepcopy(model)
    for block in patched.modules():
        if isinstance(block, HSBottleneck):
            for conv in (block.conv1, block.conv3):
                if conv.in_channels % 8 or conv.out_channels % 8:
                    conv.__class__ = MatmulConv1x1
    x = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(patched(x), model(x), rtol=1e-4, atol=1e-4)
    ms = interleaved_ms({'conv': lambda: model(x), 'matmul': lambda: patched(x)}, max(args.repeats // 3, 3))
    print(f'   inside hs_resnet50, batch 8: {ms["conv"]:.0f} ms per forward as convs, {ms["matmul"]:.0f} ms as matmuls')

    print('2. strided block: grouped conv against one conv per group (4 groups, stride 2):')
    for batch in (8, 1):
        for channels, size in ((144, 56), (288, 28), (576, 14)):
            width = channels // 4
            rest = torch.randn(batch, channels + width, size, size)[:, width:]  # a channel slice, as in the block
            w = torch.randn(channels, width, 3, 3)
            slices = [slice(g * width, (g + 1) * width) for g in range(4)]
            variants = {
                'grouped': partial(F.conv2d, rest, w, None, 2, 1, 1, 4),
                'per group': partial(per_group, rest, w, slices),
            }
            ms = interleaved_ms(variants, args.repeats)
            print(f'   batch {batch}, {channels} channels at {size}x{size}: grouped {ms["grouped"]:.2f} ms, '
                  f'per group {ms["per group"]:.2f} ms')  # fmt: skip


if __name__ == '__main__':
    main()
