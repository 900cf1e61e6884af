"""The detection task for the shared engine (contract in ``hsresnet/engine/task.py``): datasets, model, loss and
COCO evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..dense import make_loaders
from .datasets import CocoDetection, collate_fn, detection_transforms, voc_dataset
from .evaluation import DetectionEvaluator
from .models import create_detector

# config keys that define the model (saved in the checkpoint header, so eval/predict rebuild the same model)
MODEL_KEYS = (
    'model',
    'backbone',
    'backbone_kwargs',
    'fpn_channels',
    'box_head_dim',
    'mask_head_channels',
    'min_size',
    'max_size',
    'anchor_sizes',
    'trainable_layers',
    'frozen_bn',
    'detections_per_img',
    'score_thresh',
    'detector_kwargs',
)


def build_dataset(
    cfg: argparse.Namespace, split: str, train: bool, masks: bool, classes: Optional[Sequence[str]] = None
) -> CocoDetection:
    """The dataset of ``split`` ('train' or 'val') that ``cfg`` points to: ``--<split>-ann``/``--<split>-images``,
    else the ``--<split>-split`` of ``--data`` in the COCO layout (``annotations/instances_<split>.json`` +
    ``<split>/``) or the Pascal VOC one (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``), whose
    class order is ``classes``."""
    ann, images = getattr(cfg, f'{split}_ann', None), getattr(cfg, f'{split}_images', None)
    transforms = detection_transforms(True, cfg.hflip, cfg.vflip) if train else None
    kwargs = dict(transforms=transforms, masks=masks, skip_empty=train and cfg.skip_empty)
    if ann:
        if not images:
            raise ValueError(
                f'--{split}-ann needs --{split}-images (the folder its file_name entries are relative to).'
            )
        return CocoDetection(ann, images, **kwargs)
    if not cfg.data:
        raise ValueError('no data: pass --data DIR (COCO or VOC layout) or --train-ann/--train-images.')
    data, name = Path(cfg.data), getattr(cfg, f'{split}_split')
    coco_json = data / 'annotations' / f'instances_{name}.json'
    if coco_json.is_file():
        return CocoDetection(coco_json, data / name, **kwargs)
    if (data / 'Annotations').is_dir():
        return voc_dataset(data, name, classes, **kwargs)
    raise FileNotFoundError(
        f'{data} has neither {coco_json} (COCO layout: annotations/instances_<split>.json and <split>/ images) nor '
        f'Annotations/ (Pascal VOC layout). Run `hsresnet data prepare` for the demo data, or pass --train-split/'
        f'--val-split (e.g. train2017/val2017), or --train-ann/--train-images and --val-ann/--val-images.'
    )


def detector_kwargs(cfg: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """Keyword arguments of ``create_detector`` from the model settings (``MODEL_KEYS``) of a config."""
    min_size = cfg['min_size']
    kwargs: Dict[str, Any] = dict(
        num_classes=num_classes,
        backbone=cfg['backbone'],
        backbone_kwargs=dict(cfg.get('backbone_kwargs') or {}),
        fpn_channels=cfg['fpn_channels'],
        box_head_dim=cfg.get('box_head_dim') or 1024,
        min_size=tuple(min_size) if isinstance(min_size, (list, tuple)) else min_size,
        max_size=cfg['max_size'],
        trainable_layers=cfg.get('trainable_layers'),
        frozen_bn=cfg.get('frozen_bn'),
        box_detections_per_img=cfg['detections_per_img'],
        box_score_thresh=cfg['score_thresh'],
        mask_head_channels=cfg.get('mask_head_channels') or 256,
        **dict(cfg.get('detector_kwargs') or {}),
    )
    if cfg.get('anchor_sizes'):
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes = tuple((int(s),) for s in cfg['anchor_sizes'])  # one per FPN level P2-P6 (the flag takes 5)
        kwargs['rpn_anchor_generator'] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    return kwargs


class DetectionTask:
    """Faster R-CNN / Mask R-CNN on a COCO-format or VOC dataset; the main metric is COCO box (or mask) AP."""

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.masks = cfg.model.startswith('maskrcnn')
        self.main_metric = 'segm_AP' if self.masks else 'bbox_AP'
        self._datasets: Optional[Tuple[CocoDetection, CocoDetection]] = None

    def datasets(self) -> Tuple[CocoDetection, CocoDetection]:
        if self._datasets is None:
            train = build_dataset(self.cfg, 'train', True, self.masks)
            val = build_dataset(self.cfg, 'val', False, self.masks, classes=train.class_names)
            if train.class_names != val.class_names:
                raise ValueError(f'train and val categories differ: {train.class_names} vs {val.class_names}.')
            self._datasets = (train, val)
        return self._datasets

    def model_config(self) -> Dict[str, Any]:
        """The model settings, with torchvision's defaults for frozen BN / trainable stages made explicit."""
        cfg = {k: getattr(self.cfg, k, None) for k in MODEL_KEYS}
        trained = bool(getattr(self.cfg, 'backbone_checkpoint', None))
        cfg['frozen_bn'] = trained if cfg['frozen_bn'] is None else bool(cfg['frozen_bn'])
        cfg['trainable_layers'] = (3 if trained else 5) if cfg['trainable_layers'] is None else cfg['trainable_layers']
        return cfg

    def build_model(self) -> nn.Module:
        train, _ = self.datasets()
        kwargs = detector_kwargs(self.model_config(), len(train.class_names) + 1)
        return create_detector(self.cfg.model, backbone_checkpoint=self.cfg.backbone_checkpoint, **kwargs)

    def build_loaders(self, info: Any) -> Tuple[DataLoader, DataLoader]:
        return make_loaders(self.cfg, *self.datasets(), info, collate_fn)

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    def training_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
        """torchvision's detection losses (RPN objectness and box, ROI class and box, mask); 'loss' is their sum."""
        images, targets = batch
        losses = model(images, targets)
        return {'loss': sum(losses.values()), **{k.removeprefix('loss_'): v.detach() for k, v in losses.items()}}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> Dict[str, float]:
        """COCO AP of the detections on ``loader``; results are merged over ranks before scoring."""
        return evaluate_detector(model, loader)

    def metadata(self) -> Dict[str, Any]:
        train, _ = self.datasets()
        return {
            'task': 'detection',
            **self.model_config(),
            'class_names': train.class_names,
            'cat_ids': train.cat_ids,
            'num_classes': len(train.class_names) + 1,
        }


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader: DataLoader) -> Dict[str, float]:
    """COCO bbox (and segm for Mask R-CNN) metrics of ``model`` (in eval mode) on a ``CocoDetection`` ``loader``.

    Runs in float32 even under the engine's autocast: box coordinates in bfloat16 lose whole pixels.
    """
    dataset: CocoDetection = loader.dataset
    iou_types = ('bbox', 'segm') if model.roi_heads.has_mask() else ('bbox',)
    evaluator = DetectionEvaluator(dataset.coco_dict(), dataset.cat_ids, iou_types)
    device = next(model.parameters()).device
    with torch.autocast(device.type, enabled=False):
        for images, targets in loader:
            outputs = model([img.to(device) for img in images])
            evaluator.update([{k: v.cpu() for k, v in o.items()} for o in outputs], targets)
    return evaluator.compute()
