"""Semantic segmentation with DeepLabV3+ on an HS-ResNet or baseline backbone. Actions: train (on a Cityscapes root
or an image + mask-PNG folder, with the shared engine: checkpoints, --resume, torchrun DDP, logs), eval (mIoU,
pixel accuracy, per-class IoU of a checkpoint) and predict (overlay PNGs, class-id mask PNGs, predictions.json).
Checkpoints store the model settings, so eval and predict need only --checkpoint. See docs/segmentation.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from ..engine import (
    add_amp_arguments,
    add_config_argument,
    add_engine_arguments,
    autocast,
    fit,
    init_distributed,
    load_trained_model,
    make_loader,
    parse_kwargs,
    resolve_config,
    track_explicit_flags,
    write_json,
)
from ..engine.checkpoint import CHECKPOINT_HELP
from ..engine.config import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, PROBABILITY, int_at_least
from ..engine.distributed import cleanup_distributed, resolve_device
from .data import SegmentationTransform, build_dataset, pad_collate
from .models import backbone_mean_std
from .predict import find_images, predict_images
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


def _add_eval_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--data', default=None, help='a Cityscapes root (leftImg8bit/, gtFine/) or a mask folder.')
    p.add_argument('--val-split', default='val', help='split folder to evaluate on (default: val).')
    p.add_argument('-j', '--workers', type=NON_NEGATIVE_INT, default=2, help='data loading processes.')
    p.add_argument('--device', default='auto', help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda'.")
    add_amp_arguments(p)
    p.add_argument('--threads', type=POSITIVE_INT, default=None, help='torch CPU threads (default: torch).')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION', required=True)

    train = sub.add_parser('train', help='train DeepLabV3+ (shared engine)', description=__doc__)
    track_explicit_flags(train)
    add_config_argument(train)
    model = train.add_argument_group('model')
    model.add_argument(
        '--model', default='deeplabv3plus', help='deeplabv3plus (with --backbone) or deeplabv3plus_<backbone>.'
    )
    model.add_argument(
        '--backbone',
        default='hs_resnet50',
        help='timm encoder: an hs_resnet* model or a baseline (resnet50, resnet50d, res2net50_26w_4s).',
    )
    model.add_argument(
        '--backbone-kwargs', nargs='*', default=[], metavar='K=V', help='timm.create_model kwargs (e.g. w=16 s=6).'
    )
    model.add_argument(
        '--backbone-checkpoint', default=None, help='classification weights (.safetensors) to start from.'
    )
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
    train.set_defaults(**TRAIN_DEFAULTS, _parser=train)  # the parser types YAML values (resolve_config)

    ev = sub.add_parser(
        'validate',
        aliases=['eval'],
        help='mIoU / pixel accuracy / per-class IoU of a checkpoint (alias: eval)',
        description=__doc__,
    )
    ev.add_argument('--checkpoint', required=True, help=CHECKPOINT_HELP)
    _add_eval_data_arguments(ev)
    ev.add_argument('-b', '--batch-size', type=POSITIVE_INT, default=1, help='batch size (default: 1).')
    ev.add_argument('--output', default=None, help='write the metrics to this JSON file.')

    pr = sub.add_parser(
        'predict', help='segment images: overlay PNGs, mask PNGs, predictions.json', description=__doc__
    )
    pr.add_argument('--checkpoint', required=True, help=CHECKPOINT_HELP)
    pr.add_argument('inputs', nargs='+', help='image files or folders of images.')
    pr.add_argument('--output', default='runs/segment_predict', help='folder for the PNGs and predictions.json.')
    pr.add_argument('--alpha', type=PROBABILITY, default=0.5, help='overlay opacity of the class colours.')
    pr.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'.")
    pr.add_argument('--threads', type=POSITIVE_INT, default=None, help='torch CPU threads (default: torch).')


def _crop_size(values) -> int | Tuple[int, int]:
    values = [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) not in (1, 2) or min(values) < 16:
        raise ValueError(f'--crop-size takes one or two sizes >= 16 (S or H W), got {values}.')
    return values[0] if len(values) == 1 else (values[0], values[1])


def load_segmentation_checkpoint(path: str) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as (from its header) and load its weights strictly."""
    return load_trained_model(
        path, 'segmentation', lambda meta, _: build_segmentation_model(meta), 'hsresnet segment train'
    )


def _train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args, args._parser)
    cfg.crop_size = _crop_size(cfg.crop_size)
    kwargs = cfg.backbone_kwargs
    cfg.backbone_kwargs = dict(kwargs) if isinstance(kwargs, dict) else parse_kwargs(kwargs)  # YAML dict or K=V
    info = init_distributed(cfg.device)
    summary = fit(SegmentationTask(cfg), cfg)
    if info.is_main:  # under torchrun every rank returns the summary
        print(json.dumps({k: summary.get(k) for k in ('miou', 'pixel_acc', 'best_miou', 'train_time_s')}))
    return 0


def _validate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data:
        raise ValueError('no data: pass --data DIR (a Cityscapes root or an image + mask-PNG folder).')
    model, meta = load_segmentation_checkpoint(args.checkpoint)
    info = init_distributed(args.device)
    try:
        mean, std = backbone_mean_std(model.backbone_name)
        dataset = build_dataset(args.data, args.val_split, SegmentationTransform(mean, std), int(meta['num_classes']))
        if list(getattr(dataset, 'classes', [])) != list(meta['class_names']):
            raise ValueError(
                f'{args.data} has classes {list(dataset.classes)} but the checkpoint was trained on '
                f'{meta["class_names"]}: evaluate on data with the same classes.'
            )
        loader = make_loader(dataset, args.batch_size, False, info, args.workers, 0, pad_collate)
        model.to(info.device)
        with autocast(args, info.device):
            metrics = evaluate_segmentation(model, loader, meta['class_names'])
        if info.is_main:
            result = {'checkpoint': str(args.checkpoint), 'data': str(args.data), 'split': args.val_split,
                      'images': len(dataset), **metrics}  # fmt: skip
            print(json.dumps(result, indent=2))
            if args.output:
                write_json(args.output, result)
    finally:
        cleanup_distributed()
    return 0


def _predict(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 <= args.alpha <= 1:
        raise ValueError(f'--alpha {args.alpha} must be between 0 (image only) and 1 (colours only).')
    model, meta = load_segmentation_checkpoint(args.checkpoint)
    paths = find_images(args.inputs)
    device = resolve_device(args.device)
    model.to(device)
    mean, std = backbone_mean_std(model.backbone_name)
    result = predict_images(model, paths, args.output, meta['class_names'], mean, std, device, args.alpha)
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
