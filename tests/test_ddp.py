"""torchrun with 2 CPU processes (gloo) against 1 process: the same global batches give the same weights and metrics.

The model has no BatchNorm (a 1-block ViT from timm), so the only difference between the runs is where the batch
is split; augmentation is off so both see the same pixels.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from hsresnet.engine import load_weights

VIT = 'img_size=28 patch_size=7 embed_dim=32 depth=1 num_heads=2'.split()
COMMON = [
    'train', '--model', 'vit_tiny_patch16_224', '--model-kwargs', *VIT, '--train-subset', '512',
    '--val-subset', '101', '--epochs', '2', '--lr', '0.05', '--scale', '1', '1', '--ratio', '1', '1',
    '--hflip', '0', '--color-jitter', '0', '--deterministic', '--no-progress', '--no-tensorboard', '-j', '0',
    '--threads', '1',
]  # fmt: skip


def run(argv, nproc: int) -> None:
    if nproc == 1:
        cmd = [sys.executable, '-m', 'hsresnet.cli', *argv]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               '-m', 'hsresnet.cli', *argv]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / 'one', tmp_path / 'two'
    run([*COMMON, '-b', '32', '--output', str(one)], 1)
    run([*COMMON, '-b', '16', '--output', str(two)], 2)  # 2 x 16 = the same global batch of 32
    s1 = json.loads((one / 'summary.json').read_text())
    s2 = json.loads((two / 'summary.json').read_text())
    assert (s1['world_size'], s2['world_size']) == (1, 2)
    assert s1['global_batch'] == s2['global_batch'] == 32 and s1['lr'] == s2['lr']
    w1, _ = load_weights(one / 'model.safetensors')
    w2, _ = load_weights(two / 'model.safetensors')
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=2e-5, rtol=1e-4)
    # evaluation is sharded without padding and reduced by torchmetrics: all 101 images counted once
    assert abs(s1['top1'] - s2['top1']) <= 100 / 101 + 1e-6
    assert abs(s1['loss'] - s2['loss']) < 1e-3
