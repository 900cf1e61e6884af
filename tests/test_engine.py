"""The shared training engine: config resolution, atomic/validated checkpoints, the fit loop and its records.

The toy task trains a small conv net on a real Fashion-MNIST subset (no augmentation, no BatchNorm), so runs are
exactly reproducible and gradient accumulation can be compared with a plain large batch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hsresnet.classification.data import FashionMNIST, find_fashion_mnist
from hsresnet.engine import (
    CheckpointError,
    DistInfo,
    RecipeParser,
    add_config_argument,
    add_engine_arguments,
    amp_enabled,
    check_compatible,
    fit,
    load_checkpoint,
    load_weights,
    make_loader,
    parse_kwargs,
    save_checkpoint,
    save_weights,
)


def fmnist_tensors(n: int) -> TensorDataset:
    ds = FashionMNIST(find_fashion_mnist(), 'test')
    x = torch.from_numpy(ds.images[:n].copy()).float().div(255).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(ds.labels[:n]))


class ToyTask:
    """A BatchNorm-free conv net on 28x28 grey images."""

    main_metric = 'acc'

    def __init__(self, cfg, n_train: int = 256, n_val: int = 128):
        self.cfg = cfg
        data = fmnist_tensors(n_train + n_val)
        self.train = torch.utils.data.Subset(data, range(n_train))
        self.val = torch.utils.data.Subset(data, range(n_train, n_train + n_val))

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip

    def build_loaders(self, info):
        return (
            make_loader(self.train, self.cfg.batch_size, True, info, 0, self.cfg.seed),
            make_loader(self.val, 64, False, info, 0),
        )

    def training_step(self, model, batch):
        x, y = batch
        return {'loss': nn.functional.cross_entropy(model(x), y)}

    def evaluate(self, model, loader):
        correct = total = 0
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
        return {'acc': 100.0 * correct / total}


def engine_parser() -> argparse.ArgumentParser:
    parser = RecipeParser()
    add_config_argument(parser)
    parser.add_argument('--model', default='toy')
    parser.add_argument('--model-kwargs', nargs='*', default=[])
    add_engine_arguments(parser)
    return parser


def make_cfg(tmp_path: Path, *argv: str) -> argparse.Namespace:
    parser = engine_parser()
    base = ['--output', str(tmp_path / 'run'), '--no-progress', '--no-tensorboard', '-j', '0', '--lr', '0.05']
    base += ['--threads', '1']
    return parser.parse_args(base + list(argv))


def test_yaml_config_under_typed_flags(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('epochs: 7\nlr: 0.3\nweight-decay: 1e-5\nmodel_kwargs: {w: 16, channels: [8, 16]}\n')
    parser = engine_parser()
    cfg = parser.parse_args(['-c', str(recipe), '--lr', '0.1'])
    assert cfg.epochs == 7 and cfg.lr == 0.1 and cfg.weight_decay == 1e-5  # YAML '1e-5' coerced to float
    assert parse_kwargs(cfg.model_kwargs) == {'w': 16, 'channels': [8, 16]}
    # a flag typed with its default value still wins over the YAML
    cfg = parser.parse_args(['-c', str(recipe), '--epochs', '10'])
    assert cfg.epochs == 10
    recipe.write_text('epochz: 3\n')
    with pytest.raises(ValueError, match="unknown keys.*'epochz' -> 'epochs'"):
        parser.parse_args(['-c', str(recipe)])
    with pytest.raises(ValueError, match='key=value'):
        parse_kwargs(['w16'])


@pytest.mark.parametrize('task', ['detection', 'segmentation'])
def test_a_train_subcommand_reads_its_recipe_under_its_flags(tmp_path, task):
    """`hsresnet detect|segment train -c`: recipe over the task's defaults, typed flags over the recipe; the parser
    is left as it was (a second parse without -c gets the defaults)."""
    cli = importlib.import_module(f'hsresnet.{task}.cli')
    parser = RecipeParser()
    cli.add_arguments(parser)
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('epochs: 3\nlr: 0.3\nbackbone_kwargs: {w: 16}\n')
    cfg = parser.parse_args(['train', f'--config={recipe}', '--lr', '0.1'])
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (3, 0.1, cli.TRAIN_DEFAULTS['batch_size'])
    assert parse_kwargs(cfg.backbone_kwargs) == {'w': 16}
    cfg = parser.parse_args(['train'])
    assert (cfg.epochs, cfg.lr) == (cli.TRAIN_DEFAULTS['epochs'], None)
    recipe.write_text('epochs: 2.5\n')
    with pytest.raises(ValueError, match=r'r\.yaml: epochs: 2\.5 is not an integer'):
        parser.parse_args(['train', '-c', str(recipe)])


@pytest.mark.parametrize('native', [False, True])
def test_amp_auto_follows_native_bf16(tmp_path, monkeypatch, capsys, native):
    """`amp: auto` (YAML or `--amp auto`) autocasts only where bf16 is native; true/false/bare --amp as given."""
    fit_module = importlib.import_module('hsresnet.engine.fit')  # the package's `fit` attribute is the function
    monkeypatch.setattr(fit_module, 'fast_bf16_available', lambda device: native)
    parser = engine_parser()
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('amp: auto\n')
    cpu = torch.device('cpu')
    cfg = parser.parse_args(['-c', str(recipe)])
    assert cfg.amp == 'auto' and amp_enabled(cfg, cpu) is native
    assert amp_enabled(parser.parse_args(['--amp', 'auto']), cpu) is native
    for flags, expected in ((['--amp'], True), (['--amp', 'false'], False), ([], False)):
        assert amp_enabled(parser.parse_args(flags), cpu) is expected
    recipe.write_text('amp: true\n')
    assert amp_enabled(parser.parse_args(['-c', str(recipe)]), cpu) is True
    with pytest.raises(SystemExit):
        parser.parse_args(['--amp', 'maybe'])
    assert "one of auto, true, false; got 'maybe'" in capsys.readouterr().err


def test_run_records_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """JSON, CSV and PNG records are written to a temporary file and renamed: a write that fails part-way (here a full
    disk at the flush) leaves the previous file as it was, no temporary file, and an error naming the record."""
    import errno

    from hsresnet.engine import logs, outputs

    def full_disk(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    records = {
        'summary.json': lambda path: logs.write_json(path, {'top1': 90.0}),
        'metrics.csv': lambda path: logs.write_csv(path, [{'epoch': 1, 'loss': 0.5}]),
        'curves.png': lambda path: logs.plot_curves(path, [{'epoch': 1, 'train_loss': 0.5}], 'top1'),
    }
    for name, write in records.items():
        path = tmp_path / name
        path.write_bytes(b'the previous record')
        with monkeypatch.context() as patch:
            patch.setattr(outputs.os, 'fsync', full_disk)
            with pytest.raises(OSError, match='No space left') as caught:
                write(path)
        assert caught.value.filename == str(path)
        assert path.read_bytes() == b'the previous record' and sorted(tmp_path.glob('.*')) == []
        write(path)
        assert path.read_bytes() != b'the previous record'


def test_checkpoint_roundtrip_and_refusals(tmp_path):
    model = ToyTask.build_model(None)
    state = {'epoch': 3, 'rng': torch.get_rng_state(), 'config': {'model': 'toy'}}
    save_checkpoint(tmp_path / 'last', model, state, {'model': 'toy', 'num_classes': 10})
    weights, loaded, meta = load_checkpoint(tmp_path)  # a run directory resolves to its 'last'
    assert loaded['epoch'] == 3 and meta['model'] == 'toy'
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob('.*tmp*'))  # no temporary file left behind

    other = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    with pytest.raises(CheckpointError, match='does not fit'):
        check_compatible(other, weights, 'last', meta)

    blob = (tmp_path / 'last.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match='truncated'):
        load_weights(tmp_path / 'cut.safetensors')
    (tmp_path / 'foreign.safetensors').write_bytes(b'PK\x03\x04 not a checkpoint at all' * 10)
    with pytest.raises(CheckpointError):
        load_weights(tmp_path / 'foreign.safetensors')
    # killed between the two renames: the weights file is from another save, the state alone still resumes
    other_weights = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    save_weights(tmp_path / 'last.safetensors', other_weights, {'model': 'toy'})
    weights, loaded, _ = load_checkpoint(tmp_path / 'last')
    assert loaded['epoch'] == 3 and all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    # NaN weights (a diverged run) are refused by name
    nan_weights = {k: torch.full_like(v, float('nan')) for k, v in model.state_dict().items()}
    save_weights(tmp_path / 'nan.safetensors', nan_weights, {})
    with pytest.raises(CheckpointError, match='NaN or infinite values'):
        load_weights(tmp_path / 'nan.safetensors')
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint(tmp_path / 'missing')


def test_fit_records_and_grad_accumulation(tmp_path):
    cfg = make_cfg(tmp_path, '--epochs', '2', '-b', '32', '--deterministic', '--model-ema', '--model-ema-decay', '0.9')
    task = ToyTask(cfg)
    summary = fit(task, cfg)
    run = Path(cfg.output)
    for name in ('last.safetensors', 'last.state.pt', 'model.safetensors', 'model_ema.safetensors', 'curves.png'):
        assert (run / name).is_file(), name
    rows = (run / 'metrics.csv').read_text().splitlines()
    assert len(rows) == 3 and 'val_acc' in rows[0] and 'val_ema_acc' in rows[0]
    saved = json.loads((run / 'summary.json').read_text())
    assert saved['acc'] == summary['acc'] > 10.0  # learned something beyond chance
    assert saved['params'] == sum(p.numel() for p in task.build_model().parameters())
    assert saved['images_per_s'] > 0 and saved['wall_time_s'] > 0

    # 2 micro-batches of 16 accumulated == 1 batch of 32 (same samples, mean loss, no BatchNorm)
    cfg_a = make_cfg(tmp_path / 'a', '--epochs', '1', '-b', '32', '--deterministic')
    cfg_b = make_cfg(tmp_path / 'b', '--epochs', '1', '-b', '16', '--grad-accum-steps', '2', '--deterministic')
    fit(ToyTask(cfg_a), cfg_a)
    fit(ToyTask(cfg_b), cfg_b)
    wa, _ = load_weights(Path(cfg_a.output) / 'model.safetensors')
    wb, _ = load_weights(Path(cfg_b.output) / 'model.safetensors')
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


class NarrowNormTask(ToyTask):
    """The toy net with batch norms of 8 and 32 channels; records the norm classes the engine trains with."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 32, 3, stride=2),
            nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip

    def training_step(self, model, batch):
        self.norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.BatchNorm2d)})
        return super().training_step(model, batch)


