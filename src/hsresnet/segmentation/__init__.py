"""Semantic segmentation with HS-ResNet: DeepLabV3+ builders, Cityscapes / mask-folder data, mIoU metrics, the
``hsresnet segment`` command (see docs/segmentation.md)."""

from .data import (
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    CityscapesSegmentation,
    MaskFolderSegmentation,
    SegmentationTransform,
    build_dataset,
)
from .metrics import SegmentationMetrics
from .models import deeplabv3plus, deeplabv3plus_hs_resnet50, load_backbone_checkpoint

__all__ = [
    'CITYSCAPES_CLASSES',
    'IGNORE_INDEX',
    'CityscapesSegmentation',
    'MaskFolderSegmentation',
    'SegmentationMetrics',
    'SegmentationTransform',
    'build_dataset',
    'deeplabv3plus',
    'deeplabv3plus_hs_resnet50',
    'load_backbone_checkpoint',
]
