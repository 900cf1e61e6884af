"""Semantic segmentation metrics through torchmetrics: mIoU, per-class IoU and pixel accuracy, ignore 255.

All three come from one ``MulticlassConfusionMatrix``, whose state torchmetrics sums over processes at
``compute()``, so the figures are those of the whole validation set under DDP.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from .data import IGNORE_INDEX


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``TP / (TP + FP + FN)`` from a ``(C, C)`` confusion matrix (rows = truth); NaN for a class
    that is absent from both truth and prediction."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float('nan')))


class SegmentationMetrics(MulticlassConfusionMatrix):
    """Accumulate logits ``(N, C, H, W)`` (or labels ``(N, H, W)``) against masks ``(N, H, W)``.

    ``compute()`` returns ``miou`` (mean over the classes present in truth or prediction, the Cityscapes
    convention), ``pixel_acc`` (correct / labelled pixels) and ``iou_<name>`` per class (NaN for a class absent
    from both); pixels equal to ``ignore_index`` count nowhere.
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None, ignore_index: int = IGNORE_INDEX):
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f'{len(self.class_names)} class names for {num_classes} classes.')

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.argmax(1) if preds.dim() == 4 else preds, target)

    def compute(self) -> Dict[str, float]:
        confusion = super().compute().double()
        iou = iou_from_confusion(confusion)
        total = confusion.sum()
        out = {
            'miou': 0.0 if iou.isnan().all() else float(iou.nanmean()),
            'pixel_acc': float(confusion.diag().sum() / total) if total > 0 else 0.0,
        }
        out.update({f'iou_{name}': float(v) for name, v in zip(self.class_names, iou.tolist())})
        return out
