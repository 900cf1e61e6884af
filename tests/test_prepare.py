"""`hsresnet data prepare`: the tree-crown and nuclei datasets built from the deepforest and stardist wheels.

The wheels are fetched once with pip into the user cache (HSRESNET_WHEEL_CACHE overrides it); without a reachable
package index those tests are skipped, and the offline error itself is tested.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsresnet import prepare
from hsresnet.detection import CocoDetection

CACHE = Path(os.environ.get('HSRESNET_WHEEL_CACHE', prepare.DEFAULT_CACHE))


@pytest.fixture(scope='module')
def wheels() -> Path:
    try:
        for package in prepare.SOURCES:
            prepare.fetch_wheel(package, CACHE)
    except RuntimeError as e:
        pytest.skip(f'no package index to fetch the wheels from: {e}')
    return CACHE


def _tree_hashes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*'))
        if p.is_file()
    }


def test_tile_starts_cover_the_image_evenly():
    assert prepare.tile_starts(400, 400) == [0]
    assert prepare.tile_starts(300, 400) == [0]
    assert prepare.tile_starts(512, 128) == [0, 128, 256, 384]
    for size, tile in [(1249, 400), (2472, 400), (1035, 256)]:
        starts = prepare.tile_starts(size, tile)
        assert starts[0] == 0 and starts[-1] == size - tile and len(starts) == -(-size // tile)
        assert all(0 < b - a <= tile for a, b in zip(starts, starts[1:]))  # no gaps


def test_split_is_seeded():
    names = [f't{i}' for i in range(20)]
    a, b, c = prepare._split(names, 0.25, 0), prepare._split(names[::-1], 0.25, 0), prepare._split(names, 0.25, 1)
    assert a == b and a != c
    assert sum(v == 'val' for v in a.values()) == 5
    assert list(prepare._split(['x', 'y'], 0.01, 0).values()).count('val') == 1


def test_nuclei_instances_and_semantic_masks_match_the_source(wheels, tmp_path, capsys):
    prepare.prepare_nuclei(tmp_path, wheels, tile=128)
    out = capsys.readouterr().out
    assert 'stardist==0.9.2' in out or 'stardist-0.9.2' in out
    assert '125 nuclei in a 512x512 uint16 image' in out
    wheel = next(wheels.glob('stardist-0.9.2-*.whl'))
    with zipfile.ZipFile(wheel) as zf:
        labels = np.asarray(Image.open(io.BytesIO(zf.read('stardist/data/images/mask2d.tif'))))
    sem = tmp_path / 'nuclei_semantic'
    assert json.loads((sem / 'classes.json').read_text())['classes'] == ['background', 'nucleus']
    full = np.zeros_like(labels, dtype=np.uint8)
    n_tiles = 0
    for split in ('train', 'val'):
        ds = CocoDetection(
            tmp_path / 'nuclei' / 'annotations' / f'instances_{split}.json', tmp_path / 'nuclei' / split, masks=True
        )
        assert ds.class_names == ['nucleus'] and len(ds) > 0
        for i in range(len(ds)):
            image, target = ds[i]
            name = ds.images[ds.ids[i]]['file_name']
            y, x = (int(part[1:]) for part in Path(name).stem.split('_')[1:])
            semantic = np.asarray(Image.open(sem / split / 'masks' / name))
            assert np.array_equal(
                np.asarray(Image.open(sem / split / 'images' / name)),
                np.asarray(Image.open(tmp_path / 'nuclei' / split / name)),
            )
            tile_labels = labels[y : y + 128, x : x + 128]
            assert np.array_equal(semantic, (tile_labels > 0).astype(np.uint8))
            # the instances are the source's nuclei: each mask is exactly one label of the tile
            union = target['masks'].sum(0).numpy()
            ids, counts = np.unique(tile_labels[tile_labels > 0], return_counts=True)
            kept = np.isin(tile_labels, ids[counts >= 8])  # fragments under min_pixels=8 are left out
            assert union.max() <= 1 and np.array_equal(union > 0, kept) and len(target['masks']) == (counts >= 8).sum()
            for mask in target['masks'].numpy().astype(bool):
                assert len(np.unique(tile_labels[mask])) == 1
            full[y : y + 128, x : x + 128] = semantic
            n_tiles += 1
    assert n_tiles == 16 and np.array_equal(full, (labels > 0).astype(np.uint8))


def test_trees_are_tiled_coco_and_idempotent_and_reproducible(wheels, tmp_path, capsys):
    prepare.prepare_trees(tmp_path / 'a', wheels, tile=400)
    first = capsys.readouterr().out
    assert 'deepforest' in first and 'train:' in first
    root = tmp_path / 'a' / 'trees'
    manifest = json.loads((root / 'prepared.json').read_text())
    assert manifest['source']['requirement'] == 'deepforest==2.1.0'
    n_images, n_boxes = 0, 0
    for split in ('train', 'val'):
        ds = CocoDetection(root / 'annotations' / f'instances_{split}.json', root / split)
        assert ds.class_names == ['tree'] and ds.num_dropped == 0
        for i in range(len(ds)):
            image, target = ds[i]
            assert image.shape == (3, 400, 400)
            assert (target['boxes'] >= 0).all() and (target['boxes'] <= 400).all()
            n_boxes += len(target['boxes'])
        n_images += len(ds)
    assert n_images == 1 + 1 + 4 * 3 + 6 * 7  # OSBS, SOAP, the 1249x1035 and the 2299x2472 image
    assert manifest['counts']['train']['boxes'] + manifest['counts']['val']['boxes'] == n_boxes > 900

    before = _tree_hashes(root)
    mtime = (root / 'prepared.json').stat().st_mtime_ns
    prepare.prepare_trees(tmp_path / 'a', wheels, tile=400)
    assert 'already prepared' in capsys.readouterr().out
    assert (root / 'prepared.json').stat().st_mtime_ns == mtime
    prepare.prepare_trees(tmp_path / 'b', wheels, tile=400)
    assert _tree_hashes(tmp_path / 'b' / 'trees') == before  # same settings, same bytes


def test_refuses_to_overwrite_a_foreign_folder(wheels, tmp_path):
    (tmp_path / 'trees').mkdir()
    (tmp_path / 'trees' / 'mine.txt').write_text('user data')
    with pytest.raises(FileExistsError, match='was not made by `hsresnet data prepare`'):
        prepare.prepare_trees(tmp_path, wheels)
    assert (tmp_path / 'trees' / 'mine.txt').read_text() == 'user data'


def test_offline_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / 'nolinks').mkdir()
    monkeypatch.setenv('PIP_NO_INDEX', '1')
    monkeypatch.setenv('PIP_FIND_LINKS', str(tmp_path / 'nolinks'))
    with pytest.raises(RuntimeError, match=r'could not download deepforest==2\.1\.0 with pip .*copy the wheel into'):
        prepare.fetch_wheel('deepforest', tmp_path / 'cache')


def test_data_prepare_command(wheels, tmp_path, capsys):
    from hsresnet.cli import main

    args = ['data', 'prepare', '--root', str(tmp_path), '--datasets', 'nuclei', '--cache-dir', str(wheels)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f'using cached wheel {wheels}' in out and 'read stardist/data/images/img2d.tif' in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['nuclei', 'nuclei_semantic']
    assert main(args) == 0 and 'already prepared' in capsys.readouterr().out
    before = _tree_hashes(tmp_path / 'nuclei')
    assert main(args + ['--seed', '1']) == 0  # new settings: rebuilt, with another split
    assert 'already prepared' not in capsys.readouterr().out and _tree_hashes(tmp_path / 'nuclei') != before
    assert main(['data', 'prepare', '--root', str(tmp_path), '--val-fraction', '1.5']) != 0
