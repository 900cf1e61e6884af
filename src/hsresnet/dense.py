"""What the dense-prediction commands ``hsresnet detect`` and ``hsresnet segment`` share."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .engine import fit, init_distributed, make_loader, write_json
from .engine.checkpoint import CHECKPOINT_HELP
from .engine.config import NON_NEGATIVE_INT, POSITIVE_INT
from .engine.distributed import DistInfo, cleanup_distributed

Loaded = Tuple[nn.Module, Dict[str, Any]]


def make_loaders(
    cfg: argparse.Namespace, train: Dataset, val: Dataset, info: DistInfo, collate_fn: Callable
) -> Tuple[DataLoader, DataLoader]:
    """The engine's (train, val) loaders; a training set smaller than one global batch is refused."""
    if len(train) < cfg.batch_size * info.world_size:
        raise ValueError(
            f'the training set has {len(train)} images, fewer than one global batch ({cfg.batch_size} per '
            f'process x {info.world_size}); lower -b/--batch-size.'
        )
    kw = dict(workers=cfg.workers, seed=cfg.seed, collate_fn=collate_fn)
    return (
        make_loader(train, cfg.batch_size, True, info, **kw),
        make_loader(val, cfg.eval_batch_size or cfg.batch_size, False, info, **kw),
    )


def add_backbone_arguments(group: Any) -> None:
    """``--backbone``, ``--backbone-kwargs`` and ``--backbone-checkpoint``: the timm backbone and its weights."""
    group.add_argument(
        '--backbone',
        default='hs_resnet50',
        help='timm backbone: an hs_resnet* model or a baseline (resnet50, resnet50d, res2net50_26w_4s).',
    )
    group.add_argument(
        '--backbone-kwargs', nargs='*', default=[], metavar='K=V', help='timm.create_model kwargs (e.g. w=16 s=6).'
    )
    group.add_argument(
        '--backbone-checkpoint',
        default=None,
        help='classification weights (.safetensors from `hsresnet train`) for the backbone, strict keys.',
    )


def add_inference_parsers(
    sub: Any, validate_help: str, predict_help: str, predict_output: str, **parser_kwargs: Any
) -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``validate`` (alias ``eval``) and ``predict`` actions with the flags they share."""
    ev = sub.add_parser('validate', aliases=['eval'], help=validate_help, **parser_kwargs)
    pr = sub.add_parser('predict', help=predict_help, **parser_kwargs)
    for p in (ev, pr):
        p.add_argument('--checkpoint', required=True, help=CHECKPOINT_HELP)
        p.add_argument('--device', default='auto', help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda'.")
        p.add_argument('--threads', type=POSITIVE_INT, default=None, help='torch CPU threads (default: torch).')
    ev.add_argument('-j', '--workers', type=NON_NEGATIVE_INT, default=2, help='data loading processes.')
    ev.add_argument('--output', default=None, help='write the metrics to this JSON file.')
    pr.add_argument('inputs', nargs='+', help='image files or folders of images.')
    pr.add_argument('--output', default=predict_output, help='folder for the PNGs and predictions.json.')
    return ev, pr


def load_model(args: argparse.Namespace, load: Callable[[str], Loaded]) -> Loaded:
    """``load(args.checkpoint)`` after applying ``--threads``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.checkpoint)


def train(task: Any, cfg: argparse.Namespace, keys: Sequence[str]) -> int:
    """The ``train`` action: ``task`` fitted by the engine; the main process prints the ``keys`` of the summary."""
    info = init_distributed(cfg.device)
    summary = fit(task, cfg)
    if info.is_main:  # under torchrun every rank returns the summary
        print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


def validate(
    args: argparse.Namespace, model: nn.Module, dataset: Dataset, collate_fn: Callable, evaluate: Callable, **fields
) -> int:
    """The ``validate`` action (torchrun works too): ``evaluate(model, loader)`` on ``dataset``, printed by the main
    process as JSON with ``fields`` and written to ``--output``."""
    info = init_distributed(args.device)
    try:
        batch_size = getattr(args, 'eval_batch_size', None) or args.batch_size
        loader = make_loader(dataset, batch_size, False, info, workers=args.workers, collate_fn=collate_fn)
        metrics = evaluate(model.to(info.device), loader)
        if info.is_main:
            result = {'checkpoint': str(args.checkpoint), **fields, 'images': len(dataset), **metrics}
            print(json.dumps(result, indent=2))
            if args.output:
                write_json(args.output, result)
    finally:
        cleanup_distributed()
    return 0
