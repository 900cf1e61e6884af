"""Build small real datasets from files that Python packages ship: `hsresnet data prepare`.

- ``trees``: aerial RGB images of tree crowns with boxes (Pascal VOC XML), from the ``deepforest==2.1.0`` wheel
  (MIT licence, NEON data). Converted to COCO JSON, tiled, split into train/val.
- ``nuclei``: a fluorescence image of cell nuclei with 125 instance masks (a label-map TIFF), from the
  ``stardist==0.9.2`` wheel (BSD-3). Tiled into COCO instance JSON (RLE masks) and, with the same tiles and
  split, a 2-class semantic dataset ``nuclei_semantic`` (image + mask PNG folders; 0 background, 1 nucleus).

The wheels are fetched with ``pip download --no-deps`` (never imported) into a cache, and only their data files
are read. Every source file is checked against its sha256, tiles and splits are seeded, and a finished dataset
(its ``prepared.json`` records the sources and settings) is not rebuilt unless the settings change or ``--force``.
The layout is documented in docs/detection.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from .engine.config import int_at_least

_YELL1 = 'deepforest/data/2019_YELL_2_541000_4977000_image_crop'
_YELL2 = 'deepforest/data/2019_YELL_2_528000_4978000_image_crop2'
# package -> (pip requirement, extra pip args, {data file in the wheel: sha256})
SOURCES: Dict[str, Tuple[str, Tuple[str, ...], Dict[str, str]]] = {
    'deepforest': (
        'deepforest==2.1.0',
        (),
        {
            'deepforest/data/OSBS_029.png': 'd9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee',
            'deepforest/data/OSBS_029.xml': '1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c',
            'deepforest/data/SOAP_061.png': '256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424',
            'deepforest/data/SOAP_061.xml': '4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c',
            f'{_YELL1}.png': '178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131',
            f'{_YELL1}.xml': 'cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631',
            f'{_YELL2}.png': 'a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767',
            f'{_YELL2}.xml': 'bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11',
        },
    ),
    'stardist': (
        'stardist==0.9.2',
        # a compiled package: ask for one fixed binary wheel, so every platform reads the same bytes
        ('--platform', 'manylinux_2_28_x86_64', '--python-version', '3.11', '--implementation', 'cp', '--abi', 'cp311'),
        {
            'stardist/data/images/img2d.tif': 'f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750',
            'stardist/data/images/mask2d.tif': '59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f',
        },
    ),
}
DEFAULT_CACHE = Path.home() / '.cache' / 'hsresnet' / 'wheels'
MANIFEST = 'prepared.json'


def fetch_wheel(package: str, cache_dir: Path) -> Path:
    """The wheel of ``SOURCES[package]`` in ``cache_dir``, downloaded by ``pip download`` if not there yet."""
    requirement, extra, _files = SOURCES[package]
    name, version = requirement.split('==')
    cached = sorted(cache_dir.glob(f'{name}-{version}-*.whl'))
    if cached:
        print(f'  using cached wheel {cached[0]}')
        return cached[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        '-m',
        'pip',
        'download',
        '-vv',
        '--no-deps',
        '--only-binary=:all:',
        *extra,
        requirement,
        '-d',
        str(cache_dir),
    ]
    print(f'  downloading {requirement} (pip download --no-deps, not installed, not imported) ...')
    proc = subprocess.run(cmd, capture_output=True, text=True)
    cached = sorted(cache_dir.glob(f'{name}-{version}-*.whl'))
    if proc.returncode != 0 or not cached:
        tail = '\n'.join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(
            f'could not download {requirement} with pip (is a package index reachable? offline, run '
            f'`pip download --no-deps {" ".join(extra)} {requirement} -d {cache_dir}` on a machine that has one and '
            f'copy the wheel into {cache_dir}). pip said:\n{tail}'
        )
    links = re.findall(rf'Found link (\S*/{re.escape(cached[0].name)})', proc.stdout)
    source = links[0] if links else ' '.join(re.findall(r'Looking in indexes: (.*)', proc.stdout)[:1]) or 'pip'
    print(f'  fetched {cached[0].name} from {source}')
    return cached[0]


def read_wheel_files(package: str, cache_dir: Path) -> Dict[str, bytes]:
    """The data files of ``SOURCES[package]`` read from its wheel, each checked against its sha256. A cached wheel
    that is damaged (truncated download, other bytes) is removed and fetched once more."""
    for _ in range(2):
        wheel = fetch_wheel(package, cache_dir)
        try:
            return _read_members(package, wheel)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
            wheel.unlink(missing_ok=True)
            problem = err
            print(f'  the wheel {wheel} is damaged ({err}): removed')
    raise RuntimeError(f'{wheel.name} was damaged again after a fresh download ({problem}); check the package index.')


def _read_members(package: str, wheel: Path) -> Dict[str, bytes]:
    files = {}
    with zipfile.ZipFile(wheel) as zf:
        for member, digest in SOURCES[package][2].items():
            try:
                data = zf.read(member)
            except KeyError:
                raise ValueError(f'it has no {member}') from None
            got = hashlib.sha256(data).hexdigest()
            if got != digest:
                raise ValueError(f'{member} has sha256 {got}, expected {digest}')
            files[member] = data
            print(f'  read {member} ({len(data) / 1e6:.2f} MB, sha256 {digest[:12]}...) from {wheel.name}')
    return files


def tile_starts(size: int, tile: int) -> List[int]:
    """Offsets of the fewest ``tile``-long windows that cover ``size`` (evenly spread, edges included)."""
    if size <= tile:
        return [0]
    n = math.ceil(size / tile)
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _split(names: Sequence[str], val_fraction: float, seed: int) -> Dict[str, str]:
    """Seeded train/val assignment of tile names (at least one tile in each split)."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return {name: 'val' if i < n_val else 'train' for i, name in enumerate(order)}


