"""Object detection and instance segmentation on HS-ResNet: Faster R-CNN / Mask R-CNN + FPN (torchvision).

See docs/detection.md. ``hsresnet detect train|eval|predict`` is the command line (``detection.cli``).
"""

from .datasets import CocoDetection, collate_fn, detection_transforms, load_coco_json, voc_dataset, voc_to_coco
from .evaluation import DetectionEvaluator, coco_evaluate, to_coco_results
from .models import (
    DETECTORS,
    build_detector,
    create_detector,
    fasterrcnn_hs_resnet50_fpn,
    load_backbone_checkpoint,
    maskrcnn_hs_resnet50_fpn,
    timm_fpn_backbone,
)

__all__ = [
    'DETECTORS',
    'CocoDetection',
    'DetectionEvaluator',
    'build_detector',
    'coco_evaluate',
    'collate_fn',
    'create_detector',
    'detection_transforms',
    'fasterrcnn_hs_resnet50_fpn',
    'load_backbone_checkpoint',
    'load_coco_json',
    'maskrcnn_hs_resnet50_fpn',
    'timm_fpn_backbone',
    'to_coco_results',
    'voc_dataset',
    'voc_to_coco',
]
