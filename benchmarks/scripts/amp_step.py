"""Training-step speed of the default Fashion-MNIST model (configs/fashion_mnist.yaml) in fp32 and bf16 autocast,
NCHW and channels_last: whether bf16 is worth it on this CPU (docs/classification.md).

    python benchmarks/scripts/amp_step.py [--threads 2] [--repeats 5]
"""

import argparse
import statistics
import time

import timm
import torch

import hsresnet  # noqa: F401  (registers the models)
from hsresnet.engine.allocator import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    runs = {}
    for amp in (False, True):
        for channels_last in (False, True):
            model = timm.create_model(
                'hs_resnet26_small', num_classes=10, in_chans=1, channels=[16, 32, 64, 128], w=16, s=3
            )
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            runs[amp, channels_last] = (
                model.to(memory_format=fmt),
                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                x.contiguous(memory_format=fmt),
            )

    def step(amp: bool, model, opt, xin) -> None:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(xin), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for (amp, _), parts in runs.items():  # warm-up
        step(amp, *parts)
    times = {key: [] for key in runs}
    for _ in range(args.repeats):  # interleaved rounds
        for (amp, channels_last), parts in runs.items():
            start = time.perf_counter()
            step(amp, *parts)
            times[amp, channels_last].append(time.perf_counter() - start)
    for (amp, channels_last), t in times.items():
        print(f'{"bf16" if amp else "fp32"} {"channels_last" if channels_last else "NCHW"}: '
              f'{128 / statistics.median(t):.0f} images/s')  # fmt: skip


if __name__ == '__main__':
    main()
