"""COCO mean average precision (bbox and segm) through faster-coco-eval, which matches pycocotools exactly.

``DetectionEvaluator`` collects the detector's outputs as COCO results (``image_id``, ``category_id``, ``bbox``
XYWH, ``score``, ``segmentation`` RLE for masks), merges them across DDP ranks (one copy per image, so the
padding of ``DistributedSampler`` is not counted twice) and scores them with ``COCOeval``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Iterable, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torchvision.ops import box_convert

# the 12 numbers of COCOeval.summarize(), in its order
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def _quiet(*args: Any, **kwargs: Any) -> None:
    """Silences faster-coco-eval's progress lines (the metrics are returned, and logged by the engine)."""


def coco_evaluate(gt: Dict[str, Any], results: Sequence[Dict[str, Any]], iou_type: str) -> Dict[str, float]:
    """COCO metrics of ``results`` against the ground-truth dict ``gt`` for ``iou_type`` 'bbox' or 'segm'.

    Returns ``{'AP': ..., 'AP50': ..., ...}`` (fractions in [0, 1]; -1 where COCO has nothing to score, e.g. no
    small objects). No results at all score 0.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(dict(gt, info=gt.get('info', {})), use_deepcopy=True, print_function=_quiet)
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_quiet)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}


def to_coco_results(
    outputs: Iterable[Dict[str, torch.Tensor]],
    image_ids: Iterable[int],
    label_to_cat: Sequence[int],
    masks: bool = False,
    mask_threshold: float = 0.5,
) -> List[Dict[str, Any]]:
    """Detector outputs (``boxes`` XYXY, ``labels`` 1..K, ``scores``, ``masks`` (N, 1, H, W) probabilities) ->
    COCO result dicts; ``label_to_cat[label - 1]`` is the category id."""
    from faster_coco_eval.core import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        xywh = box_convert(out['boxes'].detach().float().cpu(), 'xyxy', 'xywh').tolist()
        labels, scores = out['labels'].tolist(), out['scores'].detach().float().cpu().tolist()
        rles = []
        if masks:
            binary = (out['masks'][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        for i, (box, label, score) in enumerate(zip(xywh, labels, scores)):
            result = {
                'image_id': int(image_id),
                'category_id': int(label_to_cat[label - 1]),
                'bbox': box,
                'score': score,
            }
            if masks:
                rle = dict(rles[i])
                rle['counts'] = rle['counts'].decode('ascii') if isinstance(rle['counts'], bytes) else rle['counts']
                result['segmentation'] = rle
            results.append(result)
    return results


class DetectionEvaluator:
    """Accumulates COCO results batch by batch; ``compute()`` merges ranks and returns the metrics.

    Args:
        gt: the ground-truth COCO dict (``CocoDetection.coco_dict()``).
        label_to_cat: category id of each label 1..K (``CocoDetection.cat_ids``).
        iou_types: ``('bbox',)`` for Faster R-CNN, ``('bbox', 'segm')`` for Mask R-CNN.
    """

    def __init__(self, gt: Dict[str, Any], label_to_cat: Sequence[int], iou_types: Sequence[str] = ('bbox',)):
        self.gt, self.label_to_cat, self.iou_types = gt, list(label_to_cat), tuple(iou_types)
        self.per_image: Dict[int, List[Dict[str, Any]]] = {}

    def update(self, outputs: Sequence[Dict[str, torch.Tensor]], targets: Sequence[Dict[str, torch.Tensor]]) -> None:
        for out, target in zip(outputs, targets):
            image_id = int(target['image_id'])
            self.per_image[image_id] = to_coco_results([out], [image_id], self.label_to_cat, 'segm' in self.iou_types)

    def results(self) -> List[Dict[str, Any]]:
        """All ranks' results, one copy per image (every rank gets them)."""
        per_image = dict(self.per_image)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.per_image)
            per_image = {}
            for part in gathered:
                for image_id, res in part.items():
                    per_image.setdefault(image_id, res)
        return [r for image_id in sorted(per_image) for r in per_image[image_id]]

    def compute(self) -> Dict[str, float]:
        """``{'bbox_AP': ..., 'bbox_AP50': ..., 'segm_AP': ...}`` over every image seen on any rank."""
        results = self.results()
        metrics = {}
        for iou_type in self.iou_types:
            for name, value in coco_evaluate(self.gt, results, iou_type).items():
                metrics[f'{iou_type}_{name}'] = value
        return metrics
