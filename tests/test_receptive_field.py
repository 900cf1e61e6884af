"""Receptive fields (RQ1): the measured theoretical field of known modules, the HS cascade's growth per group, the
effective field of known kernels, trained-network stages and the CLI's files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from hsresnet import HSBlock
from hsresnet.receptive_field import (
    Group,
    block_groups,
    effective_rf,
    erf_size,
    network_erf_sizes,
    plain_conv,
    theoretical_rf,
)


def test_plain_3x3_conv_has_a_3x3_theoretical_field():
    assert theoretical_rf(plain_conv(6), 6, [Group('all', 0, 6)], size=9) == [3]
    stacked = nn.Sequential(plain_conv(4), plain_conv(4))
    assert theoretical_rf(stacked, 4, [Group('all', 0, 4)], size=9) == [5]


@pytest.mark.parametrize('s', [2, 3, 5, 8])
def test_hs_groups_grow_as_the_spec_says(s):
    """y_1 is the identity (1), y_2 one 3x3 conv (3), every later group one more conv: 1 + 2 (i - 1)."""
    block, groups, by_construction = block_groups('hs', 4, s)
    assert [g.stop - g.start for g in groups] == [4, *block.out_widths] and groups[-1].stop == 4 * s
    assert by_construction == [1] + [1 + 2 * (i - 1) for i in range(2, s + 1)]
    assert theoretical_rf(block, 4 * s, groups, size=2 * s + 5) == by_construction


def test_dilation_widens_every_cascade_step():
    block = HSBlock(3, 4, dilation=2).eval()
    _, groups, _ = block_groups('hs', 3, 4)
    assert theoretical_rf(block, 12, groups, size=21) == [1, 5, 9, 13]


def test_res2net_part_is_timms_cascade_without_its_1x1s():
    block, groups, by_construction = block_groups('res2net', 4, 4)
    assert by_construction == [3, 5, 7, 1]
    assert theoretical_rf(block, 16, groups, size=15) == by_construction
    x = torch.rand(2, 16, 8, 8)
    assert block(x).shape == x.shape and torch.equal(block(x)[:, 12:], x[:, 12:])  # the last group passes


def test_effective_field_of_known_kernels():
    conv = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # uniform 5x5: the 3x3 square holds 9/25 of the mass, the 5x5 all of it
    images = torch.rand(4, 1, 15, 15)
    heat = effective_rf(conv, images, [Group('all', 0, 1)])[0]
    assert erf_size(heat, 0.95) == 5 and erf_size(heat, 0.3) == 3
    with torch.no_grad():
        conv.weight.fill_(0.001)
        conv.weight[0, 0, 2, 2] = 1.0  # a peaked kernel: the centre alone holds 1 / 1.024 of the mass
    heat = effective_rf(conv, images, [Group('all', 0, 1)])[0]
    assert erf_size(heat, 0.95) == 1 and erf_size(heat, 0.99) == 5


def test_erf_size_of_synthetic_maps():
    heat = torch.zeros(11, 11)
    heat[5, 5] = 1.0
    assert erf_size(heat) == 1
    heat[5, 9] = 1.0  # half the mass 4 px right of the centre
    assert erf_size(heat, 0.5) == 1 and erf_size(heat, 0.9) == 9
    assert erf_size(torch.zeros(5, 5)) == 0


def test_network_stages_get_one_size_per_sampled_channel():
    import timm

    kwargs = dict(in_chans=1, num_classes=10, channels=[8, 16, 32, 64], w=16, s=2)
    model = timm.create_model('hs_resnet26_small', zero_init_last=False, **kwargs)  # residual branches live
    sizes = network_erf_sizes(model, torch.randn(8, 1, 33, 33), ['layer1', 'layer4'], channels=5)
    assert list(sizes) == ['layer1', 'layer4'] and all(len(v) == 5 for v in sizes.values())
    assert all(v % 2 == 1 and 1 <= v <= 33 for vs in sizes.values() for v in vs)
    assert min(sizes['layer4']) > max(sizes['layer1'])  # stage 4 sees far more of the image than stage 1


def test_cli_block_writes_table_and_heat_maps(tmp_path, capsys):
    from hsresnet.cli import main

    args = ['receptive-field', 'block', '--width', '4', '--s', '3', '--images', '8', '--inits', '1', '--size', '15']
    assert main([*args, '--output', str(tmp_path)]) == 0
    rows = json.loads((tmp_path / 'block_erf.json').read_text())['rows']
    assert [(r['block'], r['group']) for r in rows] == [
        ('conv', 'all'), ('res2net', 'y_1'), ('res2net', 'y_2'), ('res2net', 'x_3'),
        ('hs', 'y_1'), ('hs', 'y_{2,1}'), ('hs', 'y_3'),
    ]  # fmt: skip
    assert all(r['theoretical_rf'] == r['theoretical_rf_by_construction'] for r in rows)
    assert all(1 <= r['erf_size'] <= r['theoretical_rf'] for r in rows)
    assert (tmp_path / 'block_erf.png').stat().st_size > 0 and (tmp_path / 'block_erf.csv').is_file()
    assert main([*args, '--size', '14', '--output', str(tmp_path)]) == 2
    assert 'odd size' in capsys.readouterr().err


def test_cli_network_on_a_trained_classifier(tmp_path):
    from hsresnet.cli import main

    run = tmp_path / 'run'
    train = ['train', '--model', 'resnet26_small', '--model-kwargs', 'channels=[8,16,32,64]', '--train-subset', '64',
             '--val-subset', '64', '--epochs', '1', '-b', '32', '--no-progress', '--no-tensorboard', '-j', '0',
             '--threads', '1', '--output', str(run)]  # fmt: skip
    assert main(train) == 0
    args = ['receptive-field', 'network', str(run), '--channels', '3', '--images', '2', '--size', '33']
    assert main([*args, '--output', str(tmp_path / 'rf')]) == 0
    result = json.loads((tmp_path / 'rf' / 'network_erf.json').read_text())
    sizes = result['models']['resnet26_small']['stages']
    assert list(sizes) == ['layer1', 'layer2', 'layer3', 'layer4'] and all(len(v) == 3 for v in sizes.values())
    assert [r['stage'] for r in result['summary']] == list(sizes)
    assert (tmp_path / 'rf' / 'network_erf.png').is_file() and (tmp_path / 'rf' / 'network_erf_summary.csv').is_file()