def _needs_build(out: Path, settings: Dict[str, Any], force: bool) -> bool:
    """True if ``out`` must be (re)built; refuses a folder this command did not make."""
    manifest = out / MANIFEST
    if manifest.is_file():
        if not force and json.loads(manifest.read_text()).get('settings') == settings:
            print(f'{out.name}: {out} is already prepared with these settings (pass --force to rebuild)')
            return False
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f'{out} exists and was not made by `hsresnet data prepare` (no {MANIFEST}); pass '
            f'another --root or move it away.'
        )
    return True


def _staging(out: Path) -> Path:
    """An empty folder next to ``out`` to build in, so an interrupted run never leaves half a dataset."""
    work = out.with_name(f'.{out.name}.partial')
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def _publish(work: Path, out: Path, settings: Dict[str, Any], package: str, counts: Dict[str, Any]) -> None:
    """Record the settings and sources in the finished ``work`` folder, then put it in place of ``out`` (made by
    this command, see ``_needs_build``)."""
    requirement, _extra, files = SOURCES[package]
    manifest = {'settings': settings, 'source': {'requirement': requirement, 'files': files}, 'counts': counts}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')
    if out.exists():
        shutil.rmtree(out)
    work.replace(out)


def _write_coco(out: Path, part: str, images: List[Dict], anns: List[Dict], categories: List[Dict], about: str) -> None:
    """One split's COCO JSON, ``out/annotations/instances_<part>.json``."""
    (out / 'annotations').mkdir(exist_ok=True)
    coco = {'info': {'description': about}, 'images': images, 'annotations': anns, 'categories': categories}
    (out / 'annotations' / f'instances_{part}.json').write_text(json.dumps(coco))


