"""Classification end to end on real data: Fashion-MNIST subsets and a mixed-format image folder; train,
validate (JSON/CSV + confusion matrix), predict (with non-image files) and export (checked by onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hsresnet.classification.data import (
    FASHION_MNIST_DIR,
    ArrayTransform,
    FashionMNIST,
    ImageFolderDataset,
    find_fashion_mnist,
    read_idx,
    scan_folder,
)
from hsresnet.cli import main

TINY = ['--model', 'hs_resnet26_small', '--model-kwargs', 'channels=[8,16,32,64]', 'w=16', 's=2']
FAST = ['--no-progress', '--no-tensorboard', '-j', '0', '--threads', '1']


def test_fashion_mnist_is_read_completely():
    root = find_fashion_mnist()
    train, test = FashionMNIST(root, 'train'), FashionMNIST(root, 'test')
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape[1:] == (28, 28) and train.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10  # the published test split is balanced
    img, label = train[0]
    assert img.size == (28, 28) and img.mode == 'L' and 0 <= label < 10


def test_fashion_mnist_missing_or_broken(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        find_fashion_mnist(tmp_path)
    raw = (FASHION_MNIST_DIR / 't10k-labels-idx1-ubyte.gz').read_bytes()
    import gzip

    (tmp_path / 'cut').write_bytes(gzip.decompress(raw)[:5000])
    with pytest.raises(ValueError, match='truncated'):
        read_idx(tmp_path / 'cut')
    assert main(['train', '--data-dir', str(tmp_path), '--output', str(tmp_path / 'r')]) == 2


def make_folder(root: Path, n: int = 6) -> Path:
    """train/ and val/ with grey, RGB, RGBA and palette images of 3 classes, plus junk files."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c, name in enumerate(['cat', 'dog', 'fox']):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((20, 24, 3)) * 80 + 60 * c).astype(np.uint8)
                img = Image.fromarray(arr)
                mode = ['L', 'RGB', 'RGBA', 'P'][i % 4]
                img = img.convert(mode) if mode != 'P' else img.quantize(16)
                img.save(d / f'{i}.png')
    (root / 'train' / 'cat' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
    (root / 'train' / 'dog' / 'notes.txt').write_text('not an image')
    return root


def test_image_folder_modes_and_bad_files(tmp_path):
    root = make_folder(tmp_path)
    split = scan_folder(root / 'train')
    assert split.classes == ['cat', 'dog', 'fox'] and len(split.samples) == 18
    assert sorted(p.name for p, _ in split.bad) == ['broken.png', 'notes.txt']
    for chans, mode in ((3, 'RGB'), (1, 'L')):
        ds = ImageFolderDataset(split, chans)
        assert {ds[i][0].mode for i in range(len(ds))} == {mode}
    (root / 'val' / 'wolf').mkdir()
    (root / 'val' / 'wolf' / 'a.png').write_bytes((root / 'val' / 'cat' / '0.png').read_bytes())
    with pytest.raises(ValueError, match="'wolf'"):
        scan_folder(root / 'val', classes=split.classes)
    (root / 'train' / 'empty').mkdir()
    with pytest.raises(ValueError, match='empty'):
        scan_folder(root / 'train')


def test_image_folder_train_refuses_unknown_val_class(tmp_path, capsys):
    root = make_folder(tmp_path / 'data')
    (root / 'val' / 'wolf').mkdir()
    (root / 'val' / 'wolf' / 'a.png').write_bytes((root / 'val' / 'cat' / '0.png').read_bytes())
    assert main(['train', '--data-dir', str(root), '--output', str(tmp_path / 'r'), *TINY]) == 2
    assert 'wolf' in capsys.readouterr().err
    assert not (tmp_path / 'r').exists()  # refused before anything was written


def test_image_folder_trains_and_reports_bad_files(tmp_path, capsys):
    root = make_folder(tmp_path / 'data')
    out = tmp_path / 'r'
    argv = ['train', '--data-dir', str(root), '--output', str(out), '--img-size', '32', '--epochs', '1', '-b', '6']
    assert main([*argv, *TINY, *FAST]) == 0
    log = capsys.readouterr().err
    assert 'skipped 2 unreadable' in log and 'broken.png' in log and 'notes.txt' in log
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['num_classes'] == 3 and summary['dataset'] == 'folder'


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> Path:
    """A tiny HS-ResNet trained for 2 epochs on 1024 Fashion-MNIST images, from a YAML recipe plus flags."""
    tmp = tmp_path_factory.mktemp('fm')
    recipe = tmp / 'recipe.yaml'
    recipe.write_text(
        'model: hs_resnet26_small\nmodel_kwargs: {channels: [8, 16, 32, 64], w: 16, s: 2}\nepochs: 5\n'
        'lr: 0.2\nscale: [1.0, 1.0]\nratio: [1.0, 1.0]\ncolor_jitter: 0.0\namp: true\nwarmup_epochs: 0.2\n'
    )
    out = tmp / 'run'
    argv = ['train', '-c', str(recipe), '--epochs', '2', '--train-subset', '1024', '--val-subset', '256']
    assert main([*argv, '-b', '32', '--output', str(out), *FAST]) == 0
    return out


def test_train_fashion_mnist_subset(trained):
    summary = json.loads((trained / 'summary.json').read_text())
    assert summary['epochs'] == 2  # the typed flag overrode the recipe's 5
    assert summary['top1'] > 40.0  # 2 epochs on 1k images: far above the 10 % of chance
    assert summary['top5'] >= summary['top1']
    assert summary['macs'] > 0 and summary['params'] > 0 and summary['images_per_s'] > 0
    config = json.loads((trained / 'config.json').read_text())
    assert config['model_kwargs'] and config['amp'] is True
    for name in ('metrics.csv', 'curves.png', 'model_best.safetensors', 'last.state.pt'):
        assert (trained / name).is_file()


def test_validate_results_and_confusion_matrix(trained, tmp_path, capsys):
    summary = json.loads((trained / 'summary.json').read_text())
    res_json, res_csv = tmp_path / 'res.json', tmp_path / 'res.csv'
    common = ['validate', str(trained / 'model.safetensors'), '--val-subset', '256', '-j', '0']
    assert main([*common, '--amp', '--results-file', str(res_json)]) == 0
    res = json.loads(res_json.read_text())
    assert res['top1'] == pytest.approx(summary['top1'], abs=0.01)  # same weights, subset and bf16 autocast
    assert res['num_images'] == 256 and res['param_count'] > 0
    assert Path(res['confusion_matrix']).is_file()
    assert main([*common, '--results-file', str(res_csv)]) == 0
    header, row = res_csv.read_text().splitlines()
    assert header.startswith('model,checkpoint,top1') and row.startswith('hs_resnet26_small')


def test_predict_folder_with_non_images(trained, tmp_path, capsys):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    ds = FashionMNIST(find_fashion_mnist(), 'test')
    for i in range(3):
        Image.fromarray(ds.images[i]).convert('RGB').save(folder / f'{i}.jpg')  # RGB input to a grey model
    (folder / 'readme.txt').write_text('hello')
    out = tmp_path / 'pred.json'
    assert main(['predict', str(folder), str(tmp_path / 'nope.png'), '--checkpoint', str(trained), '--output', str(out),
                 '--topk', '3']) == 0  # fmt: skip
    pred = json.loads(out.read_text())
    assert [Path(p['path']).name for p in pred['predictions']] == ['0.jpg', '1.jpg', '2.jpg']
    assert all(len(p['topk']) == 3 for p in pred['predictions'])
    probs = [t['prob'] for t in pred['predictions'][0]['topk']]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-5
    assert {Path(s['path']).name for s in pred['skipped']} == {'readme.txt', 'nope.png'}
    assert 'readme.txt' in capsys.readouterr().err
    # nothing readable at all: the result still lists the skipped files, the command says so and exits 1
    assert main(['predict', str(folder / 'readme.txt'), '--checkpoint', str(trained), '--output', str(out)]) == 1
    assert 'no readable image among the inputs' in capsys.readouterr().err
    assert json.loads(out.read_text())['predictions'] == []


def test_export_checked_by_onnxruntime(trained, tmp_path):
    import onnxruntime as ort

    out = tmp_path / 'export'
    assert main(['export', str(trained), '--output', str(out)]) == 0
    report = json.loads((out / 'export.json').read_text())
    assert set(report['files']) == {'safetensors', 'torchscript', 'onnx'}
    assert report['classes'][0] == 'T-shirt/top'
    x = torch.randn(5, 1, 28, 28)  # a batch size not seen at export: the batch axis is dynamic
    scripted = torch.jit.load(str(out / 'model.ts'))
    session = ort.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), scripted(x), atol=1e-3, rtol=1e-3)


