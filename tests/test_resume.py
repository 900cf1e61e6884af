"""SIGKILL in the middle of an epoch, then --resume: the final weights equal those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hsresnet.cli import main
from hsresnet.engine import load_checkpoint, load_weights, save_checkpoint

ARGS = [
    'train', '--model', 'hs_resnet26_small', '--model-kwargs', 'channels=[8,16,32,64]', 'w=16', 's=2',
    '--train-subset', '768', '--val-subset', '128', '-b', '32', '--epochs', '3', '--lr', '0.1',
    '--hflip', '0.5', '--scale', '0.6', '1', '--deterministic', '--seed', '7',
    '--no-progress', '--no-tensorboard', '-j', '0', '--threads', '1',
]  # fmt: skip


def test_sigkill_mid_epoch_then_resume(tmp_path):
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    assert main([*ARGS, '--output', str(full)]) == 0

    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.Popen(
        [sys.executable, '-m', 'hsresnet.cli', *ARGS, '--output', str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 600
        while not (killed / 'last.state.pt').exists():  # epoch 1 done and saved
            assert proc.poll() is None, 'the run ended before its first checkpoint'
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # into epoch 2
        assert proc.poll() is None, 'the run finished before it could be killed'
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    _, state, _ = load_checkpoint(killed)
    assert 1 <= state['epoch'] < 3  # killed with work left
    assert not (killed / 'model.safetensors').exists()

    assert main([*ARGS, '--output', str(killed), '--resume', str(killed)]) == 0
    a, _ = load_weights(full / 'model.safetensors')
    b, _ = load_weights(killed / 'model.safetensors')
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    csv_a = (full / 'metrics.csv').read_text().splitlines()
    csv_b = (killed / 'metrics.csv').read_text().splitlines()
    assert len(csv_b) == 4
    val_a = [row.split(',')[-2] for row in csv_a]
    val_b = [row.split(',')[-2] for row in csv_b]
    assert val_a == val_b  # the same validation metric every epoch
    assert Path(killed / 'summary.json').is_file()


@pytest.mark.parametrize('workers', ['0', '2'])
def test_crash_after_a_recovery_checkpoint_resumes_mid_epoch(tmp_path, monkeypatch, capsys, workers):
    """--recovery-interval: a crash in the middle of epoch 2 loses only the steps after the last recovery point;
    the resumed run skips the batches already trained on and ends with the uninterrupted run's weights and metrics,
    also with data workers drawing the random crops and flips."""
    from hsresnet.classification.task import ClassificationTask

    args = [*ARGS, '--recovery-interval', '5']  # 24 batches per epoch: recovery points at steps 5, 10, ... 35
    args[args.index('-j') + 1] = workers
    full, crashed = tmp_path / 'full', tmp_path / 'crashed'
    assert main([*args, '--output', str(full)]) == 0

    calls = {'n': 0}
    original = ClassificationTask.training_step

    def crash_at_batch_37(self, model, batch):
        calls['n'] += 1
        if calls['n'] == 24 + 13:  # epoch 2, batch 13
            raise RuntimeError('simulated crash')
        return original(self, model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(ClassificationTask, 'training_step', crash_at_batch_37)
        with pytest.raises(RuntimeError, match='simulated crash'):
            main([*args, '--output', str(crashed)])
    _, state, _ = load_checkpoint(crashed)
    assert (state['epoch'], state['batch'], state['global_step']) == (1, 11, 35)

    capsys.readouterr()
    assert main([*args, '-b', '16', '--output', str(crashed), '--resume', str(crashed)]) != 0
    assert 'saved in the middle of an epoch with batch_size=32' in capsys.readouterr().err
    weights, state, meta = load_checkpoint(crashed)  # the same checkpoint, as if saved by 2 torchrun processes
    save_checkpoint(
        tmp_path / 'two' / 'last', SimpleNamespace(state_dict=lambda: weights), {**state, 'world_size': 2}, meta
    )
    assert main([*args, '--output', str(tmp_path / 'two'), '--resume', str(tmp_path / 'two')]) != 0
    assert 'saved in the middle of an epoch with 2 processes' in capsys.readouterr().err
    assert main([*args, '--output', str(crashed), '--resume', str(crashed)]) == 0
    a, _ = load_weights(full / 'model.safetensors')
    b, _ = load_weights(crashed / 'model.safetensors')
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a = (full / 'metrics.csv').read_text().splitlines()
    rows_b = (crashed / 'metrics.csv').read_text().splitlines()
    header = rows_a[0].split(',')
    compared = [header.index(c) for c in header if c.startswith(('train_loss', 'val_'))]
    assert len(compared) >= 2 and len(rows_b) == len(rows_a) == 4
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        assert [ra.split(',')[j] for j in compared] == [rb.split(',')[j] for j in compared]
