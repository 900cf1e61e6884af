"""The semantic segmentation task for the shared engine (contract in ``hsresnet/engine/task.py``): data,
DeepLabV3+, loss and mIoU."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..dense import make_loaders
from .data import IGNORE_INDEX, SegmentationTransform, build_dataset, pad_collate
from .metrics import SegmentationMetrics
from .models import backbone_mean_std, deeplabv3plus, predict_logits

# config keys that define the model (saved in the checkpoint header, so eval/predict rebuild the same model)
MODEL_KEYS = ('model', 'backbone', 'backbone_kwargs', 'output_stride', 'frozen_bn', 'num_classes', 'class_names')


def resolve_backbone(model: Optional[str], backbone: Optional[str]) -> str:
    """The encoder of ``--model deeplabv3plus --backbone B`` or of the named builder ``--model deeplabv3plus_B``."""
    model = model or 'deeplabv3plus'
    if model.startswith('deeplabv3plus_'):
        return model.removeprefix('deeplabv3plus_')
    if model != 'deeplabv3plus':
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
        self._datasets: Optional[Tuple[Dataset, Dataset]] = None

    def _backbone(self) -> str:
        return resolve_backbone(self.cfg.model, self.cfg.backbone)

    def datasets(self) -> Tuple[Dataset, Dataset]:
        """(train, val) datasets of ``--data``; val takes the class count of train."""
        cfg = self.cfg
        if self._datasets is None:
            if not cfg.data:
                raise ValueError('no data: pass --data DIR (a Cityscapes root or an image + mask-PNG folder).')
            mean, std = backbone_mean_std(self._backbone())
            augment = SegmentationTransform(mean, std, True, cfg.crop_size, tuple(cfg.scale_range), cfg.hflip)
            train = build_dataset(cfg.data, cfg.train_split, augment, cfg.num_classes)
            val = build_dataset(cfg.data, cfg.val_split, SegmentationTransform(mean, std), train.num_classes)
            self._datasets = (train, val)
        return self._datasets

    @property
    def class_names(self) -> List[str]:
        return list(self.datasets()[0].classes)

    def model_config(self) -> Dict[str, Any]:
        config = {k: getattr(self.cfg, k, None) for k in MODEL_KEYS}
        config.update(backbone=self._backbone(), num_classes=len(self.class_names), class_names=self.class_names)
        return config

    def build_model(self) -> nn.Module:
        config = {**self.model_config(), 'trainable_layers': self.cfg.trainable_layers}
        return build_segmentation_model(config, self.cfg.backbone_checkpoint)

    def build_loaders(self, info: Any) -> Tuple[DataLoader, DataLoader]:
        return make_loaders(self.cfg, *self.datasets(), info, pad_collate)

    def training_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]:
        """Pixel-wise cross-entropy over the labelled pixels (ignore 255), the DeepLabV3+ training loss."""
        images, masks = batch
        return {'loss': F.cross_entropy(model(images).float(), masks, ignore_index=IGNORE_INDEX)}

    def evaluate(self, model: nn.Module, loader: DataLoader) -> Dict[str, float]:
        return evaluate_segmentation(model, loader, self.class_names)

    def metadata(self) -> Dict[str, Any]:
        return {'task': 'segmentation', **self.model_config()}


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, class_names: Sequence[str]) -> Dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU of ``model`` over ``loader`` (summed over DDP ranks by torchmetrics)."""
    device = next(model.parameters()).device
    metric = SegmentationMetrics(len(class_names), class_names).to(device)
    for images, masks in loader:
        metric.update(predict_logits(model, images.to(device)), masks.to(device))
    return metric.compute()
