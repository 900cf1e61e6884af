"""Semantic segmentation data: the Cityscapes layout, a plain image + mask-PNG folder, and joint transforms.

Every sample is ``(image, mask)``: an ``(3, H, W)`` float tensor normalised with the backbone's mean/std and an
``(H, W)`` int64 tensor of class ids, where ``IGNORE_INDEX`` (255) marks pixels that count in no loss or metric.
"""

from __future__ import annotations

import json
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from ..images import IMAGE_SUFFIXES, check_image, open_image

_log = logging.getLogger(__name__)


IGNORE_INDEX = 255

# The 19 evaluation classes of Cityscapes (train ids 0-18) and their colours, from the public dataset definition.
CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign', 'vegetation',
    'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle',
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
# gtFine label id -> train id for the 19 evaluated classes; every other id (void, rare classes) -> IGNORE_INDEX.
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

_LABEL_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
    _LABEL_LUT[_label_id] = _train_id

Sample = Tuple[torch.Tensor, torch.Tensor]
PairTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], Sample]


def _read_pair(image_path: Path, mask_path: Path) -> Tuple[tv_tensors.Image, np.ndarray]:
    """Read an image as RGB uint8 and its single-channel mask; refuse a mask whose size differs from the image."""
    image = open_image(image_path)
    with Image.open(mask_path) as m:
        if m.mode not in ('L', 'P', 'I', 'I;16', '1'):
            raise ValueError(
                f'Mask {mask_path} has mode {m.mode!r}; a mask must be a single-channel PNG of class ids '
                f'(0..C-1, {IGNORE_INDEX} = ignore), not a colour image.'
            )
        mask = np.array(m)
    if mask.shape != (image.height, image.width):
        raise ValueError(
            f'Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is '
            f'{image.width}x{image.height}: a mask must have exactly the size of its image.'
        )
    if mask.max(initial=0) > IGNORE_INDEX:
        raise ValueError(f'Mask {mask_path} holds value {int(mask.max())} > {IGNORE_INDEX}; class ids must be 0..255.')
    return tv_tensors.Image(pil_to_tensor(image)), mask.astype(np.uint8)


class _PairDataset(Dataset):
    """Shared sample logic: (image, mask) paths, Cityscapes label ids mapped to train ids for the pairs flagged in
    ``mapped``, a joint transform."""

    def __init__(
        self,
        pairs: List[Tuple[Path, Path]],
        num_classes: int,
        transform: Optional[PairTransform] = None,
        mapped: Optional[List[bool]] = None,
    ):
        mapped = mapped or [False] * len(pairs)
        with ThreadPoolExecutor(max_workers=8) as pool:  # PIL's checks release the GIL while they decompress
            reasons = list(pool.map(lambda pair: check_image(pair[0]) or check_image(pair[1]), pairs))
        self.bad = [(pair, reason) for pair, reason in zip(pairs, reasons) if reason is not None]
        for (image, mask), reason in self.bad:
            _log.warning('skipping the unreadable pair %s / %s (%s)', image, mask, reason)
        if len(self.bad) == len(pairs):
            raise ValueError(f'none of the {len(pairs)} image/mask pairs can be read (first: {self.bad[0][1]}).')
        keep = [reason is None for reason in reasons]
        self.pairs = [p for p, ok in zip(pairs, keep) if ok]
        self.mapped = [m for m, ok in zip(mapped, keep) if ok]
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        """The pair at ``index``; one that fails to decode now (damaged after the check) is reported and replaced by
        the next readable pair, so an epoch never stops on one bad file."""
        for k in range(len(self.pairs)):
            try:
                return self._sample((index + k) % len(self.pairs))
            except OSError as err:
                _log.warning('skipping unreadable %s (%s)', self.pairs[(index + k) % len(self.pairs)], err)
        raise ValueError('no readable image/mask pair left in the dataset')

    def _sample(self, index: int) -> Sample:
        image_path, mask_path = self.pairs[index]
        image, mask = _read_pair(image_path, mask_path)
        if self.mapped[index]:
            mask = _LABEL_LUT[mask]
        bad = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f'Mask {mask_path} holds class id {int(mask[bad].max())} but the dataset has {self.num_classes} '
                f'classes (ids 0..{self.num_classes - 1}, {IGNORE_INDEX} = ignore): fix the mask or --num-classes.'
            )
        mask_t = tv_tensors.Mask(torch.from_numpy(mask))
        if self.transform is not None:
            return self.transform(image, mask_t)
        return image.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor).long()


class CityscapesSegmentation(_PairDataset):
    """Cityscapes fine annotations in the standard layout, with the 19 train ids and ignore 255.

    ``<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` pairs with
    ``<root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` when that file exists (already train ids),
    else with ``<name>_gtFine_labelIds.png``, mapped through ``CITYSCAPES_LABEL_TO_TRAIN``.
    """

    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, root: str | Path, split: str = 'train', transform: Optional[PairTransform] = None):
        root = Path(root)
        image_dir, label_dir = root / 'leftImg8bit' / split, root / 'gtFine' / split
        images = sorted(image_dir.glob('*/*_leftImg8bit.png'))
        if not images:
            raise FileNotFoundError(
                f'No Cityscapes images found in {image_dir}. Expected the standard layout: '
                f'{root}/leftImg8bit/{split}/<city>/<name>_leftImg8bit.png and '
                f'{root}/gtFine/{split}/<city>/<name>_gtFine_labelIds.png (or _labelTrainIds.png).'
            )
        pairs, mapped = [], []
        for image in images:
            stem = image.name[: -len('_leftImg8bit.png')]
            train_ids = label_dir / image.parent.name / f'{stem}_gtFine_labelTrainIds.png'
            label_ids = label_dir / image.parent.name / f'{stem}_gtFine_labelIds.png'
            if train_ids.is_file():
                pairs.append((image, train_ids))
                mapped.append(False)
            elif label_ids.is_file():
                pairs.append((image, label_ids))
                mapped.append(True)
            else:
                raise FileNotFoundError(
                    f'Cityscapes image {image} has no annotation: expected {label_ids} (or {train_ids.name}).'
                )
        super().__init__(pairs, len(CITYSCAPES_CLASSES), transform, mapped)


