"""Nothing lost, nothing silent: output folders, full disks, bad values and bad files, tried as a careless or
hostile user would. Every case ends in a clear one-sentence error (exit 2) with everything intact, or in a run that
does the right thing; none shows a traceback."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hsresnet.cli import main
from hsresnet.engine import load_checkpoint, load_weights, save_weights

TINY = ['--model', 'hs_resnet26_small', '--model-kwargs', 'channels=[8,16,32,64]', 'w=16', 's=2']
FAST = ['--train-subset', '64', '--val-subset', '64', '-b', '32', '--no-progress', '--no-tensorboard', '-j', '0']
FAST += ['--threads', '1']


def train(output: Path, *extra: str) -> int:
    return main(['train', *TINY, *FAST, '--epochs', '1', '--output', str(output), *extra])


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def copy_files(folder: Path, dest: Path) -> Path:
    """A copy of the files (not the sub-folders) of ``folder`` in the new folder ``dest``."""
    dest.mkdir()
    for path in folder.iterdir():
        if path.is_file():
            (dest / path.name).write_bytes(path.read_bytes())
    return dest


def error(capsys) -> str:
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return err


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Path:
    """A finished tiny run, with EMA (model_ema.safetensors)."""
    folder = tmp_path_factory.mktemp('hostile') / 'run'
    assert train(folder, '--model-ema') == 0
    return folder


# ---------------------------------------------------------------- work lost


def test_train_refuses_an_export_folder_and_a_released_results_folder(run, tmp_path, capsys):
    export = tmp_path / 'export'
    assert main(['export', str(run), '--output', str(export), '--formats', 'safetensors']) == 0
    before = snapshot(export)
    assert train(export) == 2 and train(export, '--overwrite') == 2
    assert 'not a training run' in error(capsys) and snapshot(export) == before
    released = tmp_path / 'released'  # records and weights of a finished run, as benchmarks/results/ keeps them
    released.mkdir()
    for name in ('config.json', 'summary.json', 'metrics.csv', 'model_ema.safetensors'):
        (released / name).write_bytes((run / name).read_bytes())
    before = snapshot(released)
    assert train(released) == 2
    assert 'already holds a training run' in error(capsys) and snapshot(released) == before


def test_resume_into_another_run_folder_is_refused(run, tmp_path, capsys):
    other = tmp_path / 'other'
    assert train(other) == 0
    before = snapshot(other)
    assert train(other, '--resume', str(run), '--epochs', '2') == 2
    assert 'already holds a training run' in error(capsys) and snapshot(other) == before
    fork = tmp_path / 'fork'  # a new folder is fine: the resumed run continues there
    assert train(fork, '--resume', str(run), '--epochs', '2', '--model-ema') == 0
    assert load_checkpoint(fork)[1]['epoch'] == 2 and load_checkpoint(run)[1]['epoch'] == 1


def test_export_refuses_a_run_folder_and_foreign_files(run, tmp_path, capsys):
    before = snapshot(run)
    assert main(['export', str(run), '--output', str(run), '--overwrite']) == 2
    assert 'training run folder' in error(capsys) and snapshot(run) == before
    foreign = tmp_path / 'notes'
    foreign.mkdir()
    (foreign / 'todo.txt').write_text('mine')
    assert main(['export', str(run), '--output', str(foreign), '--overwrite', '--formats', 'safetensors']) == 2
    assert 'not an export' in error(capsys) and snapshot(foreign) == {'todo.txt': b'mine'}
    export = tmp_path / 'export'
    assert main(['export', str(run), '--output', str(export), '--formats', 'safetensors']) == 0
    assert main(['export', str(run), '--output', str(export), '--formats', 'safetensors']) == 2
    assert '--overwrite to replace it' in error(capsys)
    assert main(['export', str(run), '--output', str(export), '--formats', 'safetensors', '--overwrite']) == 0


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / 'busy'
    folder.mkdir()
    (folder / 'config.json').write_text('{}')
    holder = subprocess.Popen(  # another training process holding the folder's lock
        [sys.executable, '-c', 'import fcntl, sys, time; f = open(sys.argv[1], "a"); fcntl.flock(f, fcntl.LOCK_EX); '
         'print("locked", flush=True); time.sleep(60)', str(folder / '.lock')],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == 'locked'
        assert train(folder, '--overwrite') == 2
        assert 'being written by another training process' in error(capsys)
        assert sorted(p.name for p in folder.iterdir()) == ['.lock', 'config.json']
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert train(folder, '--overwrite') == 0  # the lock went with its process


def test_a_kill_between_the_two_renames_still_resumes(run, tmp_path):
    killed = copy_files(run, tmp_path / 'killed')
    weights, _ = load_weights(killed / 'last.safetensors')  # the new weights file never replaced the old one
    save_weights(killed / 'last.safetensors', {k: torch.zeros_like(v) for k, v in weights.items()})
    assert train(killed, '--resume', str(killed), '--epochs', '2', '--model-ema') == 0
    assert load_checkpoint(killed)[1]['epoch'] == 2


def test_overwrite_leaves_no_file_of_the_replaced_run(run, tmp_path):
    folder = copy_files(run, tmp_path / 'again')
    (folder / 'predict').mkdir()  # a user's own folder inside the run is left alone
    assert (folder / 'model_ema.safetensors').is_file()
    assert train(folder, '--overwrite') == 0  # no EMA this time
    assert not (folder / 'model_ema.safetensors').exists() and (folder / 'predict').is_dir()
    assert 'ema' not in (folder / 'metrics.csv').read_text().splitlines()[0]


# ---------------------------------------------------------------- silent wrong answers


@pytest.fixture(scope='module')
def nan_run(run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('nan')
    weights, meta = load_weights(run / 'model.safetensors')
    weights = {k: torch.full_like(v, float('nan')) if v.is_floating_point() else v for k, v in weights.items()}
    save_weights(folder / 'model.safetensors', weights, {k: v for k, v in meta.items() if not k.startswith('_')})
    return folder / 'model.safetensors'


@pytest.mark.parametrize('command', ['validate', 'predict', 'export'])
def test_nan_weights_are_refused_everywhere(nan_run, tmp_path, capsys, command):
    image = tmp_path / 'x.png'
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    argv = {
        'validate': ['validate', str(nan_run), '--val-subset', '16', '-j', '0'],
        'predict': ['predict', '--checkpoint', str(nan_run), str(image)],
        'export': ['export', str(nan_run), '--output', str(tmp_path / 'export')],
    }[command]
    assert main(argv) == 2
    assert 'NaN or infinite values' in error(capsys) and not (tmp_path / 'export').exists()


def test_a_failed_export_check_leaves_no_unverified_file(run, tmp_path, capsys):
    export = tmp_path / 'export'
    assert main(['export', str(run), '--output', str(export), '--atol', '1e-30']) == 2  # no runtime is that exact
    assert 'not trusted' in error(capsys)
    assert list(export.iterdir()) == []  # nothing moved in: no model.ts, no model.onnx, no export.json


@pytest.mark.parametrize(
    'flags, message',
    [
        (['--img-size', '0'], "argument --img-size: '0' is too small"),
        (['--in-chans', '0'], "argument --in-chans: '0' is too small"),
        (['--smoothing', '2'], "argument --smoothing: '2' is not a number in [0, 1)"),
        (['--lr', 'nan'], "argument --lr: 'nan' is not a number"),
        (['-j', '-1'], "argument -j/--workers: '-1' is too small"),
        (['--scale', '0', '1'], "argument --scale: '0' is not a number in (0, 1]"),
    ],
)
def test_impossible_values_are_refused_not_replaced(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train(tmp_path / 'r', *flags)
    assert exc.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / 'r').exists()


@pytest.mark.parametrize(
    'recipe, message',
    [
        ({'batch_size': 2.5}, 'batch_size: 2.5 is not an integer'),
        ({'batch_size': True}, 'batch_size: True is not an integer'),
        ({'epochs': [1, 2]}, 'epochs: [1, 2] should be a single value'),
        ({'scale': 0.5}, 'scale: 0.5 should be a list'),
        ({'channels_last': 'yes'}, "channels_last: 'yes' should be true or false"),
        ({'dataset': 'cifar'}, "dataset: 'cifar' is not one of"),
        ({'model_kwargs': 5}, 'model_kwargs: 5 should be a mapping'),
    ],
)
def test_impossible_recipe_values_name_their_key(tmp_path, capsys, recipe, message):
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(recipe))
    argv = ['train', '--train-subset', '64', '-c', str(path), '--output', str(tmp_path / 'r')]
    assert main(argv) == 2  # no flag typed over the recipe's values
    assert message in error(capsys) and not (tmp_path / 'r').exists()


def test_topk_zero_is_refused(run, capsys):
    with pytest.raises(SystemExit):
        main(['predict', '--checkpoint', str(run), '--topk', '0', str(run)])
    assert "argument --topk: '0' is too small" in capsys.readouterr().err


def test_coco_json_without_annotations_is_refused(tmp_path):
    from hsresnet.detection.datasets import load_coco_json

    path = tmp_path / 'image_info.json'
    path.write_text(json.dumps({'images': [], 'categories': [{'id': 1, 'name': 'x'}]}))
    with pytest.raises(ValueError, match='annotations missing'):
        load_coco_json(path)


# ---------------------------------------------------------------- a sentence, not a traceback


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import hsresnet.engine.checkpoint as checkpoint

    folder, saves = tmp_path / 'full', []
    original = torch.save

    def fill_the_disk(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:  # the checkpoint of epoch 2: half a file, then the disk is full
            Path(path).write_bytes(b'\x80' * 100)
            raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, 'save', fill_the_disk)
    assert train(folder, '--epochs', '2') == 2
    err = error(capsys)
    assert 'the disk is full' in err and f'the last complete checkpoint ({folder / "last.state.pt"}) is intact' in err
    monkeypatch.setattr(checkpoint.torch, 'save', original)
    assert load_checkpoint(folder)[1]['epoch'] == 1 and not list(folder.glob('.*tmp*'))
    assert train(folder, '--resume', str(folder), '--epochs', '2') == 0


def test_file_system_errors_are_one_sentence_at_every_command(run, tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    cases = {
        'is a file, not a folder': ['train', *TINY, *FAST, '--output', str(blocker)],
        'a part of the path is a file': ['train', *TINY, *FAST, '--output', str(blocker / 'run')],
        'a file is in the way': ['validate', str(run), '--val-subset', '16', '-j', '0', '--results-file',
                                 str(blocker / 'r.json')],
        'cannot use': ['predict', '--checkpoint', str(run), str(run), '--output', str(blocker / 'p.json')],
        'cannot use ': ['export', str(run), '--output', str(blocker / 'export')],
    }  # fmt: skip
    for message, argv in cases.items():
        assert main(argv) == 2, argv
        err = error(capsys)
        assert message in err and str(blocker) in err, err
    assert main(cases['a part of the path is a file']) == 2 and 'no checkpoint had been written yet' in error(capsys)


def test_wrong_shapes_of_values(tmp_path, capsys):
    assert train(tmp_path / 'r', '--mean', '0.5', '0.5') == 2
    assert '--mean has 2 values for 1-channel input' in error(capsys)
    assert train(tmp_path / 'r', '--in-chans', '3') == 2
    assert 'Fashion-MNIST images have one (grey) channel' in error(capsys)
    assert not (tmp_path / 'r').exists()


def _mask_folder(root: Path, broken: bool = False) -> None:
    rng = np.random.default_rng(0)
    for split, n in (('train', 3), ('val', 1)):
        for i in range(n):
            (root / split / 'images').mkdir(parents=True, exist_ok=True)
            (root / split / 'masks').mkdir(parents=True, exist_ok=True)
            mask = np.zeros((32, 32), np.uint8)
            mask[8:20, 8:20] = 1
            Image.fromarray(mask).save(root / split / 'masks' / f'{i}.png')
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(root / split / 'images' / f'{i}.png')
    (root / 'classes.json').write_text(json.dumps({'classes': ['background', 'blob']}))
    if broken:
        (root / 'train' / 'images' / '0.png').write_bytes(b'\x89PNG\r\n\x1a\n cut short')


SEGMENT = ['segment', 'train', '--backbone', 'hs_resnet26', '--backbone-kwargs', 'w=8', 's=2', '--epochs', '1']
SEGMENT += ['-b', '2', '--crop-size', '32', '--no-progress', '--no-tensorboard', '--threads', '1']


def test_unreadable_segmentation_training_files_are_skipped_and_counted(tmp_path, caplog):
    data = tmp_path / 'blobs'
    _mask_folder(data, broken=True)
    assert main([*SEGMENT, '--data', str(data), '-j', '0', '--output', str(tmp_path / 'run')]) == 0
    assert 'skipping the unreadable pair' in caplog.text and '0.png' in caplog.text


def test_a_segmentation_image_damaged_after_the_check_is_skipped_when_read(tmp_path, caplog):
    """A file that passed the dataset's up-front check but no longer decodes is logged and replaced by the next pair."""
    from hsresnet.segmentation.data import build_dataset

    data = tmp_path / 'blobs'
    _mask_folder(data)
    dataset = build_dataset(data, 'train')
    (data / 'train' / 'images' / '0.png').write_bytes(b'\x89PNG\r\n\x1a\n cut short')
    image, mask = dataset[0]
    assert 'skipping unreadable' in caplog.text and '0.png' in caplog.text
    assert tuple(mask.shape[-2:]) == (32, 32) and (mask == 1).any()


def test_an_error_in_a_data_loader_worker_reads_as_the_error_itself(tmp_path, capsys):
    data = tmp_path / 'blobs'
    _mask_folder(data)
    for i in (1, 2):  # two of the three: every batch of two holds one
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / 'train' / 'masks' / f'{i}.png')  # wrong size
    assert main([*SEGMENT, '--data', str(data), '-j', '1', '--output', str(tmp_path / 'run')]) == 2
    err = error(capsys)
    assert 'DataLoader worker' not in err and 'a mask must have exactly the size of its image' in err


def test_a_truncated_cached_wheel_is_fetched_again(tmp_path, capsys):
    from hsresnet import prepare

    good = sorted(Path(prepare.DEFAULT_CACHE).glob('stardist-*.whl'))
    if not good:
        pytest.skip('no cached stardist wheel (tests/test_prepare.py fetches it)')
    (tmp_path / good[0].name).write_bytes(good[0].read_bytes()[:5000])
    try:
        files = prepare.read_wheel_files('stardist', tmp_path)
    except RuntimeError as err:
        pytest.skip(f'no package index to fetch the wheel again: {err}')
    assert len(files) == 2 and 'is damaged' in capsys.readouterr().out


# ---------------------------------------------------------------- the probe: what a careless user tries next