@pytest.mark.parametrize('channels_last', [True, False])
def test_channels_last_cpu_runs_train_with_the_wide_batchnorm(tmp_path, channels_last):
    """A channels_last CPU run trains its batch norms as ``WideBatchNorm2d`` (engine/batchnorm.py), which takes only
    the narrow ones; the saved weights load into the plain model."""
    cfg = make_cfg(tmp_path, '--epochs', '1', '-b', '32', *(['--channels-last'] if channels_last else []))
    task = NarrowNormTask(cfg)
    summary = fit(task, cfg)
    assert task.norms == (['WideBatchNorm2d'] if channels_last else ['BatchNorm2d'])
    assert summary['acc'] > 10.0
    weights, _ = load_weights(Path(cfg.output) / 'model.safetensors')
    task.build_model().load_state_dict(weights)


def test_bad_resume_changes_nothing(tmp_path):
    cfg = make_cfg(tmp_path, '--epochs', '1', '-b', '64')
    fit(ToyTask(cfg), cfg)
    run = Path(cfg.output)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}

    with pytest.raises(ValueError, match='already holds a training run: pass --resume'):
        fit(ToyTask(cfg), make_cfg(tmp_path, '--epochs', '2'))
    state = run / 'last.state.pt'
    state_bytes = state.read_bytes()
    state.write_bytes(state_bytes[:100])  # truncated training state
    with pytest.raises(CheckpointError, match='truncated'):
        fit(ToyTask(cfg), make_cfg(tmp_path, '--epochs', '2', '--resume', str(run)))
    state.write_bytes(state_bytes)

    class Wider(ToyTask):
        def build_model(self):
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))

    with pytest.raises(CheckpointError, match='does not fit'):
        fit(Wider(cfg), make_cfg(tmp_path, '--epochs', '2', '--resume', str(run)))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    for name in before:  # same bytes everywhere; same mtime except the state file this test rewrote itself
        assert after[name][1] == before[name][1], name
        assert name == 'last.state.pt' or after[name][0] == before[name][0], name