def read_class_names(root: str | Path) -> Optional[List[str]]:
    """Class names of a mask folder (index = class id), if it has them: ``<root>/classes.json`` (``{"classes":
    [...]}``, as ``hsresnet data prepare`` writes) or ``<root>/classes.txt`` (one name per line)."""
    root = Path(root)
    if (root / 'classes.json').is_file():
        path = root / 'classes.json'
        try:
            names = json.loads(path.read_text()).get('classes')
        except (json.JSONDecodeError, AttributeError):
            names = None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f'{path} is malformed: write {{"classes": ["background", ...]}} (index = class id).')
        return names
    path = root / 'classes.txt'
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f'{path} is empty: write one class name per line (line 1 = class id 0).')
    return names


class MaskFolderSegmentation(_PairDataset):
    """A plain folder: ``<root>/<split>/images/<name>.<png|jpg|tif...>`` and ``<root>/<split>/masks/<name>.png``.

    Masks are single-channel PNGs of class ids ``0..C-1`` with 255 = ignore. ``C`` comes from ``num_classes`` or
    from the class names in ``<root>/classes.json`` or ``<root>/classes.txt`` (see ``read_class_names``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = 'train',
        transform: Optional[PairTransform] = None,
        num_classes: Optional[int] = None,
    ):
        root = Path(root)
        image_dir, mask_dir = root / split / 'images', root / split / 'masks'
        images = sorted(p for p in image_dir.glob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(
                f'No images found in {image_dir}. Expected an image + mask folder: {root}/{split}/images/<name>.png '
                f'(or .jpg/.tif) and {root}/{split}/masks/<name>.png (class ids, 255 = ignore), optionally '
                f'{root}/classes.json; or a Cityscapes root (leftImg8bit/, gtFine/).'
            )
        pairs = []
        for image in images:
            mask = mask_dir / f'{image.stem}.png'
            if not mask.is_file():
                raise FileNotFoundError(f'Image {image} has no mask: expected {mask}.')
            pairs.append((image, mask))
        self.classes = read_class_names(root)
        if num_classes is None:
            if self.classes is None:
                raise ValueError(
                    f'{root} has no classes.json or classes.txt: pass the number of classes (--num-classes).'
                )
            num_classes = len(self.classes)
        if self.classes is None:
            self.classes = [f'class_{i}' for i in range(num_classes)]
        elif len(self.classes) != num_classes:
            raise ValueError(f'{root} names {len(self.classes)} classes but num_classes={num_classes}.')
        super().__init__(pairs, num_classes, transform)


def build_dataset(
    root: str | Path, split: str, transform: Optional[PairTransform] = None, num_classes: Optional[int] = None
) -> _PairDataset:
    """Pick the layout from what ``root`` holds: Cityscapes (``leftImg8bit/`` + ``gtFine/``) or a mask folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f'Dataset root {root} does not exist. Pass a Cityscapes root (leftImg8bit/, gtFine/) or an image + mask '
            f'folder (<split>/images/, <split>/masks/); `hsresnet data prepare` builds the nuclei example.'
        )
    if (root / 'leftImg8bit').is_dir():
        if num_classes not in (None, len(CITYSCAPES_CLASSES)):
            raise ValueError(f'Cityscapes has {len(CITYSCAPES_CLASSES)} train classes, got num_classes={num_classes}.')
        return CityscapesSegmentation(root, split, transform)
    return MaskFolderSegmentation(root, split, transform, num_classes)


class SegmentationTransform:
    """Joint image + mask transform; the mask always moves with the image and is never interpolated.

    Training (``train=True``): random scale in ``scale_range`` (bilinear image, nearest mask), random crop to
    ``crop_size`` padded with 0 / ``IGNORE_INDEX`` where the scaled image is smaller, horizontal flip. Both:
    scale to [0, 1] and normalise with ``mean``/``std``; the mask becomes int64.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        crop_size: int | Tuple[int, int] = 512,
        scale_range: Tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
    ):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f'scale_range={scale_range} must be (min, max) with 0 < min <= max.')
        self.train, self.scale_range = train, scale_range
        size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        augment = [v2.RandomCrop(size, pad_if_needed=True, fill=fill), v2.RandomHorizontalFlip(hflip)]
        self.augment = v2.Compose(augment) if train else None
        self.normalize = v2.Compose(
            [v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=True), v2.Normalize(mean, std)]
        )

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> Sample:
        if self.augment is not None:
            scale = random.uniform(*self.scale_range)
            size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
            image, mask = v2.functional.resize(image, size), v2.functional.resize(mask, size)  # mask: nearest
            image, mask = self.augment(image, mask)
        image, mask = self.normalize(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def pad_collate(batch: Sequence[Sample], multiple: int = 32) -> Sample:
    """Stack samples of different sizes: pad each to the batch's largest size, rounded up to ``multiple``."""
    height = max(img.shape[-2] for img, _ in batch)
    width = max(img.shape[-1] for img, _ in batch)
    height, width = height + (-height) % multiple, width + (-width) % multiple
    images = torch.zeros(len(batch), 3, height, width)
    masks = torch.full((len(batch), height, width), IGNORE_INDEX, dtype=torch.long)
    for i, (img, mask) in enumerate(batch):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks
