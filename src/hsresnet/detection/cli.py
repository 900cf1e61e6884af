"""Object detection and instance segmentation (Faster R-CNN / Mask R-CNN + FPN): ``hsresnet detect train|eval|predict``.

train   trains on a COCO-format dataset (annotations/instances_<split>.json + <split>/ images) or a Pascal VOC
        folder with the shared engine (checkpoints, --resume, torchrun DDP, CSV/TensorBoard/PNG logs, summary.json).
eval    COCO box (and mask) AP of a checkpoint on the val split (torchrun works too).
predict detects on images: overlay PNGs (boxes with labels and scores, masks in colour) and predictions.json.

The model settings (detector, backbone, sizes, classes) are stored in every checkpoint, so eval and predict need
only --checkpoint. See docs/detection.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from .. import dense
from ..engine import (
    add_config_argument,
    add_engine_arguments,
    load_trained_model,
    parse_kwargs,
)
from ..engine.config import NON_NEGATIVE_INT, POSITIVE_INT, PROBABILITY
from ..engine.distributed import resolve_device
from ..images import find_images
from .datasets import collate_fn
from .models import DETECTORS, create_detector
from .predict import predict_images
from .task import DetectionTask, build_dataset, detector_kwargs, evaluate_detector

# torchvision's detection recipe: SGD 0.02 for a batch of 16, 26 epochs with steps at 16 and 22 (the 2x schedule
# halves that), warm-up
TRAIN_DEFAULTS = dict(
    output='runs/detect',
    epochs=26,
    batch_size=2,
    lr_base=0.02,
    lr_base_size=16,
    sched='multistep',
    decay_milestones=[16, 22],
    decay_rate=0.1,
    warmup_epochs=1,
    warmup_lr=1e-4,
    weight_decay=1e-4,
)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('model')
    g.add_argument(
        '--model',
        default='fasterrcnn_hs_resnet50_fpn',
        choices=sorted(DETECTORS),
        help='detector (default: fasterrcnn_hs_resnet50_fpn); Mask R-CNN needs instance masks.',
    )
    dense.add_backbone_arguments(g)
    g.add_argument(
        '--trainable-layers',
        type=NON_NEGATIVE_INT,
        default=None,
        help='backbone stages trained, 0-5 (default as torchvision: 3 with --backbone-checkpoint, else 5).',
    )
    g.add_argument(
        '--frozen-bn',
        action=argparse.BooleanOptionalAction,
        default=None,
        help='FrozenBatchNorm2d in the backbone (default: on with --backbone-checkpoint, else off).',
    )
    g.add_argument('--fpn-channels', type=POSITIVE_INT, default=256, help='FPN width (default 256).')
    g.add_argument(
        '--box-head-dim', type=POSITIVE_INT, default=1024, help='width of the two-FC box head (default 1024).'
    )
    g.add_argument(
        '--mask-head-channels', type=POSITIVE_INT, default=256, help='width of the mask head convs (default 256).'
    )
    g.add_argument(
        '--min-size',
        type=POSITIVE_INT,
        nargs='+',
        default=[800],
        help='shorter side the detector resizes to; several = random per training image (default 800).',
    )
    g.add_argument('--max-size', type=POSITIVE_INT, default=1333, help='cap on the longer side (default 1333).')
    g.add_argument(
        '--anchor-sizes',
        type=POSITIVE_INT,
        nargs=5,
        default=None,
        metavar='PX',
        help='anchor size per FPN level P2-P6 (default torchvision: 32 64 128 256 512).',
    )
    g.add_argument(
        '--detections-per-img', type=POSITIVE_INT, default=100, help='max detections per image (default 100).'
    )
    g.add_argument('--score-thresh', type=PROBABILITY, default=0.05, help='drop detections below this score (eval).')
    g.add_argument(
        '--detector-kwargs',
        nargs='*',
        default=[],
        metavar='K=V',
        help='more torchvision FasterRCNN/MaskRCNN kwargs, e.g. box_batch_size_per_image=128.',
    )


def _add_data_arguments(p: argparse.ArgumentParser, train: bool) -> None:
    g = p.add_argument_group('data')
    g.add_argument(
        '--data',
        default=None,
        help='dataset root: COCO layout (annotations/instances_<split>.json and '
        '<split>/) or Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt).',
    )
    if train:
        g.add_argument('--train-split', default='train', help='training split (default: train; COCO: train2017).')
        g.add_argument('--train-ann', default=None, help='a COCO JSON for training (instead of --data).')
        g.add_argument('--train-images', default=None, help='the image folder of --train-ann.')
        g.add_argument(
            '--skip-empty',
            action='store_true',
            help='drop training images without annotations (default: keep them as negatives).',
        )
        g.add_argument('--hflip', type=PROBABILITY, default=0.5, help='horizontal flip probability (default 0.5).')
        g.add_argument('--vflip', type=PROBABILITY, default=0.0, help='vertical flip probability (aerial/microscopy).')
    g.add_argument('--val-split', default='val', help='evaluation split (default: val; COCO: val2017).')
    g.add_argument('--val-ann', default=None, help='a COCO JSON for evaluation (instead of --data).')
    g.add_argument('--val-images', default=None, help='the image folder of --val-ann.')
    g.add_argument('--eval-batch-size', type=POSITIVE_INT, default=None, help='evaluation batch size (default: -b).')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION', required=True)

    train = sub.add_parser(
        'train',
        help='train Faster R-CNN / Mask R-CNN (shared engine)',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(train)
    _add_model_arguments(train)
    _add_data_arguments(train, train=True)
    add_engine_arguments(train)
    train.set_defaults(**TRAIN_DEFAULTS)

    ev, pr = dense.add_inference_parsers(
        sub,
        'COCO box/mask AP of a checkpoint (alias: eval)',
        'detect on images: overlay PNGs and predictions.json',
        'runs/detect_predict',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_arguments(ev, train=False)
    ev.add_argument('-b', '--batch-size', type=POSITIVE_INT, default=2, help='batch size (default: 2).')
    pr.add_argument('--score-thresh', type=PROBABILITY, default=0.5, help='keep detections with at least this score.')


def load_detector_checkpoint(path: str) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild the detector a checkpoint was trained as (from its header) and load its weights strictly."""

    def build(meta: Dict[str, Any], _) -> torch.nn.Module:
        return create_detector(meta['model'], **detector_kwargs(meta, int(meta['num_classes'])))

    return load_trained_model(path, 'detection', build, 'hsresnet detect train')