def prepare_trees(
    root: Path,
    cache_dir: Path,
    tile: int = 400,
    val_fraction: float = 0.25,
    seed: int = 0,
    keep_classes: bool = False,
    min_visible: float = 0.5,
    force: bool = False,
) -> Path:
    """Tree crowns: the four deepforest images with VOC boxes -> tiled COCO detection, ``root/trees``."""
    from .detection.datasets import voc_to_coco

    final = root / 'trees'
    settings = dict(tile=tile, val_fraction=val_fraction, seed=seed, keep_classes=keep_classes, min_visible=min_visible)
    if not _needs_build(final, settings, force):
        return final
    print(f'trees: aerial RGB tree crowns (NEON, MIT) from the deepforest wheel -> {final}')
    out = _staging(final)
    files = read_wheel_files('deepforest', cache_dir)
    src = out / '_source'
    src.mkdir()
    for member, data in files.items():
        (src / Path(member).name).write_bytes(data)
    coco = voc_to_coco(sorted(src.glob('*.xml')), src)
    if not keep_classes:  # Dead / Alive (one image) are tree crowns too: one class trains better on 4 images
        for ann in coco['annotations']:
            ann['category_id'] = 1
        coco['categories'] = [{'id': 1, 'name': 'tree'}]
    tiles: Dict[str, Tuple[Image.Image, List[Dict[str, Any]]]] = {}
    for img in coco['images']:
        image = Image.open(src / img['file_name']).convert('RGB')
        anns = [a for a in coco['annotations'] if a['image_id'] == img['id']]
        for y in tile_starts(img['height'], tile):
            for x in tile_starts(img['width'], tile):
                w, h = min(tile, img['width']), min(tile, img['height'])
                kept = []
                for a in anns:
                    bx, by, bw, bh = a['bbox']
                    x1, y1 = max(bx, x), max(by, y)
                    x2, y2 = min(bx + bw, x + w), min(by + bh, y + h)
                    if x2 > x1 and y2 > y1 and (x2 - x1) * (y2 - y1) >= min_visible * bw * bh:
                        kept.append(
                            {
                                'category_id': a['category_id'],
                                'bbox': [x1 - x, y1 - y, x2 - x1, y2 - y1],
                                'iscrowd': a['iscrowd'],
                            }
                        )
                tiles[f'{Path(img["file_name"]).stem}_y{y}_x{x}.png'] = (image.crop((x, y, x + w, y + h)), kept)
    shutil.rmtree(src)
    split = _split(list(tiles), val_fraction, seed)
    counts = {}
    for part in ('train', 'val'):
        (out / part).mkdir()
        images, anns = [], []
        for name in sorted(n for n in tiles if split[n] == part):
            crop, kept = tiles[name]
            crop.save(out / part / name)
            images.append({'id': len(images) + 1, 'file_name': name, 'width': crop.width, 'height': crop.height})
            for a in kept:
                anns.append(dict(a, id=len(anns) + 1, image_id=len(images), area=a['bbox'][2] * a['bbox'][3]))
        _write_coco(
            out, part, images, anns, coco['categories'], f'deepforest==2.1.0 tree crowns, {tile}px tiles, {part}'
        )
        counts[part] = {'images': len(images), 'boxes': len(anns)}
        print(f'  {part}: {len(images)} tiles, {len(anns)} boxes')
    _publish(out, final, settings, 'deepforest', counts)
    return final


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Percentile (1, 99.8) contrast stretch of a microscopy image to uint8, as stardist normalizes its inputs."""
    lo, hi = np.percentile(image, (1, 99.8))
    return (np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)


def prepare_nuclei(
    root: Path,
    cache_dir: Path,
    tile: int = 128,
    val_fraction: float = 0.25,
    seed: int = 0,
    min_pixels: int = 8,
    force: bool = False,
) -> Path:
    """Nuclei: stardist's img2d/mask2d -> tiled COCO instances ``root/nuclei`` and 2-class ``root/nuclei_semantic``.

    A nucleus cut by a tile border keeps its visible part if that has at least ``min_pixels`` pixels.
    """
    from faster_coco_eval.core import mask as mask_utils

    final, final_sem = root / 'nuclei', root / 'nuclei_semantic'
    settings = dict(tile=tile, val_fraction=val_fraction, seed=seed, min_pixels=min_pixels)
    if not any([_needs_build(folder, settings, force) for folder in (final, final_sem)]):  # both checked
        return final
    print(
        f'nuclei: fluorescence nuclei with instance masks (stardist, BSD-3) from the stardist wheel -> {final}, '
        f'{final_sem}'
    )
    out, sem = _staging(final), _staging(final_sem)
    files = read_wheel_files('stardist', cache_dir)
    image = np.asarray(Image.open(io.BytesIO(files['stardist/data/images/img2d.tif'])))
    labels = np.asarray(Image.open(io.BytesIO(files['stardist/data/images/mask2d.tif'])))
    if image.shape != labels.shape:
        raise RuntimeError(f'stardist img2d.tif {image.shape} and mask2d.tif {labels.shape} differ in size.')
    rgb = np.repeat(_to_uint8(image)[:, :, None], 3, axis=2)
    print(f'  {len(np.unique(labels)) - 1} nuclei in a {image.shape[1]}x{image.shape[0]} {image.dtype} image')
    tiles = {}
    for y in tile_starts(image.shape[0], tile):
        for x in tile_starts(image.shape[1], tile):
            tiles[f'img2d_y{y}_x{x}.png'] = (slice(y, y + tile), slice(x, x + tile))
    split = _split(list(tiles), val_fraction, seed)
    categories = [{'id': 1, 'name': 'nucleus'}]
    counts = {}
    for part in ('train', 'val'):
        for d in (out / part, sem / part / 'images', sem / part / 'masks'):
            d.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for name in sorted(n for n in tiles if split[n] == part):
            crop, lab = rgb[tiles[name]], labels[tiles[name]]
            Image.fromarray(crop).save(out / part / name)
            Image.fromarray(crop).save(sem / part / 'images' / name)
            Image.fromarray((lab > 0).astype(np.uint8)).save(sem / part / 'masks' / name)
            images.append({'id': len(images) + 1, 'file_name': name, 'width': crop.shape[1], 'height': crop.shape[0]})
            for inst in np.unique(lab[lab > 0]):
                m = (lab == inst).astype(np.uint8)
                if m.sum() < min_pixels:
                    continue
                rle = mask_utils.encode(np.asfortranarray(m))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                rle['counts'] = rle['counts'].decode('ascii')
                anns.append(
                    {
                        'id': len(anns) + 1,
                        'image_id': len(images),
                        'category_id': 1,
                        'bbox': [x, y, w, h],
                        'area': float(m.sum()),
                        'segmentation': rle,
                        'iscrowd': 0,
                    }
                )
        _write_coco(out, part, images, anns, categories, f'stardist==0.9.2 img2d nuclei, {tile}px tiles, {part}')
        counts[part] = {'images': len(images), 'instances': len(anns)}
        print(f'  {part}: {len(images)} tiles, {len(anns)} nucleus instances')
    (sem / 'classes.json').write_text(json.dumps({'classes': ['background', 'nucleus'], 'ignore_index': 255}) + '\n')
    _publish(out, final, settings, 'stardist', counts)
    _publish(sem, final_sem, settings, 'stardist', {p: {'images': c['images']} for p, c in counts.items()})
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION', required=True)
    p = sub.add_parser(
        'prepare',
        help='build the small real datasets (trees, nuclei, nuclei_semantic)',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument('--root', type=Path, default=Path('data'), help='output folder (default: ./data)')
    p.add_argument(
        '--datasets',
        nargs='+',
        choices=('trees', 'nuclei'),
        default=['trees', 'nuclei'],
        help='which to build (nuclei also builds nuclei_semantic)',
    )
    p.add_argument('--cache-dir', type=Path, default=DEFAULT_CACHE, help=f'wheel cache (default: {DEFAULT_CACHE})')
    p.add_argument('--tree-tile', type=int_at_least(32), default=400, help='tree tile size in pixels (default: 400)')
    p.add_argument(
        '--nuclei-tile', type=int_at_least(32), default=128, help='nuclei tile size in pixels (default: 128)'
    )
    p.add_argument('--val-fraction', type=float, default=0.25, help='share of tiles in val (default: 0.25)')
    p.add_argument('--seed', type=int, default=0, help='seed of the train/val split (default: 0)')
    p.add_argument(
        '--keep-tree-classes',
        action='store_true',
        help="keep deepforest's Tree/Dead/Alive classes instead of one 'tree' class",
    )
    p.add_argument('--force', action='store_true', help='rebuild even if already prepared with these settings')


def run(args: argparse.Namespace) -> int:
    if not 0 < args.val_fraction < 1:
        raise ValueError(f'--val-fraction={args.val_fraction} must be between 0 and 1 (e.g. 0.25).')
    common = dict(val_fraction=args.val_fraction, seed=args.seed, force=args.force)
    try:
        if 'trees' in args.datasets:
            prepare_trees(args.root, args.cache_dir, args.tree_tile, keep_classes=args.keep_tree_classes, **common)
        if 'nuclei' in args.datasets:
            prepare_nuclei(args.root, args.cache_dir, args.nuclei_tile, **common)
    except RuntimeError as err:  # a download that failed, with the command to run elsewhere
        raise ValueError(str(err)) from None
    print(f'done: layout in docs/detection.md; train with e.g. `hsresnet detect train --data {args.root}/trees`')
    return 0
