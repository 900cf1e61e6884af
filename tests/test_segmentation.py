"""Semantic segmentation: DeepLabV3+ builders, Cityscapes / mask-folder loaders, joint transforms, metrics, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.ops.misc import FrozenBatchNorm2d

from hsresnet.segmentation import (
    IGNORE_INDEX,
    CityscapesSegmentation,
    MaskFolderSegmentation,
    SegmentationMetrics,
    SegmentationTransform,
    build_dataset,
    deeplabv3plus,
    deeplabv3plus_hs_resnet50,
    load_backbone_checkpoint,
)
from hsresnet.segmentation.data import pad_collate
from hsresnet.segmentation.task import build_segmentation_model, resolve_backbone

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _cityscapes(root: Path) -> None:
    """Two train images in two cities with gtFine labelIds, one val image with labelTrainIds only."""
    rng = np.random.default_rng(0)
    label_ids = np.zeros((16, 24), np.uint8)  # 0 'unlabeled' -> ignore
    label_ids[:4] = 7  # road -> 0
    label_ids[4:8, :12] = 26  # car -> 13
    label_ids[4:8, 12:] = 33  # bicycle -> 18
    label_ids[8:12, :6] = 9  # parking: not evaluated -> ignore
    label_ids[8:12, 6:] = 23  # sky -> 10
    for city, name in (('aachen', 'aachen_000000_000019'), ('bochum', 'bochum_000000_000313')):
        _png(root / 'leftImg8bit/train' / city / f'{name}_leftImg8bit.png', rng.integers(0, 255, (16, 24, 3), np.uint8))
        _png(root / 'gtFine/train' / city / f'{name}_gtFine_labelIds.png', label_ids)
        _png(root / 'gtFine/train' / city / f'{name}_gtFine_color.png', rng.integers(0, 255, (16, 24, 3), np.uint8))
    _png(root / 'leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png', np.zeros((16, 24, 3), np.uint8))
    _png(root / 'gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png', np.full((16, 24), 13, np.uint8))


def test_cityscapes_layout_maps_label_ids_to_train_ids(tmp_path):
    _cityscapes(tmp_path)
    train = build_dataset(tmp_path, 'train')
    assert isinstance(train, CityscapesSegmentation) and len(train) == 2
    assert [p[0].parent.name for p in train.pairs] == ['aachen', 'bochum']
    image, mask = train[0]
    assert image.shape == (3, 16, 24) and image.dtype == torch.uint8 and mask.dtype == torch.int64
    assert (mask[:4] == 0).all() and (mask[4:8, :12] == 13).all() and (mask[4:8, 12:] == 18).all()
    assert (mask[8:12, 6:] == 10).all()
    assert (mask[8:12, :6] == IGNORE_INDEX).all() and (mask[12:] == IGNORE_INDEX).all()
    val = build_dataset(tmp_path, 'val')  # labelTrainIds are used as they are
    assert (val[0][1] == 13).all()


def test_missing_dataset_and_bad_masks_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        build_dataset(tmp_path / 'nope', 'train')
    with pytest.raises(FileNotFoundError, match='leftImg8bit/test/<city>'):
        CityscapesSegmentation(tmp_path, 'test')
    with pytest.raises(FileNotFoundError, match=r'train/images/<name>\.png'):
        build_dataset(tmp_path, 'train', num_classes=2)
    _png(tmp_path / 'train/images/a.png', np.zeros((8, 10, 3), np.uint8))
    _png(tmp_path / 'train/masks/a.png', np.zeros((10, 8), np.uint8))
    with pytest.raises(ValueError, match='classes.txt'):
        build_dataset(tmp_path, 'train')
    with pytest.raises(ValueError, match=r'masks/a\.png is 8x10 .* exactly the size of its image'):
        build_dataset(tmp_path, 'train', num_classes=2)[0]
    _png(tmp_path / 'train/masks/a.png', np.full((8, 10), 3, np.uint8))
    with pytest.raises(ValueError, match=r'masks/a\.png holds class id 3 .* 2 classes'):
        build_dataset(tmp_path, 'train', num_classes=2)[0]
    _png(tmp_path / 'train/images/b.png', np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r'b\.png has no mask'):
        build_dataset(tmp_path, 'train', num_classes=2)


def test_mask_folder_with_class_names(tmp_path):
    (tmp_path / 'classes.txt').write_text('background\nnucleus\n')
    _png(tmp_path / 'val/images/t0.png', np.full((8, 10), 200, np.uint8))  # grey images become RGB
    _png(tmp_path / 'val/masks/t0.png', np.eye(8, 10, dtype=np.uint8))
    ds = build_dataset(tmp_path, 'val', SegmentationTransform(MEAN, STD))
    assert isinstance(ds, MaskFolderSegmentation) and ds.classes == ['background', 'nucleus']
    image, mask = ds[0]
    assert image.shape == (3, 8, 10) and image.dtype == torch.float32
    assert torch.allclose(image[:, 0, 0], (200 / 255 - torch.tensor(MEAN)) / torch.tensor(STD), atol=1e-5)
    assert torch.equal(mask, torch.from_numpy(np.eye(8, 10, dtype=np.int64)))


def test_train_transform_moves_mask_with_image():
    torch.manual_seed(0)
    h, w = 24, 40
    labels = torch.arange(w).repeat(h, 1) % 7  # a per-column label, so flips and crops are visible
    pixels = (labels * 30).to(torch.uint8)
    from torchvision import tv_tensors

    image = tv_tensors.Image(pixels.expand(3, h, w).clone())
    mask = tv_tensors.Mask(labels.to(torch.uint8))
    exact = SegmentationTransform((0, 0, 0), (1, 1, 1), train=True, crop_size=(16, 32), scale_range=(1.0, 1.0))
    flips = 0
    for _ in range(10):
        img, m = exact(image, mask)
        assert img.shape == (3, 16, 32) and m.shape == (16, 32)
        assert torch.equal(torch.round(img[0] * 255 / 30).long(), m)  # same crop and flip applied to both
        flips += int(m[0, 1] < m[0, 0] and m[0, 0] != 6)
    assert 0 < flips < 10
    scaled = SegmentationTransform((0, 0, 0), (1, 1, 1), train=True, crop_size=64, scale_range=(0.6, 1.4))
    for _ in range(5):
        img, m = scaled(image, mask)
        assert img.shape == (3, 64, 64)
        assert set(m.unique().tolist()) <= set(range(7)) | {IGNORE_INDEX}  # nearest: no blended labels
        assert (m == IGNORE_INDEX).any() and (img[:, m == IGNORE_INDEX] == 0).all()  # padding ignored


def test_pad_collate_pads_with_ignore():
    a = (torch.ones(3, 10, 20), torch.zeros(10, 20, dtype=torch.long))
    b = (torch.ones(3, 17, 5), torch.ones(17, 5, dtype=torch.long))
    images, masks = pad_collate([a, b], multiple=16)
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    assert (masks[0, 10:] == IGNORE_INDEX).all() and (masks[1, :17, :5] == 1).all() and images[1, :, 17:].sum() == 0


def test_metrics_miou_pixel_acc_and_ignore():
    metric = SegmentationMetrics(3, ['a', 'b', 'c'])
    target = torch.tensor([[[0, 0, 1, 1, 2, IGNORE_INDEX]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 1, 1, 1, 0, 2]]]), 3).permute(0, 3, 1, 2).float()
    metric.update(logits, target)
    out = metric.compute()
    # a: tp 1, fp 1, fn 1 -> 1/3; b: tp 2, fp 1 -> 2/3; c: tp 0, fn 1 (the ignored pixel's prediction not counted)
    assert out['iou_a'] == pytest.approx(1 / 3) and out['iou_b'] == pytest.approx(2 / 3) and out['iou_c'] == 0
    assert out['miou'] == pytest.approx(1 / 3) and out['pixel_acc'] == pytest.approx(3 / 5)


def test_deeplabv3plus_hs_resnet50_output_strides():
    model = deeplabv3plus_hs_resnet50(num_classes=3).eval()
    assert model.encoder.output_stride == 16 and model.mean == MEAN and model.std == STD
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 64, 96)
        feats = model.encoder(x)
    assert [f.shape[-1] for f in feats] == [96, 48, 24, 12, 6, 6]  # stage 4 dilated, not strided
    os8 = deeplabv3plus('hs_resnet26', num_classes=2, output_stride=8).eval()
    with torch.no_grad():
        assert [f.shape[-1] for f in os8.encoder(x)] == [96, 48, 24, 12, 12, 12]
    with pytest.raises(ValueError, match='output_stride=32'):
        deeplabv3plus('hs_resnet26', output_stride=32)
    with pytest.raises(ValueError, match='Unknown backbone'):
        deeplabv3plus('hs_resnet51')


@pytest.mark.parametrize('backbone', ['resnet50', 'resnet50d', 'res2net50_26w_4s', 'hs_resnet50d'])
def test_baselines_share_the_head(backbone):
    model = deeplabv3plus(backbone, num_classes=4).eval()
    reference = deeplabv3plus('hs_resnet50', num_classes=4)
    head = {k: v.shape for k, v in model.state_dict().items() if not k.startswith('encoder.')}
    assert head == {k: v.shape for k, v in reference.state_dict().items() if not k.startswith('encoder.')}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_classification_checkpoint_loads_strictly(tmp_path):
    classifier = timm.create_model('hs_resnet26', num_classes=10)
    path = tmp_path / 'cls.safetensors'
    save_file(classifier.state_dict(), str(path))
    model = deeplabv3plus('hs_resnet26', num_classes=2, checkpoint=path, frozen_bn=True, trainable_layers=3)
    encoder = model.encoder.model
    assert torch.equal(encoder.layer3[1].conv2.convs[0].weight, classifier.layer3[1].conv2.convs[0].weight)
    assert torch.equal(encoder.layer4[0].bn1.running_var, classifier.layer4[0].bn1.running_var)
    assert isinstance(encoder.layer4[0].bn1, FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    assert not encoder.conv1.weight.requires_grad and not encoder.layer1[0].conv1.weight.requires_grad
    assert encoder.layer2[0].conv1.weight.requires_grad and all(p.requires_grad for p in model.decoder.parameters())

    frozen = build_segmentation_model({'backbone': 'hs_resnet26', 'num_classes': 2, 'trainable_layers': 0})
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert resolve_backbone('deeplabv3plus_resnet50d', 'hs_resnet50') == 'resnet50d'
    with pytest.raises(ValueError, match="--model 'pspnet' is unknown"):
        resolve_backbone('pspnet', 'hs_resnet50')

    other = tmp_path / 'other.safetensors'
    save_file(timm.create_model('hs_resnet26', s=4).state_dict(), str(other))
    with pytest.raises(ValueError, match=r'shape mismatches \[\w'):
        deeplabv3plus('hs_resnet26', checkpoint=other)
    save_file(timm.create_model('resnet26').state_dict(), str(other))
    with pytest.raises(
        ValueError,
        match=r'does not match the backbone: missing keys \[\w.* unexpected keys \[\w.*--backbone hs_resnet26',
    ):
        load_backbone_checkpoint(deeplabv3plus('hs_resnet26').encoder.model, other, 'hs_resnet26')


def _ddp_metric_worker(rank: int, world: int, init: str, preds: torch.Tensor, target: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    metric = SegmentationMetrics(3)
    metric.update(preds[rank::world], target[rank::world])  # each rank sees a different shard
    result = metric.compute()
    torch.save(result, f'{out}.{rank}')
    dist.destroy_process_group()


def test_metrics_are_reduced_over_ddp_ranks(tmp_path):
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (6, 8, 8), generator=gen)
    target[:, 0] = IGNORE_INDEX
    preds = torch.where(torch.rand(6, 8, 8, generator=gen) < 0.7, target.clamp(max=2), torch.randint(0, 3, (6, 8, 8)))
    single = SegmentationMetrics(3)
    single.update(preds, target)
    expected = single.compute()
    out = str(tmp_path / 'result')
    mp.spawn(_ddp_metric_worker, args=(2, f'file://{tmp_path / "store"}', preds, target, out), nprocs=2)
    for rank in range(2):
        assert torch.load(f'{out}.{rank}', weights_only=True) == pytest.approx(expected)
    shard = SegmentationMetrics(3)
    shard.update(preds[::2], target[::2])
    assert shard.compute()['miou'] != pytest.approx(expected['miou'])  # the reduction matters on this data


def _mask_folder(root: Path, n_train: int = 4, n_val: int = 2, size: int = 32) -> None:
    """Bright squares (class 1) on a dark background, a few ignored pixels; classes.json as `data prepare` writes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'classes.json').write_text('{"classes": ["background", "blob"], "ignore_index": 255}')
    for split, n in (('train', n_train), ('val', n_val)):
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            mask[y : y + size // 3, x : x + size // 3] = 1
            mask[0, :3] = IGNORE_INDEX
            image = (mask == 1) * 200 + rng.integers(0, 40, (size, size))
            _png(root / split / 'images' / f'{split}{i}.png', image.astype(np.uint8))
            _png(root / split / 'masks' / f'{split}{i}.png', mask)


def test_segment_cli_train_eval_predict(tmp_path, capsys):
    from hsresnet.cli import main

    data, run = tmp_path / 'blobs', tmp_path / 'run'
    _mask_folder(data)
    common = ['--data', str(data), '--backbone', 'hs_resnet26', '-j', '0', '--no-progress', '--no-tensorboard']
    args = ['segment', 'train', *common, '--epochs', '1', '-b', '2', '--crop-size', '32', '--output', str(run)]
    assert main([*args, '--lr', '0.01']) == 0
    summary = __import__('json').loads((run / 'summary.json').read_text())
    assert {'miou', 'pixel_acc', 'iou_background', 'iou_blob', 'best_miou'} <= set(summary)
    assert 0 <= summary['miou'] <= 1 and (run / 'model_best.safetensors').is_file()

    capsys.readouterr()
    assert main(['segment', 'validate', '--checkpoint', str(run), '--data', str(data), '-j', '0']) == 0
    evaluated = __import__('json').loads(capsys.readouterr().out)
    assert evaluated['images'] == 2 and evaluated['miou'] == pytest.approx(summary['miou'], abs=1e-6)

    out = tmp_path / 'pred'
    broken = tmp_path / 'broken.tif'
    broken.write_bytes(b'II*\x00 not a tiff')  # unreadable: skipped and listed, the others are segmented
    assert main(['segment', 'predict', '--checkpoint', str(run / 'model.safetensors'), str(data / 'val' / 'images'),
                 str(data / 'train' / 'images' / 'train0.png'), str(broken), '--output', str(out)]) == 0  # fmt: skip
    result = __import__('json').loads((out / 'predictions.json').read_text())
    assert result['classes'] == ['background', 'blob'] and len(result['images']) == 3
    assert [s['path'] for s in result['skipped']] == [str(broken)]
    for record in result['images']:
        assert sum(record['class_fractions'].values()) == pytest.approx(1.0, abs=1e-4)
        with Image.open(record['overlay']) as overlay, Image.open(record['mask']) as mask:
            assert overlay.size == mask.size == (32, 32) and overlay.mode == 'RGB' and mask.mode == 'P'
            labels = np.asarray(mask)
        assert labels.max() <= 1
        assert record['class_fractions']['blob'] == pytest.approx((labels == 1).mean(), abs=1e-6)

    assert main(['segment', 'eval', '--checkpoint', str(run), '--data', str(tmp_path / 'nope')]) == 2
    assert 'does not exist' in capsys.readouterr().err


# ---------------------------------------------------------------- slow: fit a handful of real images
NUCLEI4 = Path(__file__).parent / 'fixtures' / 'segmentation' / 'nuclei4'


@pytest.mark.slow
def test_deeplabv3plus_hs_resnet50_fits_a_handful_of_real_nuclei(tmp_path):
    """Four real 128 px nuclei tiles, 20 AdamW steps from random init through the CLI and the engine."""
    import csv
    import json

    from hsresnet.cli import main

    run = tmp_path / 'run'
    flags = ['--data', str(NUCLEI4), '--val-split', 'train', '--model', 'deeplabv3plus_hs_resnet50', '-b', '4']
    flags += ['--crop-size', '128', '--scale-range', '1', '1', '--epochs', '20', '--eval-interval', '20']
    flags += ['--opt', 'adamw', '--lr', '2e-3', '--sched', 'cosine', '--amp', 'auto', '--seed', '0', '-j', '0']
    assert main(['segment', 'train', *flags, '--output', str(run), '--no-progress', '--no-tensorboard']) == 0
    losses = [float(row['train_loss']) for row in csv.DictReader(open(run / 'metrics.csv'))]
    summary = json.loads((run / 'summary.json').read_text())
    assert losses[-1] < 0.3 * losses[0], losses
    # predicting all background scores mIoU ~0.39 and nucleus IoU 0 on these tiles
    assert summary['iou_nucleus'] > 0.3 and summary['miou'] > 0.55, summary