def _train(cfg: argparse.Namespace) -> int:
    cfg.backbone_kwargs = parse_kwargs(cfg.backbone_kwargs)
    cfg.detector_kwargs = parse_kwargs(cfg.detector_kwargs)
    metrics = ('bbox_AP', 'bbox_AP50', 'segm_AP', 'segm_AP50', 'train_time_s', 'best_bbox_AP', 'best_segm_AP')
    return dense.train(DetectionTask(cfg), cfg, (*metrics, 'best_epoch'))


def _validate(args: argparse.Namespace) -> int:
    model, meta = dense.load_model(args, load_detector_checkpoint)
    masks = meta['model'].startswith('maskrcnn')
    dataset = build_dataset(args, 'val', train=False, masks=masks, classes=meta['class_names'])
    if dataset.class_names != meta['class_names']:
        raise ValueError(
            f'the data has classes {dataset.class_names} but the checkpoint was trained on {meta["class_names"]}.'
        )
    return dense.validate(args, model, dataset, collate_fn, evaluate_detector)


def _predict(args: argparse.Namespace) -> int:
    model, meta = dense.load_model(args, load_detector_checkpoint)
    paths = find_images(args.inputs)
    result = predict_images(
        model, paths, Path(args.output), meta['class_names'], resolve_device(args.device), args.score_thresh
    )
    records, skipped = result['images'], result['skipped']
    n = sum(len(r['detections']) for r in records)
    print(
        f'{len(records)} images, {n} detections with score >= {args.score_thresh}: overlays and predictions.json '
        f'in {args.output}' + (f'; {len(skipped)} unreadable file(s) skipped' if skipped else '')
    )
    return 0 if records else 1


def run(args: argparse.Namespace) -> int:
    return {'train': _train, 'validate': _validate, 'eval': _validate, 'predict': _predict}[args.action](args)
