"""Training-step speed of the default Fashion-MNIST model (configs/fashion_mnist.yaml) in fp32 and bf16 autocast,
NCHW and channels_last: whether bf16 is worth it on this CPU (docs/classification.md).

    python benchmarks/scripts/amp_step.py [--threads 2] [--repeats 5]
"""

import statistics
from functools import partial

import timm
import torch
from _common import interleaved_times, make_parser, start


def step(amp: bool, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def main() -> None:
    args = start(make_parser(__doc__, repeats=5))
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    variants = {}
    for amp in (False, True):
        for channels_last in (False, True):
            model = timm.create_model(
                'hs_resnet26_small', num_classes=10, in_chans=1, channels=[16, 32, 64, 128], w=16, s=3
            )
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model, xin = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            name = f'{"bf16" if amp else "fp32"} {"channels_last" if channels_last else "NCHW"}'
            variants[name] = partial(step, amp, model, optimizer, xin, y)
    for name, t in interleaved_times(variants, args.repeats).items():
        print(f'{name}: {128 / statistics.median(t):.0f} images/s')


if __name__ == '__main__':
    main()