def test_resume_matches_uninterrupted(tmp_path):
    """Epoch-level resume in-process (the SIGKILL version is in test_resume.py)."""
    full = make_cfg(tmp_path / 'full', '--epochs', '3', '-b', '32', '--deterministic')
    fit(ToyTask(full), full)
    part = make_cfg(tmp_path / 'part', '--epochs', '3', '-b', '32', '--deterministic')
    part.epochs = 1  # stop after one epoch, as if killed, but with the 3-epoch schedule's checkpoint
    part_cfg = argparse.Namespace(**{**vars(part), 'epochs': 3})
    task = ToyTask(part_cfg)
    # train one epoch of the 3-epoch schedule: run with epochs=3 but break after epoch 1 via a failing hook
    calls = []

    def on_epoch_start(epoch):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt

    task.on_epoch_start = on_epoch_start
    with pytest.raises(KeyboardInterrupt):
        fit(task, part_cfg)
    resumed = argparse.Namespace(**{**vars(part_cfg), 'resume': part_cfg.output})
    fit(ToyTask(resumed), resumed)
    a, _ = load_weights(Path(full.output) / 'model.safetensors')
    b, _ = load_weights(Path(part_cfg.output) / 'model.safetensors')
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = (Path(part_cfg.output) / 'metrics.csv').read_text().splitlines()
    assert len(rows) == 4  # the CSV covers the whole run after resume
    assert os.path.exists(Path(part_cfg.output) / 'summary.json')


