"""DeepLabV3+ (Chen et al., arXiv 1802.02611) over any timm backbone, as in the HS-ResNet paper's Cityscapes runs.

The head is segmentation_models_pytorch's ``DeepLabV3Plus`` and the encoder its timm-universal ``tu-<model>``,
so HS-ResNet and the baselines (``resnet50``, ``resnet50d``, ``res2net50_26w_4s``) get the same head, the same
output stride and the same schedule: comparisons differ only in the backbone. HS-ResNet builds its own dilation
(``output_stride``) at construction, which smp's encoders pass straight to ``timm.create_model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Tuple

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import freeze_batch_norm_2d

import hsresnet  # noqa: F401  (registers the hs_resnet* models into timm)

from ..engine.checkpoint import load_backbone_checkpoint
from ..factory import check_model_name, freeze_stages


def backbone_mean_std(backbone: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Input normalisation (mean, std) from the backbone's timm pretrained config (ImageNet's when it has none)."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    mean = getattr(cfg, 'mean', None) or IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, 'std', None) or IMAGENET_DEFAULT_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def deeplabv3plus(
    backbone: str = 'hs_resnet50',
    num_classes: int = 19,
    output_stride: int = 16,
    checkpoint: Optional[str | Path] = None,
    frozen_bn: bool = False,
    trainable_layers: int = 5,
    decoder_channels: int = 256,
    **backbone_kwargs: Any,
) -> smp.DeepLabV3Plus:
    """DeepLabV3+ with the timm model ``backbone`` as encoder (random init, no download).

    Args:
        backbone: any timm model name with five stages at strides 2-32: a registered ``hs_resnet*`` or a baseline.
        num_classes: output classes (19 for Cityscapes).
        output_stride: 16 (paper default, dilated stage 4) or 8 (dilated stages 3 and 4).
        checkpoint: a classification checkpoint (safetensors, timm keys) loaded into the encoder, strictly.
        frozen_bn: turn the encoder's BatchNorm into ``FrozenBatchNorm2d`` (after loading the checkpoint).
        trainable_layers: 0-5 encoder stages left trainable, counted from ``layer4`` back to the stem, as in
            torchvision's detection builders (5 = all).
        **backbone_kwargs: forwarded to ``timm.create_model`` (``w``, ``s``, ``drop_path_rate`` ...).
    """
    if output_stride not in (8, 16):
        raise ValueError(f'DeepLabV3+: output_stride={output_stride!r} is invalid; choose 16 (default) or 8.')
    check_model_name(backbone, 'backbone')
    if num_classes < 1:
        raise ValueError(f'num_classes={num_classes} must be >= 1.')
    model = smp.DeepLabV3Plus(
        encoder_name=f'tu-{backbone}',
        encoder_weights=None,
        encoder_output_stride=output_stride,
        decoder_channels=decoder_channels,
        classes=num_classes,
        **backbone_kwargs,
    )
    if checkpoint is not None:
        load_backbone_checkpoint(model.encoder.model, checkpoint, backbone)
    if frozen_bn:
        model.encoder.model = freeze_batch_norm_2d(model.encoder.model)
    freeze_stages(model.encoder.model, ('layer1', 'layer2', 'layer3', 'layer4'), trainable_layers)
    model.backbone_name = backbone
    model.mean, model.std = backbone_mean_std(backbone)
    return model


def deeplabv3plus_hs_resnet50(num_classes: int = 19, output_stride: int = 16, **kwargs: Any) -> smp.DeepLabV3Plus:
    """DeepLabV3+ on HS-ResNet-50 (w=18, s=5), output stride 16 by default: the paper's Cityscapes model."""
    return deeplabv3plus('hs_resnet50', num_classes, output_stride, **kwargs)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, C, H, W)`` of normalised images of any size: pads to the encoder's stride, crops back."""
    h, w = images.shape[-2:]
    stride = getattr(getattr(model, 'encoder', None), 'output_stride', 32)
    return model(F.pad(images, (0, (-w) % stride, 0, (-h) % stride)))[..., :h, :w]
