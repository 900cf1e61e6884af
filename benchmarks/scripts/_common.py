"""What the timing scripts of this folder share: their command line and set-up, interleaved timing, a training step.

The scripts import it as ``_common`` (Python puts a script's own folder first on ``sys.path``).
"""

import argparse
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn

import hsresnet  # noqa: F401  (registers the models)
from hsresnet.engine.allocator import keep_freed_memory


def make_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """``--threads`` (2) and ``--repeats``; a script adds its own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=repeats)
    return parser


def start(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, then set up as ``hsresnet benchmark`` does: glibc keeps freed memory, the thread count, seed 0."""
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def interleaved_times(variants: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, List[float]]:
    """Seconds per call of each variant over ``repeats`` rounds, after one warm-up call each. Every round calls each
    variant once, in reversed order every other round, so a slow phase of the machine hits all of them alike."""
    for run in variants.values():
        run()
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
            begin = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - begin)
    return times


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD step (momentum 0.9) of ``model`` in training mode with cross entropy on the fixed batch ``(x, y)``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        nn.functional.cross_entropy(model.train()(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