class RandomDraws(torch.utils.data.Dataset):
    """Each item: its index and one draw from each RNG an augmentation may use."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int):
        return torch.tensor([float(i), torch.rand(()).item(), float(np.random.rand()), random.random()])


def draws_by_index(loader, epoch: int, skip_batches: int = 0) -> dict:
    """One epoch as the engine runs it (sampler epoch, skip, loader generator reseeded): index -> its draws."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip_batches * loader.batch_size
    loader.generator.manual_seed(3 + epoch)
    return {int(row[0]): row[1:].tolist() for batch in loader for row in batch}


def test_worker_augmentations_replay_after_a_mid_epoch_resume():
    """With data workers, a loader started at batch 5 (a resumed run) draws what the full epoch drew there."""
    loader = make_loader(RandomDraws(), 4, True, DistInfo(), workers=2, seed=3)
    full = draws_by_index(loader, epoch=1)
    resumed = draws_by_index(make_loader(RandomDraws(), 4, True, DistInfo(), workers=2, seed=3), 1, skip_batches=5)
    assert len(full) == 48 and len(resumed) == 48 - 5 * 4
    assert all(resumed[i] == full[i] for i in resumed)
    wrapped = loader.dataset  # WorkerSeededDataset; in the main process (-j 0) it leaves the RNGs alone
    assert isinstance(wrapped.dataset, RandomDraws) and len(wrapped) == 48
    assert not torch.equal(wrapped[3], wrapped[3]) and not torch.equal(*wrapped.__getitems__([3, 3]))
    assert len({tuple(v) for v in full.values()}) == 48  # every sample draws its own numbers ...
    other_epoch = draws_by_index(loader, epoch=2)
    assert all(other_epoch[i] != full[i] for i in full)  # ... and new ones every epoch
    plain = torch.utils.data.DataLoader(  # the same loader without the per-batch seeding: what the test guards
        RandomDraws(), 4, sampler=loader.sampler, num_workers=2, generator=torch.Generator()
    )
    plain_full, plain_resumed = draws_by_index(plain, 1), draws_by_index(plain, 1, skip_batches=5)
    assert any(plain_resumed[i] != plain_full[i] for i in plain_resumed)


_PAGE_FAULTS_OF_TRAINING_STEPS = """
import resource, sys, torch, hsresnet
from hsresnet.engine.allocator import keep_freed_memory
if sys.argv[1] == 'keep':
    assert keep_freed_memory() is True
torch.set_num_threads(1)
model = hsresnet.create_model('hs_resnet26_small', num_classes=10, in_chans=1, channels=[8, 16, 32, 64], w=8, s=3)
x = torch.randn(32, 1, 28, 28)
for _ in range(3):  # the heap grows to its working size
    model(x).sum().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    model(x).sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_keep_freed_memory_stops_page_fault_churn():
    """Training steps fault fresh pages in over and over with glibc's defaults; keep_freed_memory stops most of it."""
    import subprocess

    def faults(mode: str) -> int:
        cmd = [sys.executable, '-c', _PAGE_FAULTS_OF_TRAINING_STEPS, mode]
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])

    default, kept = faults('default'), faults('keep')
    # measured: about 40 000 faults in 5 steps with glibc's defaults, under 1 000 after the call
    assert kept * 4 < default, f'minor page faults in 5 steps: {default} with glibc defaults, {kept} after the call'


def test_one_loader_for_every_task_reads_a_run_folders_best_weights(tmp_path):
    from hsresnet.engine import load_trained_model, save_weights

    run = tmp_path / 'run'
    run.mkdir()
    meta = {'task': 'segmentation', 'model': 'tiny'}
    save_weights(run / 'last.safetensors', nn.Linear(2, 2).state_dict(), meta)
    best = nn.Linear(2, 2).state_dict()
    save_weights(run / 'model_best.safetensors', best, meta)
    model, got = load_trained_model(run, 'segmentation', lambda m, w: nn.Linear(2, 2), 'hsresnet segment train')
    assert got['checkpoint'] == str(run / 'model_best.safetensors') and not model.training
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    (run / 'model_best.safetensors').unlink()  # no final weights: the last checkpoint
    assert load_trained_model(run, 'segmentation', lambda m, w: nn.Linear(2, 2), '')[1]['checkpoint'].endswith(
        'last.safetensors'
    )
    with pytest.raises(
        ValueError, match=r"not a detection checkpoint \(task='segmentation'\).*`hsresnet detect train`"
    ):
        load_trained_model(run, 'detection', lambda m, w: nn.Linear(2, 2), 'hsresnet detect train')
