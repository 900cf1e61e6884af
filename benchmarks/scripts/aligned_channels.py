"""A deployment form of the HS block tried and dropped (docs/performance.md, "What limits it"): every conv input
padded with zero channels to a multiple of 4.

onnxruntime's NCHWc layout pass (its fast blocked conv kernels) takes a conv only when its input channels are a
multiple of 4 (or fewer than the block size): in hs_resnet50 the cascade's 18, 27, 31, 33 inputs of stage 1, and
the 90-channel input of its 1x1 conv3, stay in plain NCHW. Here the BN-folded bottleneck gets zero weight rows and
columns so that each of those inputs carries 0-3 extra channels that are always zero: conv1 writes zeros behind
``x_2``, each cascade conv writes zeros behind its forwarded half, the last one behind the block's output, and the
convs that read them have zero columns there (ReLU(0) = 0, so the function is unchanged). Both ONNX files are then
timed through onnxruntime and OpenVINO with ResNet-50 and Res2Net-50, fp32, interleaved rounds.

    python benchmarks/scripts/aligned_channels.py [--threads 2] [--repeats 11]
"""

import copy
import os
import statistics
import tempfile
from functools import partial
from typing import List

import timm
import torch
import torch.nn as nn
from _common import interleaved_times, make_parser, start

from hsresnet.benchmark import exported_runner
from hsresnet.layers import HSBlock
from hsresnet.models import HSBottleneck
from hsresnet.optimize import fold_batchnorm

MULTIPLE = 4  # onnxruntime's NCHWc pass: input channels % 4 == 0


def round_up(n: int) -> int:
    return -(-n // MULTIPLE) * MULTIPLE


def placed(conv: nn.Conv2d, in_channels: int, out_channels: int, rows: List[int], cols: List[int]) -> nn.Conv2d:
    """A conv ``in_channels -> out_channels`` holding ``conv``'s weight at output ``rows`` and input ``cols``; zero
    elsewhere, bias included."""
    new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[torch.tensor(rows)[:, None], torch.tensor(cols)] = conv.weight
        new.bias[torch.tensor(rows)] = conv.bias
    return new


class AlignedHSBlock(nn.Module):
    """A BN-folded ``HSBlock`` whose conv inputs are padded to multiples of 4 (the zeros come from the convs before)."""

    def __init__(self, block: HSBlock):
        super().__init__()
        w, widths, keeps = block.width, block.widths, block.out_widths
        inputs = [w] + [w + c - k for c, k in zip(widths[:-1], keeps[:-1])]
        self.w, self.s, self.keeps = w, block.s, keeps[:-1]
        self.first_pad = round_up(w) - w  # zeros behind x_2, written by conv1
        self.out_pad = round_up(block.s * w) - block.s * w  # zeros behind y_s, read by conv3
        pads = [round_up(c) - c for c in inputs[1:]] + [self.out_pad]  # zeros each conv writes for the next
        self.convs = nn.ModuleList(
            placed(conv, round_up(c_in), c + pad, list(range(c)), list(range(c_in)))
            for conv, c_in, c, pad in zip(block.convs, inputs, widths, pads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, [self.w, self.w + self.first_pad] + [self.w] * (self.s - 2), dim=1)
        outs = [groups[0]]
        y = torch.relu(self.convs[0](groups[1]))
        for i in range(1, len(self.convs)):
            outs.append(y[:, : self.keeps[i - 1]])
            y = torch.relu(self.convs[i](torch.cat([groups[i + 1], y[:, self.keeps[i - 1] :]], dim=1)))
        outs.append(y)
        return torch.cat(outs, dim=1)


def aligned(model: nn.Module) -> nn.Module:
    """A BN-folded copy of ``model`` whose stride-1 HS bottlenecks are aligned."""
    model = fold_batchnorm(copy.deepcopy(model).eval())
    for b in model.modules():
        if isinstance(b, HSBottleneck) and isinstance(b.conv2, HSBlock):
            block, mid = AlignedHSBlock(b.conv2), b.conv2.channels
            w, pad = block.w, block.first_pad
            rows = list(range(2 * w)) + list(range(2 * w + pad, mid + pad))
            b.conv1 = placed(b.conv1, b.conv1.in_channels, mid + pad, rows, list(range(b.conv1.in_channels)))
            b.conv2 = block
            b.conv3 = placed(b.conv3, mid + block.out_pad, b.conv3.out_channels, list(range(b.conv3.out_channels)),
                             list(range(mid)))  # fmt: skip
    return model


def ort_layout(onnx_file: str) -> str:
    """Node counts of the graph onnxruntime runs (all optimizations): blocked (NCHWc) and plain convs, reorders."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = onnx_file + '.optimized'
    options.log_severity_level = 3  # not the warning that the saved graph is hardware-specific
    ort.InferenceSession(onnx_file, options, providers=['CPUExecutionProvider'])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    blocked = [n.op_type for n in nodes if n.domain == 'com.microsoft.nchwc']
    plain_convs = sum(n.op_type in ('Conv', 'FusedConv') and n.domain != 'com.microsoft.nchwc' for n in nodes)
    reorders = sum(t.startswith('Reorder') for t in blocked)
    return f'{blocked.count("Conv")} NCHWc convs, {plain_convs} plain convs, {reorders} layout reorders'


def main() -> None:
    parser = make_parser(__doc__, repeats=11)
    args = start(parser)
    args.in_chans, args.img_size = 3, 224
    hs = timm.create_model('hs_resnet50').eval()
    for m in hs.modules():  # non-trivial BN statistics, so the folded biases are not zero
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    models = {
        'resnet50': timm.create_model('resnet50').eval(),
        'res2net50_26w_4s': timm.create_model('res2net50_26w_4s').eval(),
        'hs_resnet50': hs,
        'hs_resnet50 aligned': aligned(hs),
    }
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(models['hs_resnet50 aligned'](x), hs(x), rtol=1e-4, atol=1e-4)
    with tempfile.TemporaryDirectory() as folder:
        for path in ('onnxruntime', 'openvino'):
            for batch in (8, 1):
                runners = {
                    name: exported_runner(m, os.path.join(folder, f'{i}-{batch}.onnx'), path, batch, x.device, args)[0]
                    for i, (name, m) in enumerate(models.items())
                }
                if path == 'onnxruntime' and batch == 8:
                    for i, name in enumerate(models):
                        print(f'{name}: {ort_layout(os.path.join(folder, f"{i}-{batch}.onnx"))}', flush=True)
                xb = torch.randn(batch, 3, 224, 224)
                calls = {name: partial(run, xb) for name, run in runners.items()}
                times = interleaved_times(calls, args.repeats)
                base = times['resnet50']
                cells = [
                    f'{name} {batch / statistics.median(t):.1f} img/s '
                    f'{statistics.median(b / t_ for b, t_ in zip(base, t)):.3f}x'
                    for name, t in times.items()
                ]
                print(f'{path}, batch {batch}: ' + '; '.join(cells), flush=True)


if __name__ == '__main__':
    main()
