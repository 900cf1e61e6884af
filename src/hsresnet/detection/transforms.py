"""Detection transforms: flips applied to the image, its boxes and its masks together (torchvision ``v2``).

Resizing is not done here: torchvision's ``GeneralizedRCNNTransform`` inside the detector resizes every image to
its ``min_size``/``max_size`` (a tuple of ``min_size`` values picks one at random per training image, the usual
multi-scale training) and maps the predictions back to the original image size.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ['detection_transforms', 'to_tv_tensors']


def detection_transforms(train: bool, hflip: float = 0.5, vflip: float = 0.0) -> Callable:
    """Random horizontal (and optionally vertical) flips for training, nothing for evaluation.

    ``v2`` flips ``tv_tensors.BoundingBoxes`` and ``tv_tensors.Mask`` with the image, so boxes and masks stay
    consistent. Vertical flips suit top-down images (aerial, microscopy), not street scenes, so they are off by
    default.
    """
    if not train:
        return v2.Identity()
    steps = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(v2.RandomVerticalFlip(vflip))
    return v2.Compose(steps) if steps else v2.Identity()


def to_tv_tensors(
    image: torch.Tensor, target: Dict[str, torch.Tensor]
) -> Tuple[tv_tensors.Image, Dict[str, torch.Tensor]]:
    """Wrap an image (C, H, W) and its target's ``boxes`` (XYXY) and ``masks`` so ``v2`` transforms see them."""
    height, width = image.shape[-2:]
    target = dict(target)
    target['boxes'] = tv_tensors.BoundingBoxes(target['boxes'], format='XYXY', canvas_size=(height, width))
    if 'masks' in target:
        target['masks'] = tv_tensors.Mask(target['masks'])
    return tv_tensors.Image(image), target