def test_checkpoint_for_another_model_is_refused(trained, tmp_path, capsys):
    argv = ['train', '--resume', str(trained), '--output', str(tmp_path / 'r'), '--model', 'hs_resnet26_small', *FAST]
    assert main(argv) == 2
    assert 'does not fit' in capsys.readouterr().err
    assert not (tmp_path / 'r').exists()


def test_help_lists_timm_flags(capsys):
    with pytest.raises(SystemExit):
        main(['train', '--help'])
    text = capsys.readouterr().out
    for flag in ('--model-kwargs', '--data-dir', '--smoothing', '--mixup', '--cutmix', '--aa', '--drop-path',
                 '--model-ema', '--torchcompile', '--channels-last', '--resume', '--warmup-epochs'):  # fmt: skip
        assert flag in text


@pytest.mark.parametrize('training', [False, True])
def test_fast_fashion_mnist_transform_equals_timm(training):
    """The array transform that the default recipe gets is exactly timm's create_transform, without PIL ops."""
    from timm.data import create_transform

    from hsresnet.classification import train
    from hsresnet.classification.task import ClassificationTask
    from hsresnet.engine import RecipeParser

    parser = RecipeParser()
    train.add_arguments(parser)
    cfg = parser.parse_args(['-c', 'configs/fashion_mnist.yaml'])
    task = ClassificationTask(cfg, verbose=False)
    fast = task.transforms(training)
    assert isinstance(fast, ArrayTransform) and fast.hflip == (cfg.hflip if training else 0.0)
    images = [FashionMNIST(find_fashion_mnist(), 'test')[i][0] for i in range(3)]
    for p in (0.0, 1.0) if training else (0.0,):  # a certain flip (or none) makes the random transforms comparable
        fast.hflip = p
        ref = create_transform(
            (1, 28, 28), is_training=training, hflip=p, scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=0.0,
            mean=task.mean, std=task.std, crop_pct=1.0,
        )  # fmt: skip
        for img in images:
            torch.testing.assert_close(fast(img), ref(img), rtol=0, atol=1e-6)


