"""Image files shared by the tasks: finding them, checking that they open, skipping those that do not."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

_log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def check_image(path: Path) -> Optional[str]:
    """None when ``path`` opens as an image, else the reason (PIL's header check, without decoding the pixels)."""
    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        return f'{type(err).__name__}: {err}'


def find_images(inputs: Iterable[str | Path]) -> List[Path]:
    """Image files named directly or found (sorted, not recursively) in the folders named."""
    inputs = list(inputs)
    found: List[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f'input {path} does not exist: pass image files or folders of images.')
    if not found:
        raise ValueError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {[str(i) for i in inputs]}.')
    return found


def open_image(path: str | Path, in_chans: int = 3) -> Image.Image:
    """The image at ``path``, decoded and converted by ``to_mode``; a file that does not decode as an image is an
    ``OSError`` saying so (as PIL's own errors are; a truncated or garbled file may raise others)."""
    try:
        with Image.open(path) as img:
            return to_mode(img, in_chans)
    except (OSError, SyntaxError) as err:  # UnidentifiedImageError is an OSError; a truncated file as well
        raise OSError(f'not a readable image ({type(err).__name__}: {err})') from None


def readable(
    paths: Iterable[Path], load: Callable[[Path], Any], skipped: List[Dict[str, str]]
) -> Iterator[Tuple[Path, Any]]:
    """``(path, load(path))`` for every file ``load`` can read; the others are appended to ``skipped`` with the reason
    and logged, so one unreadable file never stops a prediction run."""
    for path in paths:
        try:
            yield path, load(path)
        except (OSError, ValueError, SyntaxError) as err:
            skipped.append({'path': str(path), 'reason': str(err)})
            _log.warning('skipped %s: %s', path, err)


def to_mode(img: Image.Image, in_chans: int = 3) -> Image.Image:
    """Any PIL mode -> 'L' (1 channel) or 'RGB' (3 channels), the one conversion every task uses: 16-bit, 32-bit and
    float grey (microscopy TIFFs) stretched min..max to 0..255, transparency composited over white."""
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float32)
        span = float(arr.max() - arr.min()) or 1.0
        img = Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8), mode='L')
    if img.mode == 'P':
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'LA', 'PA'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert('L' if in_chans == 1 else 'RGB')
