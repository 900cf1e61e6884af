"""Detection datasets: COCO-format JSON (boxes, polygon and RLE masks) and Pascal VOC XML.

Both become one ``CocoDetection`` dataset: VOC annotations are converted to a COCO dict first (``voc_to_coco``),
so cleaning, validation and evaluation are written once. A sample is ``(image, target)`` with ``image`` a float
tensor (3, H, W) in [0, 1] and ``target`` the dict torchvision's detectors take: ``boxes`` (N, 4) XYXY pixels,
``labels`` (N,) in 1..K (contiguous, 0 is the background), ``masks`` (N, H, W) uint8 for Mask R-CNN, and
``image_id``.

Bad input is refused with the file's name: malformed JSON or XML, an annotation of an unknown image or category,
a mask (RLE ``size``) or image file whose size differs from the image's entry. Degenerate boxes (zero area, or
outside the image) are dropped and counted in the log; images without annotations stay as negatives unless
``skip_empty``. Crowd regions (``iscrowd``, VOC ``difficult``) are not training targets; evaluation ignores them.
"""

from __future__ import annotations

import copy
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from ..images import IMAGE_SUFFIXES, open_image

log = logging.getLogger(__name__)


def load_coco_json(path: str | Path) -> Dict[str, Any]:
    """Read a COCO annotation file; a file that is not valid COCO JSON is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'COCO annotation file {path} does not exist.')
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not valid JSON ({e}); expected a COCO annotation file.') from None
    missing = [k for k in ('images', 'annotations', 'categories') if not isinstance(data, dict) or k not in data]
    if missing or not all(isinstance(data[k], list) for k in ('images', 'annotations', 'categories')):
        raise ValueError(
            f'{path} is not a COCO annotation file: it needs the lists "images", "annotations" and "categories"'
            + (f' ({", ".join(missing)} missing)' if missing else '')
            + '; an image-info file without "annotations" has nothing to train or evaluate on.'
        )
    return data


def detection_transforms(train: bool, hflip: float = 0.5, vflip: float = 0.0) -> Callable:
    """Random horizontal (and optionally vertical) flips for training, nothing for evaluation; ``v2`` flips the
    boxes and masks with the image. Vertical flips suit top-down images (aerial, microscopy), so they are off by
    default. Resizing is left to the detector (torchvision's ``GeneralizedRCNNTransform``: ``min_size``/``max_size``).
    """
    flips = [(v2.RandomHorizontalFlip, hflip), (v2.RandomVerticalFlip, vflip)]
    steps = [flip(p) for flip, p in flips if train and p > 0]
    return v2.Compose(steps) if steps else v2.Identity()


def _decode_segmentation(segm: Any, height: int, width: int, where: str) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE (of the image's size, checked on loading) -> (H, W) uint8 mask."""
    from faster_coco_eval.core import mask as mask_utils

    if isinstance(segm, dict):
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm.get('counts'), list) else segm
    elif isinstance(segm, list) and segm:
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    else:
        raise ValueError(
            f'{where}: segmentation must be polygons (a list of [x1, y1, x2, y2, ...]) or an RLE dict, '
            f'got {type(segm).__name__}.'
        )
    return mask_utils.decode(rle).astype(np.uint8)


