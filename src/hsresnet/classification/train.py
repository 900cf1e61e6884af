"""Train an image classifier (default: a small HS-ResNet on Fashion-MNIST) and evaluate it.

Flags follow timm's train.py; a YAML recipe given with -c sets defaults that typed flags override. Works under
`torchrun --nproc_per_node N hsresnet train ...` (DDP). Writes to --output: last/best checkpoints (safetensors +
training state), metrics.csv, tb/ (TensorBoard), curves.png and summary.json.
"""

from __future__ import annotations

import argparse
import json

from ..engine import add_config_argument, add_engine_arguments, fit
from .task import ClassificationTask, add_data_arguments, add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    add_model_arguments(parser)
    add_data_arguments(parser, training=True)
    add_engine_arguments(parser)


def run(cfg: argparse.Namespace) -> int:
    from ..engine.distributed import init_distributed

    info = init_distributed(cfg.device)
    task = ClassificationTask(cfg, verbose=info.is_main)
    summary = fit(task, cfg)
    if info.is_main:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
    return 0
