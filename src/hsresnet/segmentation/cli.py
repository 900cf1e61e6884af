"""Semantic segmentation with DeepLabV3+ on an HS-ResNet or baseline backbone. Actions: train (on a Cityscapes root
or an image + mask-PNG folder, with the shared engine: checkpoints, --resume, torchrun DDP, logs), eval (mIoU,
pixel accuracy, per-class IoU of a checkpoint) and predict (overlay PNGs, class-id mask PNGs, predictions.json).
Checkpoints store the model settings, so eval and predict need only --checkpoint. See docs/segmentation.md."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from .. import dense
from ..engine import (
    add_amp_arguments,
    add_config_argument,
    add_engine_arguments,
    autocast,
    load_trained_model,
    parse_kwargs,
    write_json,
)
from ..engine.config import POSITIVE, POSITIVE_INT, PROBABILITY, int_at_least
from ..engine.distributed import resolve_device
from ..images import find_images
from .data import SegmentationTransform, build_dataset, pad_collate
from .predict import predict_images
from .task import SegmentationTask, build_segmentation_model, evaluate_segmentation

# Cityscapes-style defaults (DeepLabV3+ recipe: SGD 0.01 for a batch of 8, poly decay with power 0.9)
TRAIN_DEFAULTS = dict(
    output='runs/segment',
    epochs=200,
    batch_size=8,
    lr_base=0.01,
    lr_base_size=8,
    sched='poly',
    decay_rate=0.9,
    weight_decay=1e-4,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION', required=True)

    train = sub.add_parser('train', help='train DeepLabV3+ (shared engine)', description=__doc__)
    add_config_argument(train)
    model = train.add_argument_group('model')
    model.add_argument(
        '--model', default='deeplabv3plus', help='deeplabv3plus (with --backbone) or deeplabv3plus_<backbone>.'
    )
    dense.add_backbone_arguments(model)
    model.add_argument('--output-stride', type=int, default=16, choices=[8, 16], help='encoder output stride.')
    model.add_argument('--frozen-bn', action='store_true', help='freeze the encoder BatchNorm (FrozenBatchNorm2d).')
    model.add_argument(
        '--trainable-layers', type=int_at_least(0), default=5, help='encoder stages trained, 0-5 (default: all).'
    )
    data = train.add_argument_group('data')
    data.add_argument('--data', default=None, help='a Cityscapes root (leftImg8bit/, gtFine/) or a mask folder.')
    data.add_argument(
        '--num-classes', type=POSITIVE_INT, default=None, help='classes of a mask folder without classes.json.'
    )
    data.add_argument('--train-split', default='train', help='split folder to train on (default: train).')
    data.add_argument('--val-split', default='val', help='split folder to evaluate on (default: val).')
    data.add_argument('--eval-batch-size', type=POSITIVE_INT, default=None, help='evaluation batch size (default: -b).')
    data.add_argument(
        '--crop-size',
        type=POSITIVE_INT,
        nargs='+',
        default=[512],
        metavar='PX',
        help='training crop: S or H W (default 512).',
    )
    data.add_argument(
        '--scale-range', type=POSITIVE, nargs=2, default=[0.5, 2.0], metavar=('MIN', 'MAX'), help='random scale.'
    )
    data.add_argument('--hflip', type=PROBABILITY, default=0.5, help='horizontal flip probability.')
    add_engine_arguments(train)
    train.set_defaults(**TRAIN_DEFAULTS)

    ev, pr = dense.add_inference_parsers(
        sub,
        'mIoU / pixel accuracy / per-class IoU of a checkpoint (alias: eval)',
        'segment images: overlay PNGs, mask PNGs, predictions.json',
        'runs/segment_predict',
        description=__doc__,
    )
    ev.add_argument('--data', default=None, help='a Cityscapes root (leftImg8bit/, gtFine/) or a mask folder.')
    ev.add_argument('--val-split', default='val', help='split folder to evaluate on (default: val).')
    ev.add_argument('-b', '--batch-size', type=POSITIVE_INT, default=1, help='batch size (default: 1).')
    add_amp_arguments(ev)
    pr.add_argument('--alpha', type=PROBABILITY, default=0.5, help='overlay opacity of the class colours.')


def _crop_size(values: List[int]) -> int | Tuple[int, int]:
    if len(values) not in (1, 2) or min(values) < 16:
        raise ValueError(f'--crop-size takes one or two sizes >= 16 (S or H W), got {values}.')
    return values[0] if len(values) == 1 else (values[0], values[1])


def load_segmentation_checkpoint(path: str) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as (from its header) and load its weights strictly."""
    return load_trained_model(
        path, 'segmentation', lambda meta, _: build_segmentation_model(meta), 'hsresnet segment train'
    )


def _train(cfg: argparse.Namespace) -> int:
    cfg.crop_size = _crop_size(cfg.crop_size)
    cfg.backbone_kwargs = parse_kwargs(cfg.backbone_kwargs)
    return dense.train(SegmentationTask(cfg), cfg, ('miou', 'pixel_acc', 'best_miou', 'train_time_s'))


def _validate(args: argparse.Namespace) -> int:
    if not args.data:
        raise ValueError('no data: pass --data DIR (a Cityscapes root or an image + mask-PNG folder).')
    model, meta = dense.load_model(args, load_segmentation_checkpoint)
    transform = SegmentationTransform(model.mean, model.std)
    dataset = build_dataset(args.data, args.val_split, transform, int(meta['num_classes']))
    if list(dataset.classes) != list(meta['class_names']):
        raise ValueError(
            f'{args.data} has classes {list(dataset.classes)} but the checkpoint was trained on '
            f'{meta["class_names"]}: evaluate on data with the same classes.'
        )

    def evaluate(model: torch.nn.Module, loader) -> Dict[str, float]:
        with autocast(args, next(model.parameters()).device):
            return evaluate_segmentation(model, loader, meta['class_names'])

    return dense.validate(args, model, dataset, pad_collate, evaluate, data=str(args.data), split=args.val_split)


def _predict(args: argparse.Namespace) -> int:
    model, meta = dense.load_model(args, load_segmentation_checkpoint)
    paths = find_images(args.inputs)
    result = predict_images(model, paths, args.output, meta['class_names'], resolve_device(args.device), args.alpha)
    result = {'checkpoint': str(args.checkpoint), **result}
    write_json(Path(args.output) / 'predictions.json', result)
    for record in result['images']:
        fractions = ', '.join(f'{k} {v:.1%}' for k, v in record['class_fractions'].items())
        print(f'{record["image"]}: {fractions} -> {record["overlay"]}')
    skipped = f'; {len(result["skipped"])} unreadable file(s) skipped' if result['skipped'] else ''
    print(f'wrote {len(result["images"])} overlays and masks and {Path(args.output) / "predictions.json"}{skipped}')
    return 0 if result['images'] else 1


def run(args: argparse.Namespace) -> int:
    return {'train': _train, 'validate': _validate, 'eval': _validate, 'predict': _predict}[args.action](args)
