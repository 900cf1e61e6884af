"""Segmentation predictions a person can look at: overlay PNGs, palette mask PNGs and a JSON of class fractions."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import normalize, pil_to_tensor

from ..images import open_image, readable
from .data import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from .models import predict_logits

BACKGROUND_NAMES = ('background', 'bg', 'void', 'unlabeled')


def palette_for(class_names: Sequence[str]) -> List[Tuple[int, int, int]]:
    """Cityscapes' own colours for its 19 classes, else well-separated hues (background drawn black)."""
    if tuple(class_names) == CITYSCAPES_CLASSES:
        return list(CITYSCAPES_PALETTE)
    colours = []
    for i, name in enumerate(class_names):
        if name.lower() in BACKGROUND_NAMES:
            colours.append((0, 0, 0))
            continue
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)  # golden-ratio hue steps
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def overlay(image: Image.Image, labels: np.ndarray, palette: Sequence[Tuple[int, int, int]], alpha: float = 0.5):
    """The image with each non-background pixel blended with its class colour."""
    rgb = np.asarray(image.convert('RGB'), dtype=np.float32)
    colours = np.asarray(palette, dtype=np.float32)[labels]
    painted = colours.any(axis=-1, keepdims=True)  # background is black in ``palette_for``: left unpainted
    out = np.where(painted, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(out.round().astype(np.uint8))


@torch.no_grad()
def predict_images(
    model: nn.Module,
    paths: Sequence[Path],
    out_dir: str | Path,
    class_names: Sequence[str],
    device: torch.device,
    alpha: float = 0.5,
) -> Dict[str, Any]:
    """Segment each image at full resolution; write ``<stem>_overlay.png`` and ``<stem>_mask.png`` (a palette PNG
    whose pixel values are the class ids) into ``out_dir`` and return the per-image records for the JSON, with the
    files skipped as unreadable. The images are normalised with ``model.mean`` and ``model.std``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    palette = palette_for(class_names)
    flat_palette = [c for colour in palette for c in colour]
    records: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    for path, image in readable(paths, open_image, skipped):
        x = normalize(pil_to_tensor(image).to(device).float() / 255, model.mean, model.std)
        logits = predict_logits(model, x[None])[0]
        probs = logits.float().softmax(0)
        labels = probs.argmax(0)
        counts = torch.bincount(labels.flatten(), minlength=len(class_names)).double() / labels.numel()
        labels_np = labels.cpu().numpy().astype(np.uint8)
        mask = Image.fromarray(labels_np)  # 'L'; putpalette makes it a 'P' image that keeps the ids
        mask.putpalette(flat_palette)
        mask_path, overlay_path = out_dir / f'{path.stem}_mask.png', out_dir / f'{path.stem}_overlay.png'
        mask.save(mask_path)
        overlay(image, labels_np, palette, alpha).save(overlay_path)
        records.append(
            {
                'image': str(path),
                'width': image.width,
                'height': image.height,
                'class_fractions': {name: round(float(f), 6) for name, f in zip(class_names, counts.tolist())},
                'mean_confidence': round(float(probs.max(0).values.mean()), 6),
                'overlay': str(overlay_path),
                'mask': str(mask_path),
            }
        )
    return {'classes': list(class_names), 'images': records, 'skipped': skipped}
