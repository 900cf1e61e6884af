"""The semantic segmentation task for the shared engine (``hsresnet.engine``): data, DeepLabV3+, loss and mIoU.

The engine owns the loop, DDP, optimizer, schedule, AMP, EMA, checkpoints and logs; this file only says what the
model trains on and how it is scored (the contract is in ``hsresnet/engine/task.py``).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import IGNORE_INDEX, SegmentationTransform, build_dataset, pad_collate
from .metrics import SegmentationMetrics
from .models import backbone_mean_std, deeplabv3plus, predict_logits

__all__ = ['SegmentationTask', 'MODEL_KEYS', 'build_segmentation_model', 'evaluate_segmentation', 'resolve_backbone']

# config keys that define the model (saved in the checkpoint header, so eval/predict rebuild the same model)
MODEL_KEYS = ('model', 'backbone', 'backbone_kwargs', 'output_stride', 'frozen_bn', 'num_classes', 'class_names')
MODELS = ('deeplabv3plus',)


def resolve_backbone(model: Optional[str], backbone: Optional[str]) -> str:
    """The encoder of ``--model deeplabv3plus --backbone B`` or of the named builder ``--model deeplabv3plus_B``."""
    model = model or 'deeplabv3plus'
    if model.startswith('deeplabv3plus_'):
        return model.removeprefix('deeplabv3plus_')
    if model not in MODELS:
        raise ValueError(
            f'--model {model!r} is unknown: use deeplabv3plus (with --backbone) or deeplabv3plus_<backbone>.'
        )
    return backbone or 'hs_resnet50'


def build_segmentation_model(config: Dict[str, Any], backbone_checkpoint: Optional[str] = None) -> nn.Module:
    """DeepLabV3+ from the model settings (``MODEL_KEYS``) of a config or of a checkpoint header."""
    trainable = config.get('trainable_layers')
    return deeplabv3plus(
        resolve_backbone(config.get('model'), config.get('backbone')),
        num_classes=int(config['num_classes']),
        output_stride=int(config.get('output_stride') or 16),
        checkpoint=backbone_checkpoint,
        frozen_bn=bool(config.get('frozen_bn')),
        trainable_layers=5 if trainable is None else int(trainable),
        **dict(config.get('backbone_kwargs') or {}),
    )


class SegmentationTask:
    """DeepLabV3+ on a Cityscapes or image + mask-PNG dataset; cross-entropy with ignore 255; main metric mIoU."""

    main_metric = 'miou'

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self._datasets = None
        self._class_names: Optional[List[str]] = None

    def _backbone(self) -> str:
        return resolve_backbone(self.cfg.model, self.cfg.backbone)

    def transforms(self, train: bool) -> SegmentationTransform:
        mean, std = backbone_mean_std(self._backbone())
        return SegmentationTransform(
            mean,
            std,
            train,
            crop_size=self.cfg.crop_size,
            scale_range=tuple(self.cfg.scale_range),
            hflip=self.cfg.hflip,
        )

    def datasets(self) -> Tuple[Dataset, Dataset]:
        """(train, val) datasets of ``--data``; val takes the class count of train."""
        if self._datasets is None:
            if not self.cfg.data:
                raise ValueError('no data: pass --data DIR (a Cityscapes root or an image + mask-PNG folder).')
            num_classes = self.cfg.num_classes
            train = build_dataset(self.cfg.data, self.cfg.train_split, self.transforms(True), num_classes)
            val = build_dataset(self.cfg.data, self.cfg.val_split, self.transforms(False), train.num_classes)
            self._datasets = (train, val)
            self._class_names = list(train.classes)
        return self._datasets

    @property
    def class_names(self) -> List[str]:
        self.datasets()
        return list(self._class_names or [])

    def model_config(self) -> Dict[str, Any]:
        config = {k: getattr(self.cfg, k, None) for k in MODEL_KEYS}
        config.update(backbone=self._backbone(), num_classes=len(self.class_names), class_names=self.class_names)
        return config

    def build_model(self) -> nn.Module:
        config = {**self.model_config(), 'trainable_layers': self.cfg.trainable_layers}
        return build_segmentation_model(config, self.cfg.backbone_checkpoint)

    def build_loaders(self, info: Any) -> Tuple[DataLoader, DataLoader]:
        from ..engine.distributed import make_loader

        train, val = self.datasets()
        world = max(1, getattr(info, 'world_size', 1))
        if len(train) < self.cfg.batch_size * world:
            raise ValueError(
                f'the training set has {len(train)} images, fewer than one global batch ({self.cfg.batch_size} per '
                f'process x {world}); lower -b/--batch-size.'
            )
        kw = dict(workers=self.cfg.workers, seed=self.cfg.seed, collate_fn=pad_collate)
        eval_batch = self.cfg.eval_batch_size or self.cfg.batch_size
        train_loader = make_loader(train, self.cfg.batch_size, True, info, **kw)
        return train_loader, make_loader(val, eval_batch, False, info, **kw)

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    def training_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
        """Pixel-wise cross-entropy over the labelled pixels (ignore 255), the DeepLabV3+ training loss."""
        images, masks = _to_device(model, batch)
        logits = model(images)
        return {'loss': F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> Dict[str, float]:
        return evaluate_segmentation(model, loader, self.class_names)

    def metadata(self) -> Dict[str, Any]:
        return {'task': 'segmentation', **self.model_config()}


def _to_device(model: nn.Module, batch: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    images, masks = batch
    return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, class_names: Sequence[str]) -> Dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU of ``model`` over ``loader`` (summed over DDP ranks by torchmetrics)."""
    metric = SegmentationMetrics(len(class_names), class_names).to(next(model.parameters()).device)
    for batch in loader:
        images, masks = _to_device(model, batch)
        metric.update(predict_logits(model, images), masks)
    return metric.compute()