class CocoDetection(Dataset):
    """A COCO-format detection / instance-segmentation dataset.

    Args:
        annotations: path of a COCO JSON file, or the COCO dict itself (e.g. from ``voc_to_coco``).
        image_dir: folder that ``images[i].file_name`` is relative to.
        transforms: ``v2`` transform called as ``transforms(image, target)`` (see ``detection_transforms``).
        masks: decode ``segmentation`` into ``target['masks']`` (Mask R-CNN); then every annotation needs one.
        skip_empty: drop images that have no (valid, non-crowd) annotation instead of keeping them as negatives.
        name: how errors and logs call the source (defaults to the JSON path).
    """

    def __init__(
        self,
        annotations: str | Path | Dict[str, Any],
        image_dir: str | Path,
        transforms: Optional[Callable] = None,
        masks: bool = False,
        skip_empty: bool = False,
        name: Optional[str] = None,
    ):
        if isinstance(annotations, dict):
            data = copy.deepcopy(annotations)
            self.name = name or '<COCO dict>'
        else:
            data = load_coco_json(annotations)
            self.name = name or str(annotations)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.masks = masks
        self.categories = sorted(data['categories'], key=lambda c: c['id'])
        self.cat_ids = [c['id'] for c in self.categories]
        self.class_names = [c['name'] for c in self.categories]
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        for img in data['images']:
            if not isinstance(img, dict) or not all(k in img for k in ('id', 'file_name', 'width', 'height')):
                raise ValueError(f'{self.name}: image entry {img!r} needs "id", "file_name", "width" and "height".')
        self.images: Dict[int, Dict[str, Any]] = {img['id']: img for img in data['images']}
        self.anns: Dict[int, List[Dict[str, Any]]] = {i: [] for i in self.images}
        self.num_dropped = self._clean(data['annotations'])
        if self.num_dropped:
            log.warning('%s: dropped %d degenerate boxes (zero area or outside the image)', self.name, self.num_dropped)
        ids = sorted(self.images)
        if skip_empty:
            ids = [i for i in ids if any(not a.get('iscrowd', 0) for a in self.anns[i])]
            if len(ids) < len(self.images):
                log.info('%s: skipped %d images without annotations', self.name, len(self.images) - len(ids))
        self.ids = ids

    def _clean(self, annotations: Sequence[Dict[str, Any]]) -> int:
        """Check ids, clip boxes to the image, drop degenerate ones; return how many were dropped."""
        dropped = 0
        for ann in annotations:
            where = f'{self.name}: annotation {ann.get("id", "?")}'
            if ann.get('image_id') not in self.images:
                raise ValueError(f'{where} refers to image_id {ann.get("image_id")!r}, which is not in "images".')
            if ann.get('category_id') not in self.cat_to_label:
                raise ValueError(
                    f'{where} has category_id {ann.get("category_id")!r}, which is not in "categories" '
                    f'(known ids: {self.cat_ids}).'
                )
            img = self.images[ann['image_id']]
            bbox = ann.get('bbox')
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(f'{where}: bbox must be [x, y, width, height], got {bbox!r}.')
            x, y, w, h = (float(v) for v in bbox)
            x1, y1 = min(max(x, 0.0), img['width']), min(max(y, 0.0), img['height'])
            x2, y2 = min(max(x + w, 0.0), img['width']), min(max(y + h, 0.0), img['height'])
            if x2 - x1 <= 0 or y2 - y1 <= 0:
                dropped += 1
                continue
            if self.masks and not ann.get('iscrowd', 0) and not ann.get('segmentation'):
                raise ValueError(
                    f'{where} has no segmentation; Mask R-CNN needs instance masks (polygons or RLE) '
                    f'for every annotation.'
                )
            if isinstance(ann.get('segmentation'), dict):  # check the RLE size now, not at epoch 3
                size = list(ann['segmentation'].get('size', []))
                if size != [img['height'], img['width']]:
                    raise ValueError(
                        f'{where}: its RLE mask has size {size} but image {img.get("file_name")} is '
                        f'[{img["height"]}, {img["width"]}] (height, width).'
                    )
            ann = dict(ann, bbox=[x1, y1, x2 - x1, y2 - y1])
            ann.setdefault('area', (x2 - x1) * (y2 - y1))
            ann.setdefault('iscrowd', 0)
            self.anns[ann['image_id']].append(ann)
        return dropped

    def __len__(self) -> int:
        return len(self.ids)

    def coco_dict(self) -> Dict[str, Any]:
        """The cleaned annotations of this dataset's images as a COCO dict (the evaluation ground truth)."""
        return {
            'images': [self.images[i] for i in self.ids],
            'annotations': [a for i in self.ids for a in self.anns[i]],
            'categories': self.categories,
        }

    def load_image(self, image_id: int) -> Image.Image:
        """The RGB image of ``image_id``; a file whose size differs from its entry is an error naming it."""
        info = self.images[image_id]
        path = self.image_dir / info['file_name']
        if not path.is_file():
            raise FileNotFoundError(f'{self.name}: image {path} (image_id {image_id}) does not exist.')
        image = open_image(path)
        if image.size != (info['width'], info['height']):
            raise ValueError(
                f'{self.name}: image {path} is {image.size[0]}x{image.size[1]} but its entry says '
                f'{info["width"]}x{info["height"]} (width x height).'
            )
        return image

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        image = tv_tensors.Image(pil_to_tensor(self.load_image(image_id)))
        height, width = self.images[image_id]['height'], self.images[image_id]['width']
        anns = [a for a in self.anns[image_id] if not a.get('iscrowd', 0)]
        xywh = torch.tensor([a['bbox'] for a in anns], dtype=torch.float64).reshape(-1, 4)
        target: Dict[str, torch.Tensor] = {
            'boxes': tv_tensors.BoundingBoxes(
                box_convert(xywh, 'xywh', 'xyxy').float(), format='XYXY', canvas_size=(height, width)
            ),
            'labels': torch.tensor([self.cat_to_label[a['category_id']] for a in anns], dtype=torch.int64),
            'image_id': torch.tensor(image_id),
        }
        if self.masks:
            masks = [
                _decode_segmentation(a['segmentation'], height, width, f'{self.name}: annotation {a.get("id")}')
                for a in anns
            ]
            target['masks'] = tv_tensors.Mask(
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
            )
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        target = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        return image.as_subclass(torch.Tensor).float().div_(255), target