def test_fashion_mnist_batched_fetch_equals_per_image():
    """``__getitems__`` (one array transform per batch) gives what per-image fetches give, flips drawn per image."""
    data = FashionMNIST(find_fashion_mnist(), 'test', ArrayTransform((0.3,), (0.35,)))
    indices = [5, 0, 9999, 17]
    for p in (0.0, 1.0):
        data.transform.hflip = p
        for (x, y), i in zip(data.__getitems__(indices), indices):
            ref_x, ref_y = data[i]
            torch.testing.assert_close(x, ref_x, rtol=0, atol=0)
            assert y == ref_y and isinstance(y, int)
    data.transform.hflip = 0.5
    torch.manual_seed(0)
    batch = data.__getitems__(list(range(200)))
    data.transform.hflip = 0.0
    plain = [data[i][0] for i in range(200)]
    flipped = [torch.equal(x, ref.flip(-1)) and not torch.equal(x, ref) for (x, _), ref in zip(batch, plain)]
    kept = [torch.equal(x, ref) for (x, _), ref in zip(batch, plain)]
    assert all(f or k for f, k in zip(flipped, kept)) and 60 < sum(flipped) < 140


def test_array_transform_random_erasing_per_image():
    """With reprob 1 every image of a batch gets one rectangle of fresh noise, the rest of it untouched."""
    images = FashionMNIST(find_fashion_mnist(), 'test').images[:16]
    plain = ArrayTransform((0.3,), (0.35,)).batch(images)
    erased = ArrayTransform((0.3,), (0.35,), reprob=1.0).batch(images)
    changed = (erased != plain).flatten(1)
    assert changed.any(1).all(), 'an image escaped erasing at reprob 1'
    fractions = changed.float().mean(1)
    assert (fractions < 0.4).all() and fractions.std() > 0  # one rectangle of random area (2 % to 1/3) per image
    rows, cols = (erased != plain)[:, 0].any(2), (erased != plain)[:, 0].any(1)
    for r, c, ch in zip(rows, cols, (erased != plain)[:, 0]):
        box = ch[r.nonzero().min() : r.nonzero().max() + 1, c.nonzero().min() : c.nonzero().max() + 1]
        assert box.float().mean() > 0.9  # the changes fill one box (noise can equal the pixel by chance)


