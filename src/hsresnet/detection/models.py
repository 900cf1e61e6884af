"""Faster R-CNN + FPN and Mask R-CNN + FPN (torchvision) over any timm ResNet-family backbone.

The paper (arXiv 2010.07621, Sec. 4.2) swaps the ResNet-50 backbone of Faster R-CNN / Mask R-CNN with FPN for
HS-ResNet-50 and keeps everything else. One builder does that here for every backbone (``hs_resnet*`` and the
timm baselines ``resnet50``, ``resnet50d``, ``res2net50_26w_4s``), so comparisons differ only in the backbone:
``BackboneWithFPN`` over the timm model's four stages (reductions 4, 8, 16, 32), torchvision's heads, the
backbone's own ``mean``/``std`` as the detector's ``image_mean``/``image_std``.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..engine.checkpoint import load_backbone_checkpoint
from ..factory import check_model_name, freeze_stages

STAGE_REDUCTIONS = (4, 8, 16, 32)


def _stage_names(model: nn.Module, name: str) -> List[str]:
    """Names of the direct children that end the stages at reductions 4, 8, 16, 32 (timm's ``feature_info``)."""
    info = {f['reduction']: f['module'] for f in getattr(model, 'feature_info', [])}
    names = [info.get(r) for r in STAGE_REDUCTIONS]
    children = dict(model.named_children())
    if any(n is None or n not in children for n in names):
        raise ValueError(
            f'backbone {name!r}: its feature_info {info} does not name four direct child stages at reductions '
            f'{STAGE_REDUCTIONS}; the FPN builder supports timm models of the ResNet family (hs_resnet*, resnet*, '
            f'res2net*, ...). Pick one of those, e.g. --backbone hs_resnet50.'
        )
    return names


def timm_fpn_backbone(
    name: str,
    checkpoint: Optional[str | Path] = None,
    trainable_layers: Optional[int] = None,
    frozen_bn: Optional[bool] = None,
    fpn_channels: int = 256,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[BackboneWithFPN, Dict[str, Any]]:
    """A timm model's four stages + torchvision's FPN (P2-P5 + max-pooled P6), and its pretrained cfg.

    ``trainable_layers`` (0-5) follows torchvision: the last ``k`` stages train, 5 also trains the stem. The
    defaults follow torchvision's rule: with a checkpoint, frozen BN and 3 trainable stages, else trainable BN and 5.
    """
    check_model_name(name, 'backbone')
    trained = checkpoint is not None
    trainable_layers = (3 if trained else 5) if trainable_layers is None else trainable_layers
    frozen_bn = trained if frozen_bn is None else frozen_bn
    model = timm.create_model(name, pretrained=False, **(backbone_kwargs or {}))
    if checkpoint is not None:
        load_backbone_checkpoint(model, checkpoint, name)
    stages = _stage_names(model, name)
    if frozen_bn:
        model = freeze_batch_norm_2d(model)
    freeze_stages(model, stages, trainable_layers)
    channels = {f['module']: f['num_chs'] for f in model.feature_info}
    backbone = BackboneWithFPN(
        model,
        return_layers=OrderedDict((s, str(i)) for i, s in enumerate(stages)),
        in_channels_list=[channels[s] for s in stages],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    return backbone, dict(model.pretrained_cfg)


def build_detector(
    kind: str,
    num_classes: int,
    backbone: str = 'hs_resnet50',
    backbone_checkpoint: Optional[str | Path] = None,
    trainable_layers: Optional[int] = None,
    frozen_bn: Optional[bool] = None,
    fpn_channels: int = 256,
    backbone_kwargs: Optional[Dict[str, Any]] = None,
    box_head_dim: int = 1024,
    mask_head_channels: int = 256,
    **detector_kwargs,
) -> nn.Module:
    """Faster R-CNN (``kind='faster'``) or Mask R-CNN (``kind='mask'``) with FPN over the timm ``backbone``.

    ``num_classes`` counts the background (COCO: 91). ``detector_kwargs`` go to torchvision's ``FasterRCNN`` /
    ``MaskRCNN`` (``min_size``, ``max_size``, ``box_detections_per_img``, ``rpn_*``, ``box_*`` ...).
    ``box_head_dim`` (the two-FC box head's width) and ``mask_head_channels`` (the four-conv mask head's width)
    default to torchvision's 1024 and 256; smaller values make CPU demos affordable.
    """
    if kind not in ('faster', 'mask'):
        raise ValueError(f"kind={kind!r}: choose 'faster' (Faster R-CNN) or 'mask' (Mask R-CNN).")
    if num_classes < 2:
        raise ValueError(f'num_classes={num_classes}: count the background too, so at least 2.')
    body, cfg = timm_fpn_backbone(
        backbone, backbone_checkpoint, trainable_layers, frozen_bn, fpn_channels, backbone_kwargs
    )
    detector_kwargs.setdefault('image_mean', list(cfg.get('mean', (0.485, 0.456, 0.406))))
    detector_kwargs.setdefault('image_std', list(cfg.get('std', (0.229, 0.224, 0.225))))
    # the heads torchvision builds by default, with their widths as parameters
    detector_kwargs.setdefault('box_head', TwoMLPHead(fpn_channels * 7**2, box_head_dim))  # 7x7 RoIAlign
    detector_kwargs.setdefault('box_predictor', FastRCNNPredictor(box_head_dim, num_classes))
    if kind == 'mask':
        detector_kwargs.setdefault('mask_head', MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1))
        detector_kwargs.setdefault(
            'mask_predictor', MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes)
        )
    cls = FasterRCNN if kind == 'faster' else MaskRCNN
    # torchvision passes unknown keywords on to its transform, which ignores them: refuse misspelt ones here
    known = set(inspect.signature(cls).parameters) | set(inspect.signature(GeneralizedRCNNTransform).parameters)
    unknown = sorted(set(detector_kwargs) - known - {'kwargs'})
    if unknown:
        raise ValueError(f'{cls.__name__} does not take {unknown}; see torchvision.models.detection.{cls.__name__}.')
    model = cls(body, num_classes=None, **detector_kwargs)
    model.backbone_name = backbone
    return model


def fasterrcnn_hs_resnet50_fpn(num_classes: int = 91, backbone: str = 'hs_resnet50', **kwargs) -> nn.Module:
    """Faster R-CNN + FPN with an HS-ResNet-50 backbone (paper Table 4); ``backbone=`` swaps in any other."""
    return build_detector('faster', num_classes, backbone, **kwargs)


def maskrcnn_hs_resnet50_fpn(num_classes: int = 91, backbone: str = 'hs_resnet50', **kwargs) -> nn.Module:
    """Mask R-CNN + FPN with an HS-ResNet-50 backbone (paper Table 5); ``backbone=`` swaps in any other."""
    return build_detector('mask', num_classes, backbone, **kwargs)


DETECTORS = {
    'fasterrcnn_hs_resnet50_fpn': fasterrcnn_hs_resnet50_fpn,
    'maskrcnn_hs_resnet50_fpn': maskrcnn_hs_resnet50_fpn,
}


def create_detector(name: str, **kwargs) -> nn.Module:
    """Build a detector of ``DETECTORS`` by name."""
    if name not in DETECTORS:
        raise ValueError(f'unknown detector {name!r}: choose one of {sorted(DETECTORS)}.')
    return DETECTORS[name](**kwargs)