def test_resume_from_a_weights_only_file_is_a_clear_error(run, tmp_path, capsys):
    export = tmp_path / 'export'
    assert main(['export', str(run), '--output', str(export), '--formats', 'safetensors']) == 0
    assert train(tmp_path / 'r', '--resume', str(export / 'model.safetensors')) == 2
    assert 'holds weights only, no training state' in error(capsys) and not (tmp_path / 'r').exists()


def test_ctrl_c_says_what_is_kept(tmp_path, monkeypatch, capsys):
    from hsresnet.classification.task import ClassificationTask

    calls = {'n': 0}
    original = ClassificationTask.training_step

    def interrupt_in_epoch_2(self, model, batch):
        calls['n'] += 1
        if calls['n'] == 3:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationTask, 'training_step', interrupt_in_epoch_2)
    folder = tmp_path / 'r'
    assert train(folder, '--epochs', '2') == 130
    assert 'interrupted; the last complete checkpoint' in error(capsys)


def test_binary_and_non_mapping_recipes(tmp_path, capsys):
    binary = tmp_path / 'b.yaml'
    binary.write_bytes(b'\xff\xfe\x00\x01')
    listing = tmp_path / 'l.yaml'
    listing.write_text('- 1\n- 2\n')
    for path in (binary, listing, tmp_path):
        assert train(tmp_path / 'r', '-c', str(path)) == 2
        assert 'config file' in error(capsys)


