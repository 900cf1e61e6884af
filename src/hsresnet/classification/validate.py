"""Evaluate a classifier checkpoint: top-1/top-5 (and loss) on a dataset, like timm's validate.py.

The model, class list and preprocessing come from the checkpoint's metadata; data flags override. Writes
--results-file as JSON or CSV (by extension) and a confusion-matrix PNG when there are at most 20 classes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..engine import add_amp_arguments, autocast, count_params, make_loader, write_csv, write_json
from ..engine.checkpoint import CHECKPOINT_HELP
from ..engine.config import NON_NEGATIVE_INT, POSITIVE_INT
from ..engine.distributed import cleanup_distributed, init_distributed
from ..engine.logs import new_figure, save_figure
from .task import ClassificationTask, add_data_arguments, load_classifier


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help=CHECKPOINT_HELP)
    add_data_arguments(parser, training=False)
    parser.add_argument('-b', '--batch-size', type=POSITIVE_INT, default=256, help='batch size.')
    parser.add_argument('-j', '--workers', type=NON_NEGATIVE_INT, default=2, help='data loading processes.')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'.")
    add_amp_arguments(parser)
    parser.add_argument('--channels-last', action='store_true', help='channels_last memory format.')
    parser.add_argument('--results-file', help='write the results here (.json or .csv).')
    parser.add_argument(
        '--confusion-matrix',
        metavar='PNG',
        help='confusion-matrix image (<= 20 classes); default: next to --results-file, else in the checkpoint folder.',
    )


def run(args: argparse.Namespace) -> int:
    results = validate(args)
    if results is not None:
        print(json.dumps(results, indent=2))
    return 0


def validate(args: argparse.Namespace):
    info = init_distributed(args.device)
    try:
        model, meta = load_classifier(args.checkpoint)
        # data settings: typed flags first, then the checkpoint's preprocessing
        args.model, args.model_kwargs = meta['model'], []
        args.in_chans = int(meta.get('in_chans', 3))
        args.num_classes = int(meta['num_classes'])
        for key in ('img_size', 'mean', 'std', 'crop_pct'):
            setattr(args, key, getattr(args, key) or meta.get(key))
        task = ClassificationTask(args, training=False, classes=meta.get('classes'))
        if task.kind == 'fashion_mnist' and task.num_classes != 10:
            raise ValueError(f'the checkpoint has {task.num_classes} classes but Fashion-MNIST has 10.')
        _, dataset = task.datasets(training=False)
        loader = make_loader(dataset, args.batch_size, False, info, args.workers)
        model.to(info.device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        from torchmetrics.classification import MulticlassConfusionMatrix

        confmat = MulticlassConfusionMatrix(task.num_classes).to(info.device)
        start = time.time()
        with torch.no_grad(), autocast(args, info.device):
            metrics = task.evaluate(model, loader, confmat=confmat)
        elapsed = time.time() - start
        matrix = confmat.compute()
        if not info.is_main:
            return None
        results = {
            'model': meta['model'],
            'checkpoint': meta['checkpoint'],
            'top1': round(metrics['top1'], 4),
            'top1_err': round(100 - metrics['top1'], 4),
            'top5': round(metrics['top5'], 4),
            'top5_err': round(100 - metrics['top5'], 4),
            'loss': round(metrics['loss'], 5),
            'param_count': round(count_params(model) / 1e6, 3),
            'img_size': task.img_size,
            'crop_pct': task.crop_pct,
            'interpolation': args.interpolation,
            'num_images': len(dataset),
            'images_per_s': round(len(dataset) / max(elapsed, 1e-9), 1),
        }
        if task.num_classes <= 20:
            png = Path(
                args.confusion_matrix
                or (Path(args.results_file).with_suffix('.confusion.png') if args.results_file else None)
                or Path(meta['checkpoint']).parent / 'confusion_matrix.png'
            )
            plot_confusion(matrix, task.classes[: task.num_classes], png)
            results['confusion_matrix'] = str(png)
        if args.results_file:
            path = Path(args.results_file)
            if path.suffix.lower() == '.csv':
                write_csv(path, [results])
            else:
                write_json(path, results)
        return results
    finally:
        cleanup_distributed()


def plot_confusion(matrix: torch.Tensor, classes, path: Path) -> None:
    """Save the confusion matrix (rows: true class, columns: predicted) with counts, via torchmetrics' plot."""
    from torchmetrics.utilities.plot import plot_confusion_matrix

    fig, ax = new_figure(1, 1, figsize=(max(6, 0.6 * len(classes) + 2), max(5, 0.6 * len(classes) + 1)))
    plot_confusion_matrix(matrix.cpu(), ax=ax, labels=list(classes))
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    save_figure(fig, path, dpi=100)
