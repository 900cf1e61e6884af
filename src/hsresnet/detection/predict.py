"""Run a detector on image files: a JSON of the detections and overlay PNGs (boxes, labels, scores, masks)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..images import open_image, readable
from .evaluation import to_coco_results

# distinct, readable colours (boxes by class, masks by instance)
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]  # fmt: skip


def draw_detections(
    image: torch.Tensor,
    det: Dict[str, torch.Tensor],
    class_names: Sequence[str],
    mask_threshold: float = 0.5,
    alpha: float = 0.45,
    min_side: int = 384,
) -> torch.Tensor:
    """A uint8 (3, H', W') overlay: masks in a colour per instance, boxes in a colour per class with 'name score'.

    Small images are enlarged by an integer factor (nearest neighbour) until the short side is ``min_side`` or more,
    so that labels stay readable on 128-pixel tiles.
    """
    scale = max(1, math.ceil(min_side / min(image.shape[1:])))
    out = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2) if scale > 1 else image
    if 'masks' in det and len(det['masks']):
        masks = det['masks'][:, 0] > mask_threshold
        if scale > 1:
            masks = masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        colors = [PALETTE[i % len(PALETTE)] for i in range(len(masks))]
        out = draw_segmentation_masks(out, masks, alpha=alpha, colors=colors)
    if len(det['boxes']):
        labels = [f'{class_names[int(c) - 1]} {float(s):.2f}' for c, s in zip(det['labels'], det['scores'])]
        colors = [PALETTE[(int(c) - 1) % len(PALETTE)] for c in det['labels']]
        out = draw_bounding_boxes(out, det['boxes'] * scale, labels=labels, colors=colors, width=2)
    return out


@torch.no_grad()
def predict_images(
    model: nn.Module,
    paths: Sequence[Path],
    output: Path,
    class_names: Sequence[str],
    device: torch.device,
    score_thresh: float = 0.5,
) -> Dict[str, Any]:
    """Detect on each image; write ``<output>/<stem>.png`` overlays and ``<output>/predictions.json`` (the records
    and the files skipped as unreadable, which are also returned).

    Detections below ``score_thresh`` are left out of both. Masks are stored as COCO RLE.
    """
    cat_ids = range(1, len(class_names) + 1)  # labels as they are
    output.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    records: List[Dict[str, Any]] = []
    skipped: List[Dict[str, str]] = []
    for path, picture in readable(paths, open_image, skipped):
        image = pil_to_tensor(picture)  # uint8 (3, H, W)
        det = model([image.to(device).float() / 255])[0]
        keep = det['scores'] >= score_thresh
        det = {k: v[keep].cpu() for k, v in det.items()}
        overlay = draw_detections(image, det, class_names)
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(output / f'{path.stem}.png')
        items = []
        for box, result in zip(det['boxes'], to_coco_results([det], [0], cat_ids, masks='masks' in det)):
            item = {
                'label': class_names[result['category_id'] - 1],
                'score': round(result['score'], 4),
                'box_xyxy': [round(float(v), 2) for v in box],
            }
            if 'segmentation' in result:
                item['mask_rle'] = result['segmentation']  # COCO RLE: size and counts
            items.append(item)
        records.append(
            {
                'image': str(path),
                'width': image.shape[2],
                'height': image.shape[1],
                'detections': items,
                'overlay': str(output / f'{path.stem}.png'),
            }
        )
    result = {'classes': list(class_names), 'images': records, 'skipped': skipped}
    (output / 'predictions.json').write_text(json.dumps(result, indent=1) + '\n')
    return result
