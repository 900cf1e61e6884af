"""A deployment form of the HS block tried and dropped (docs/performance.md, "What the block does for speed"):

each cascade conv reads ``cat(x_i, y_{i-1,2})``, so its output is ``A_i * x_i + B_i * y_{i-1,2}``, and the ``A_i * x_i``
part does not depend on the previous group. The hoisted form computes it for all groups at once, one grouped conv
over ``x_2 .. x_s`` (each group's output zero-padded to the widest ``c_i``), and the serial chain convolves only the
forwarded halves. Timed against today's split/concat block on the stage shapes of hs_resnet50 (w=18, s=5), BN
folded into the convs, fp32, channels_last, inference, interleaved rounds; the ratio is hoisted speed / today's.

    python benchmarks/scripts/hoisted_cascade.py [--threads 2] [--repeats 11]
"""

import statistics

import torch
import torch.nn as nn
from _common import interleaved_times, make_parser, start

from hsresnet.layers import HSBlock
from hsresnet.optimize import fold_batchnorm


class HoistedCascade(nn.Module):
    """The same function as a BN-folded ``HSBlock`` (eval), with every ``A_i * x_i`` in one grouped conv."""

    def __init__(self, block: HSBlock):
        super().__init__()
        w, widths, first = block.width, block.widths, block.convs[0]
        self.w, self.widths, self.out_widths, self.cmax = w, widths, block.out_widths, max(widths)
        self.hoisted = nn.Conv2d(
            w * len(widths), self.cmax * len(widths), 3, padding=first.padding, dilation=first.dilation,
            groups=len(widths),
        )  # fmt: skip
        self.hoisted.weight.data.zero_()
        self.hoisted.bias.data.zero_()
        self.chain = nn.ModuleList()
        for i, conv in enumerate(block.convs):
            rows = slice(i * self.cmax, i * self.cmax + widths[i])
            self.hoisted.weight.data[rows] = conv.weight[:, :w]
            self.hoisted.bias.data[rows] = conv.bias
            if i > 0:
                rest = nn.Conv2d(conv.in_channels - w, widths[i], 3, padding=conv.padding, dilation=conv.dilation,
                                 bias=False)  # fmt: skip
                rest.weight.data = conv.weight[:, w:].clone()
                self.chain.append(rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.hoisted(x[:, self.w :])
        outs = [x[:, : self.w]]
        y = torch.relu(parts[:, : self.widths[0]])
        for i in range(1, len(self.widths)):
            keep = self.out_widths[i - 1]
            outs.append(y[:, :keep])
            part = parts[:, i * self.cmax : i * self.cmax + self.widths[i]]
            y = torch.relu(part + self.chain[i - 1](y[:, keep:]))
        outs.append(y)
        return torch.cat(outs, 1)


@torch.inference_mode()
def compare(block: HSBlock, hoisted: HoistedCascade, x: torch.Tensor, repeats: int):
    """-> (max |difference| of the outputs, seconds per timed call of each), each call ~50 ms of forwards."""
    error = (block._forward_cat(x) - hoisted(x)).abs().max().item()
    calls = max(1, round(0.05 / min(interleaved_times({'one': lambda: block._forward_cat(x)}, 3)['one'])))
    variants = {
        'today': lambda: [block._forward_cat(x) for _ in range(calls)],
        'hoisted': lambda: [hoisted(x) for _ in range(calls)],
    }
    return error, interleaved_times(variants, repeats)


def main() -> None:
    parser = make_parser(__doc__, repeats=11)
    parser.add_argument('--s', type=int, default=5)
    args = start(parser)
    for width, size in [(18, 56), (36, 28), (72, 14), (144, 7)]:
        block = HSBlock(width, args.s).eval()
        for bn in block.bns:  # non-trivial statistics, so folding changes the weights
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.normal_()
            bn.bias.data.normal_()
        fold_batchnorm(block)
        hoisted = HoistedCascade(block).eval()
        block.to(memory_format=torch.channels_last)
        hoisted.to(memory_format=torch.channels_last)
        for batch in (8, 1):
            x = torch.randn(batch, args.s * width, size, size).to(memory_format=torch.channels_last)
            error, times = compare(block, hoisted, x, args.repeats)
            ratios = [t / h for t, h in zip(times['today'], times['hoisted'])]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(f'w={width} {size}x{size} batch {batch}: hoisted / today speed {statistics.median(ratios):.3f} '
                  f'(quartiles {q1:.3f}-{q3:.3f}); max |difference| {error:.1e}', flush=True)  # fmt: skip


if __name__ == '__main__':
    main()
