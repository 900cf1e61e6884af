"""Image inputs shared by the ``predict`` commands of the dense-prediction tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')


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
