"""Classification data: Fashion-MNIST (the embedded default) and image folders in the ImageNet layout.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (the four idx ``.gz`` files in
``/usr/share/datasets/fashion-mnist``) and is read with NumPy. An image folder is ``<root>/train/<class>/*`` and
``<root>/val/<class>/*``; grey, RGB, RGBA and palette images are converted to the model's channel count (alpha is
composited on white). Files that are not readable images are reported and skipped. Transforms are timm's.
"""

from __future__ import annotations

import gzip
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images import IMAGE_SUFFIXES, check_image, open_image

_log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for sub in ('', 'FashionMNIST/raw', 'raw'):
        for suffix in ('.gz', ''):
            p = folder / sub / (stem + suffix)
            if p.is_file():
                return p
    return None


def find_fashion_mnist(data_dir: Optional[str | Path] = None) -> Path:
    """The folder holding the Fashion-MNIST idx files: ``data_dir`` or the Debian package's folder."""
    folder = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    stems = [stem for pair in FASHION_MNIST_FILES.values() for stem in pair]
    if not all(_find_idx(folder, stem) for stem in stems):
        raise FileNotFoundError(
            f'Fashion-MNIST was not found in {folder}. Install it with `sudo apt-get install dataset-fashion-mnist` '
            '(puts the idx .gz files in /usr/share/datasets/fashion-mnist), or pass --data-dir pointing at a folder '
            'with train-images-idx3-ubyte(.gz) and the other three idx files.'
        )
    return folder


def is_fashion_mnist_dir(folder: str | Path) -> bool:
    return _find_idx(Path(folder), FASHION_MNIST_FILES['train'][0]) is not None


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzip or plain): magic (0, 0, dtype 0x08, ndim), big-endian int32 dims, uint8 data."""
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f'{path} is not a uint8 idx file (bad magic number): reinstall dataset-fashion-mnist.')
    ndim = data[3]
    dims = np.frombuffer(data, dtype='>i4', count=ndim, offset=4)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f'{path} is truncated ({len(data)} bytes, {expected} expected): reinstall the dataset.')
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


class FashionMNIST(Dataset):
    """Fashion-MNIST split ('train': 60k, 'test': 10k) of the folder ``root`` (default: the Debian package's) as PIL
    'L' images through ``transform``."""

    classes = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']

    def __init__(self, root: Optional[str | Path], split: str = 'train', transform: Optional[Callable] = None):
        root = find_fashion_mnist(root)  # raises with the install hint
        images, labels = (read_idx(_find_idx(root, stem)) for stem in FASHION_MNIST_FILES[split])
        self.images, self.labels = images, labels.astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f'{root}: {len(self.images)} images but {len(self.labels)} labels in the {split} split.')
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode='L')
        return (self.transform(img) if self.transform else img), int(self.labels[i])

    def __getitems__(self, indices: List[int]) -> list:
        """A whole batch at once (the DataLoader's batched fetch): one array transform instead of one per image."""
        if not isinstance(self.transform, ArrayTransform):
            return [self[i] for i in indices]
        images = self.transform.batch(self.images[indices])
        return list(zip(images.unbind(0), self.labels[indices].tolist()))


class ArrayTransform:
    """timm's training/eval transform for images already at the model's size, done on uint8 arrays in batches.

    Horizontal flip, ``ToTensor``, ``Normalize`` and random erasing (timm's ``RandomErasing``, pixel mode): exactly
    what timm's ``create_transform`` does when its crop is the whole image (``scale`` and ``ratio`` ``(1, 1)``,
    ``crop_pct`` 1) and no other augmentation is on, without the per-image PIL round trips, which took about 30 % of
    a Fashion-MNIST training step on 2 CPU cores.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], hflip: float = 0.0, reprob: float = 0.0):
        from timm.data.random_erasing import RandomErasing

        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.hflip = hflip
        self.erase = RandomErasing(reprob, mode='pixel', max_count=1, device='cpu') if reprob > 0 else None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.batch(np.asarray(img)[None])[0]

    def batch(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W) or (N, H, W, C) -> float (N, C, H, W), each image augmented on its own draws."""
        x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        if self.hflip:
            flip = torch.rand(len(x)) < self.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = (x - self.mean) / self.std
        return self.erase(x) if self.erase is not None else x


@dataclass
class FolderSplit:
    samples: List[Tuple[Path, int]]
    classes: List[str]
    bad: List[Tuple[Path, str]] = field(default_factory=list)


def scan_folder(
    root: Path, classes: Optional[Sequence[str]] = None, verify: bool = True, log: bool = False
) -> FolderSplit:
    """List ``root/<class>/*`` images. With ``classes`` (the train classes), a class unknown to them is an error.

    Unreadable files are collected in ``bad`` and skipped (with ``log``: logged with their count); an empty class is
    an error naming it.
    """
    if not root.is_dir():
        raise ValueError(f'{root} is not a folder: the image-folder layout is <data-dir>/train/<class>/*.')
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not found:
        raise ValueError(f'{root} has no class sub-folders: put the images in {root}/<class name>/.')
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f'{root} has classes {unknown} that the training split does not have; every validation class must '
                'also exist under train/ (rename or remove those folders).'
            )
    names = list(classes) if classes is not None else found
    index = {c: i for i, c in enumerate(names)}
    files = [
        (p, index[c])
        for c in found
        for p in sorted((root / c).rglob('*'))
        if p.is_file() and not p.name.startswith('.')
    ]
    candidates = [(p, y) for p, y in files if p.suffix.lower() in IMAGE_SUFFIXES]
    bad = [(p, 'not an image file extension') for p, y in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if verify:
        with ThreadPoolExecutor(max_workers=8) as pool:
            reasons = list(pool.map(check_image, [p for p, _ in candidates]))
        bad += [(p, r) for (p, _), r in zip(candidates, reasons) if r is not None]
        candidates = [s for s, r in zip(candidates, reasons) if r is None]
    counts = np.bincount([y for _, y in candidates], minlength=len(names))
    empty = [c for c in found if counts[index[c]] == 0]
    if empty:
        raise ValueError(f'{root}: class folder(s) {empty} hold no readable image; add images or remove the folder(s).')
    if log and bad:
        lines = ''.join(f'\n  {path}: {reason}' for path, reason in bad)
        _log.warning('%s: skipped %d unreadable or non-image file(s):%s', root.name, len(bad), lines)
    return FolderSplit(candidates, names, bad)


class ImageFolderDataset(Dataset):
    """Samples from ``scan_folder``; a file that fails to decode at load time is reported and replaced by the next
    readable sample (so an epoch never stops on one bad file)."""

    def __init__(self, split: FolderSplit, in_chans: int, transform: Optional[Callable] = None):
        self.samples, self.classes, self.in_chans, self.transform = split.samples, split.classes, in_chans, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        for k in range(len(self.samples)):
            j = (i + k) % len(self.samples)
            try:
                img = open_image(self.samples[j][0], self.in_chans)
            except (OSError, ValueError) as err:  # open_image turns PIL's SyntaxError into an OSError
                _log.warning('skipping unreadable image %s (%s)', self.samples[j][0], err)
                continue
            return (self.transform(img) if self.transform else img), self.samples[j][1]
        raise RuntimeError('no readable image left in the dataset')