def collate_fn(batch: Sequence[Tuple[Any, Any]]) -> Tuple[List[Any], List[Any]]:
    """Detection batches are lists (images differ in size; the detector batches them itself)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def _find_image(image_dir: Path, filename: str, xml_path: Path) -> str:
    """The image an XML describes: its ``<filename>``, else a file with the XML's stem and an image suffix."""
    if filename and (image_dir / filename).is_file():
        return filename
    for stem in dict.fromkeys([Path(filename).stem if filename else '', xml_path.stem]):
        for suffix in IMAGE_SUFFIXES:
            if stem and (image_dir / f'{stem}{suffix}').is_file():
                return f'{stem}{suffix}'
    raise FileNotFoundError(
        f'{xml_path}: its image {filename!r} is not in {image_dir} (also tried {xml_path.stem} '
        f'with {", ".join(IMAGE_SUFFIXES)}).'
    )


def voc_to_coco(
    xml_files: Sequence[str | Path], image_dir: str | Path, classes: Optional[Sequence[str]] = None
) -> Dict[str, Any]:
    """Pascal VOC XML files -> a COCO dict (category ids 1..K in ``classes`` order, default sorted names).

    Boxes are taken as ``[xmin, ymin, xmax, ymax]`` pixel corners; ``difficult`` objects become ``iscrowd`` (VOC's
    evaluation ignores them too). A malformed XML, a missing field or an object of a class not in ``classes`` is
    a ``ValueError`` naming the file.
    """
    image_dir = Path(image_dir)
    parsed = []
    for xml_path in map(Path, xml_files):
        try:
            root = ET.parse(xml_path).getroot()
            size = root.find('size')
            width, height = int(size.findtext('width')), int(size.findtext('height'))
            objects = []
            for obj in root.iter('object'):
                box = obj.find('bndbox')
                coords = [float(box.findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
                objects.append((obj.findtext('name', '').strip(), coords, int(obj.findtext('difficult', '0') or 0)))
        except ET.ParseError as e:
            raise ValueError(f'{xml_path} is not valid XML ({e}); expected a Pascal VOC annotation.') from None
        except (AttributeError, TypeError, ValueError):
            raise ValueError(
                f'{xml_path} is not a Pascal VOC annotation: it needs <size><width>/<height> and '
                f'<object><name>/<bndbox> with numeric xmin, ymin, xmax, ymax.'
            ) from None
        parsed.append((xml_path, root.findtext('filename', ''), width, height, objects))
    names = list(classes) if classes is not None else sorted({o[0] for p in parsed for o in p[4]})
    cat_ids = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for image_id, (xml_path, filename, width, height, objects) in enumerate(parsed, start=1):
        images.append(
            {'id': image_id, 'file_name': _find_image(image_dir, filename, xml_path), 'width': width, 'height': height}
        )
        for name, (x1, y1, x2, y2), difficult in objects:
            if name not in cat_ids:
                raise ValueError(f'{xml_path}: object class {name!r} is not one of {names}.')
            annotations.append(
                {
                    'id': len(annotations) + 1,
                    'image_id': image_id,
                    'category_id': cat_ids[name],
                    'bbox': [x1, y1, x2 - x1, y2 - y1],
                    'area': max(0.0, (x2 - x1) * (y2 - y1)),
                    'iscrowd': difficult,
                }
            )
    return {
        'images': images,
        'annotations': annotations,
        'categories': [{'id': i, 'name': n} for n, i in cat_ids.items()],
    }


def voc_dataset(root: str | Path, split: str, classes: Optional[Sequence[str]] = None, **kwargs) -> CocoDetection:
    """A dataset in the standard VOC layout: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``
    (without the list file, every XML of ``Annotations/``)."""
    root = Path(root)
    ann_dir, image_dir = root / 'Annotations', root / 'JPEGImages'
    if not ann_dir.is_dir():
        raise FileNotFoundError(f'{root} is not a Pascal VOC folder: {ann_dir} does not exist.')
    split_file = root / 'ImageSets' / 'Main' / f'{split}.txt'
    if split_file.is_file():
        xml_files = [ann_dir / f'{line.split()[0]}.xml' for line in split_file.read_text().splitlines() if line.strip()]
    else:
        xml_files = sorted(ann_dir.glob('*.xml'))
    if not xml_files:
        raise ValueError(f'{root}: no VOC annotations for split {split!r} (looked at {split_file} and {ann_dir}).')
    return CocoDetection(voc_to_coco(xml_files, image_dir, classes), image_dir, name=f'{root} ({split})', **kwargs)