@pytest.mark.parametrize('recipe', sorted(Path('configs').glob('*.yaml')), ids=lambda p: p.stem)
def test_every_recipe_resolves_with_known_flags(recipe):
    """Each YAML in configs/ names only real flags with valid values (a typo would be a clear error at start)."""
    from hsresnet.classification import train
    from hsresnet.engine import RecipeParser

    parser = RecipeParser()
    train.add_arguments(parser)
    cfg = parser.parse_args(['-c', str(recipe)])
    assert cfg.epochs >= 1 and cfg.model


def test_export_optimize_folds_bn_and_is_checked(trained, tmp_path):
    """export --optimize: TorchScript of optimize(model) (no BN left), ONNX as usual; both agree with the model."""
    import onnxruntime as ort

    from hsresnet.classification.task import load_classifier
    from hsresnet.optimize import fast_bf16_available

    out = tmp_path / 'export'
    assert main(['export', str(trained), '--output', str(out), '--optimize']) == 0
    report = json.loads((out / 'export.json').read_text())
    assert report['optimized']['bn_folded']
    assert report['optimized']['torchscript_dtype'] == ('bfloat16' if fast_bf16_available() else 'float32')
    model, _ = load_classifier(str(trained))
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    session = ort.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, atol=1e-3, rtol=1e-3)
    scripted = torch.jit.load(str(out / 'model.ts'))
    assert 'batch_norm' not in str(scripted.inlined_graph)
    plain = tmp_path / 'plain'
    assert main(['export', str(trained), '--output', str(plain), '--formats', 'torchscript']) == 0
    assert 'batch_norm' in str(torch.jit.load(str(plain / 'model.ts')).inlined_graph)
    got = scripted(x)
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= 5e-2 * max(1.0, float(expected.abs().max()))


@pytest.mark.slow
def test_released_long_recipe_weights_reach_94_percent(tmp_path):
    """The EMA weights of the measured configs/fashion_mnist_long.yaml run, on all 10 000 test images, in fp32."""
    weights = Path('benchmarks/results/fashion_mnist_long/model_ema.safetensors')
    out = tmp_path / 'res.json'
    assert main(['validate', str(weights), '-j', '0', '-b', '500', '--results-file', str(out)]) == 0
    res = json.loads(out.read_text())
    recorded = json.loads((weights.parent / 'summary.json').read_text())
    assert res['num_images'] == 10_000 and res['top1'] >= 94.0
    assert res['top1'] == pytest.approx(recorded['top1'], abs=0.1)  # the run evaluated in bf16 autocast