def test_study_output_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    (tmp_path / 'recipe.yaml').write_text(yaml.safe_dump({'epochs': 1}))
    study = {'experiments': {'e': {'task': 'classify', 'recipe': 'recipe.yaml', 'models': [{'model': 'resnet26_small'}],
                                   'input': {'size': 28, 'in_chans': 1, 'num_classes': 10}}}}  # fmt: skip
    (tmp_path / 'study.yaml').write_text(yaml.safe_dump(study))
    assert main(['study', 'run', str(tmp_path / 'study.yaml'), '--output', str(blocker), '--no-progress']) == 2
    assert 'a file is in the way' in error(capsys)


def test_a_launchers_log_and_record_do_not_block_the_run_it_starts(tmp_path):
    """`hsresnet study` writes log.txt and study_run.json into a run's folder before the run starts."""
    folder = tmp_path / 'study' / 'seed0'
    folder.mkdir(parents=True)
    (folder / 'log.txt').write_text('$ hsresnet train ...\n')
    (folder / 'study_run.json').write_text('{}')
    assert train(folder) == 0
    assert {'log.txt', 'study_run.json', 'config.json', 'summary.json'} <= {p.name for p in folder.iterdir()}
    assert (folder / 'log.txt').read_text() == '$ hsresnet train ...\n'  # the launcher's log is never removed


@pytest.mark.parametrize('task', ['classification.data', 'classification.predict', 'detection.datasets',
                                  'detection.predict', 'segmentation.data', 'segmentation.predict'])  # fmt: skip
def test_every_task_reads_16_bit_and_transparent_images_the_same_way(tmp_path, task):
    """One image reader (``hsresnet.images.open_image``) in every task's training data and prediction: a 16-bit TIFF
    is stretched min..max, not clipped to white, and transparency is composited over white."""
    import importlib

    import numpy as np
    from PIL import Image

    from hsresnet.images import open_image

    assert importlib.import_module(f'hsresnet.{task}').open_image is open_image
    grey = np.array([[1000, 3000], [5000, 9000]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / 'a.tif')
    Image.new('RGBA', (2, 2), (0, 0, 0, 0)).save(tmp_path / 'b.png')

    def read(path):
        return np.asarray(open_image(path))

    stretched = read(tmp_path / 'a.tif')
    assert (
        stretched.shape == (2, 2, 3) and stretched[0, 0].tolist() == [0, 0, 0] and stretched[1, 1].tolist() == [255] * 3
    )
    assert 0 < stretched[0, 1, 0] < stretched[1, 0, 0] < 255
    assert (read(tmp_path / 'b.png') == 255).all()
