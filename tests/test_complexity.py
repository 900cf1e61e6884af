"""Closed-form params/MACs (hsresnet.complexity) against FlopCounterMode counts of built modules, and the CLI."""

import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hsresnet import HSBlock, HSBottleneck, HSResNet, HSStridedBlock
from hsresnet.cli import main
from hsresnet.complexity import (
    D_VARIANT_KWARGS,
    Complexity,
    bottleneck_complexity,
    count_complexity,
    count_timm_model,
    hs_block_complexity,
    hs_resnet_breakdown,
    hs_resnet_complexity,
    preset_complexities,
    solve_budget,
    strided_block_complexity,
)
from hsresnet.models import LAYOUTS, PRESETS

DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'complexity.md'
WS = [(13, 7), (9, 3), (5, 2), (1, 2), (7, 8), (18, 5), (3, 4), (16, 6), (11, 5), (2, 9)]


def count_module(module: nn.Module, *shape: int) -> Complexity:
    """FlopCounterMode on a zero input of ``shape`` on the module's device (meta: no compute)."""
    device = next(module.parameters()).device
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        module.eval()(torch.zeros(*shape, device=device))
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return Complexity(sum(p.numel() for p in module.parameters()), flops // 2)


def widths(width: int, s: int) -> list:
    """The spec's recurrence, written again here: c_2 = width, c_i = width + floor(c_{i-1} / 2)."""
    out = [width]
    while len(out) < s - 1:
        out.append(width + out[-1] // 2)
    return out


# --- blocks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('width,s', WS)
def test_hs_block_closed_form_equals_count(width, s):
    h, w = 7, 5
    counted = count_module(HSBlock(width, s), 1, s * width, h, w)
    closed = hs_block_complexity(width, s, (h, w))
    assert closed == counted
    cs = widths(width, s)
    assert closed.params == sum(9 * c * c + 2 * c for c in cs)
    assert closed.macs == h * w * sum(9 * c * c for c in cs)


@pytest.mark.parametrize('width,s', WS)
def test_hs_block_between_res2net_and_dense(width, s):
    weights = hs_block_complexity(width, s, 1).macs  # 1x1 map: MACs = conv weights
    res2net, dense = 9 * (s - 1) * width**2, 9 * (s * width) ** 2
    assert res2net <= weights < dense
    assert (weights == res2net) == (s == 2 or width == 1)  # from s = 3 on the forwarded half adds channels


@pytest.mark.parametrize('down', ['pool_conv', 'conv'])
@pytest.mark.parametrize('width,s', [(13, 7), (9, 3), (5, 2), (18, 5)])
@pytest.mark.parametrize('stride,dilation,size', [(2, 1, (9, 6)), (2, 1, (1, 1)), (1, 2, (7, 4))])
def test_strided_block_closed_form_equals_count(width, s, down, stride, dilation, size):
    block = HSStridedBlock(width, s, stride=stride, dilation=dilation, down=down)
    assert strided_block_complexity(width, s, size, stride, down) == count_module(block, 1, s * width, *size)


BOTTLENECKS = [(64, 64, 1, True), (256, 128, 2, True), (512, 128, 1, False)]


@pytest.mark.parametrize('inplanes,planes,stride,shortcut', BOTTLENECKS)
@pytest.mark.parametrize('w,s,down', [(13, 7, 'pool_conv'), (9, 3, 'conv'), (26, 2, 'pool_conv')])
def test_bottleneck_closed_form_equals_count(inplanes, planes, stride, shortcut, w, s, down):
    downsample = None
    if shortcut:
        downsample = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))
    block = HSBottleneck(inplanes, planes, stride, downsample, base_width=w, s=s, down=down)
    closed = bottleneck_complexity(inplanes, planes, w, s, (11, 6), stride, stride > 1, down, shortcut)
    assert closed == count_module(block, 1, inplanes, 11, 6)


# --- whole networks -------------------------------------------------------------------------------------------


def counted_hs_resnet(depth: int, input_size, **kwargs) -> Complexity:
    with torch.device('meta'):
        model = HSResNet(LAYOUTS[depth], **kwargs)
    return count_complexity(model, input_size)


NETWORKS = [
    dict(w=13, s=7),
    dict(w=9, s=3),
    dict(w=5, s=2),
    dict(w=18, s=5, down='conv'),
    dict(w=13, s=7, down='conv', output_stride=8),
    dict(w=11, s=5, output_stride=16, input_size=(45, 29)),
    dict(w=18, s=5, **D_VARIANT_KWARGS),
    dict(w=9, s=3, output_stride=8, input_size=(33, 50), **D_VARIANT_KWARGS),
    dict(w=16, s=4, stem_type='deep', stem_width=24),
    dict(w=24, s=4, small_input=True, channels=(32, 64, 128, 256), input_size=(28, 28)),
    dict(w=13, s=3, small_input=True, output_stride=16, input_size=(31, 17), **D_VARIANT_KWARGS),
    dict(w=7, s=6, num_classes=0, in_chans=1, input_size=(23, 64)),
    dict(w=64, s=2, num_classes=37, in_chans=5, channels=(16, 32, 64, 128), input_size=(1, 3)),
    dict(w=20, s=8, input_size=(65, 47)),
]


@pytest.mark.parametrize('kwargs', NETWORKS, ids=lambda kw: '-'.join(f'{k}={v}' for k, v in kw.items()))
def test_network_closed_form_equals_count(kwargs):
    kwargs = {'input_size': (37, 51), **kwargs}
    input_size = kwargs.pop('input_size')
    closed = hs_resnet_complexity(depth=26, input_size=input_size, **kwargs)
    assert closed == counted_hs_resnet(26, input_size, **kwargs)


@pytest.mark.parametrize('depth', [50, 101, 152])
@pytest.mark.parametrize('w,s', [(13, 7), (18, 5)])
def test_each_depth_closed_form_equals_count(depth, w, s):
    assert hs_resnet_complexity(w, s, depth, input_size=(40, 56)) == counted_hs_resnet(depth, (40, 56), w=w, s=s)


def test_registered_models_at_224_equal_closed_form():
    """The registered presets and the d variant at 224 px, built by name the way users build them."""
    for name, (w, s) in PRESETS.items():
        assert count_timm_model(f'hs_resnet50_{name}') == hs_resnet_complexity(w, s, 50)
    assert count_timm_model('hs_resnet50d', w=13, s=7) == hs_resnet_complexity(13, 7, 50, **D_VARIANT_KWARGS)
    small = dict(w=24, s=4, small_input=True, channels=(32, 64, 128, 256), input_size=32)
    assert count_timm_model('hs_resnet26_small', 32) == hs_resnet_complexity(depth=26, **small)


def test_meta_count_equals_real_forward_count():
    model = HSResNet(LAYOUTS[26], w=9, s=3, num_classes=10)
    assert count_complexity(model, (35, 29)) == counted_hs_resnet(26, (35, 29), w=9, s=3, num_classes=10)
    assert model.training  # the count restores the mode


def test_breakdown_parts_and_avg_down_is_free():
    parts = hs_resnet_breakdown(18, 5, 50)
    assert list(parts) == ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    assert parts['stem'] == Complexity(7 * 7 * 3 * 64 + 128, 7 * 7 * 3 * 64 * 112 * 112)
    assert parts['fc'] == Complexity(2048 * 1000 + 1000, 2048 * 1000)
    assert hs_resnet_complexity(avg_down=True) == hs_resnet_complexity(avg_down=False)
    # dilation keeps the resolution: output stride 8 costs more MACs with the very same params
    os8 = hs_resnet_complexity(output_stride=8)
    assert os8.params == hs_resnet_complexity().params and os8.macs > 2 * hs_resnet_complexity().macs


# the spec's table (docs/complexity.md): params (M) / GMACs of HS-ResNet-50, pool_conv, 1000 classes, 224 px
SPEC_TABLE = {
    4: [(14.0, 2.17), (18.1, 2.90), (20.3, 3.29), (25.0, 4.14), (33.0, 5.57)],
    5: [(16.9, 2.70), (22.4, 3.69), (25.4, 4.22), (32.0, 5.41), (43.2, 7.42)],
    6: [(19.9, 3.23), (26.9, 4.50), (30.7, 5.18), (39.2, 6.71), (53.8, 9.33)],
    8: [(25.9, 4.32), (36.0, 6.15), (41.5, 7.14), (54.0, 9.38), (75.5, 13.24)],
}


def test_spec_table_reproduced():
    for s, row in SPEC_TABLE.items():
        for w, (mparams, gmacs) in zip([12, 16, 18, 22, 28], row):
            c = hs_resnet_complexity(w, s, 50)
            assert (round(c.mparams, 1), round(c.gmacs, 2)) == (mparams, gmacs), (w, s)


def test_reference_resnet50_count():
    ref = count_timm_model('resnet50')
    assert ref.params == 25_557_032  # torchvision/timm ResNet-50, 1000 classes
    assert round(ref.gmacs, 2) == 4.09
    hs = preset_complexities()['hs_resnet50_18w_5s'][2]
    assert abs(hs.params / ref.params - 1) < 0.01 and abs(hs.macs / ref.macs - 1) < 0.04


# --- budget solver ----------------------------------------------------------------------------------------------


def test_solve_budget_fits_and_order():
    ref = count_timm_model('resnet50')
    fits = solve_budget(ref.params, ref.macs, 0.05, range(8, 33), range(2, 9))
    assert (22, 4) in [(f.w, f.s) for f in fits] and (18, 5) in [(f.w, f.s) for f in fits]
    assert [f.distance for f in fits] == sorted(f.distance for f in fits)
    found = {(f.w, f.s) for f in fits}
    for s in range(2, 9):
        for w in range(8, 33):
            c = hs_resnet_complexity(w, s, 50)
            fits_here = abs(c.params / ref.params - 1) <= 0.05 and abs(c.macs / ref.macs - 1) <= 0.05
            assert fits_here == ((w, s) in found), (w, s)
    only_params = solve_budget(params=20e6, tolerance=0.02, w_values=[16, 18, 20], s_values=[4, 5], depth=50)
    assert all(f.macs_ratio is None and abs(f.params_ratio - 1) <= 0.02 for f in only_params)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(depth=34), 'depth=34'),
        (dict(w=0), 'w=0'),
        (dict(s=1), 's=1'),
        (dict(down='max'), "down='max'"),
        (dict(input_size=0), 'input_size=0'),
        (dict(input_size=(224, 224, 3)), 'input_size'),
        (dict(stem_type='deep_tiered'), 'stem_type'),
        (dict(output_stride=4), 'output_stride=4'),
        (dict(w=1, channels=(32, 64, 128, 256)), 'width floor'),
    ],
)
def test_bad_network_args(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        hs_resnet_complexity(**kwargs)


def test_bad_budget_and_model_name():
    with pytest.raises(ValueError, match='params=, macs='):
        solve_budget()
    with pytest.raises(ValueError, match='tolerance=1.5'):
        solve_budget(params=1e6, tolerance=1.5)
    with pytest.raises(ValueError, match="Unknown model 'resnet5'.*resnet50"):
        count_timm_model('resnet5')


# --- CLI ------------------------------------------------------------------------------------------------------


def cli(capsys, *argv: str):
    code = main(['complexity', *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_grid_markdown_csv_json(capsys):
    code, out, _ = cli(capsys)
    assert code == 0 and '| 5 | 16.9 M / 2.70 G | 22.4 M / 3.69 G | 25.4 M / 4.22 G |' in out
    code, out, _ = cli(capsys, '--depth', '26', '--w', '9', '13', '--s', '3:4', '--format', 'csv', '--stem', 'd')
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(int(r['w']), int(r['s'])) for r in rows] == [(9, 3), (13, 3), (9, 4), (13, 4)]
    for r in rows:
        expected = hs_resnet_complexity(int(r['w']), int(r['s']), 26, **D_VARIANT_KWARGS)
        assert (int(r['params']), int(r['macs'])) == (expected.params, expected.macs)
    code, out, _ = cli(capsys, '--w', '13', '--s', '7', '--input-size', '160', '96', '--format', 'json')
    data = json.loads(out)
    assert data['rows'][0]['macs'] == hs_resnet_complexity(13, 7, input_size=(160, 96)).macs


def test_cli_budget_and_presets(capsys):
    code, out, _ = cli(capsys, '--reference', 'resnet50', '--tolerance', '0.05', '--format', 'json')
    data = json.loads(out)
    assert code == 0 and data['budget_params'] == 25_557_032
    assert data['rows'][0]['distance'] <= data['rows'][-1]['distance']
    assert {(r['w'], r['s']) for r in data['rows']} >= {(22, 4), (18, 5)}
    code, out, _ = cli(capsys, '--params', '25.5e6', '--w', '18', '--s', '5', '--tolerance', '0.01')
    assert code == 0 and '| 18 | 5 | 25.42 |' in out
    code, out, _ = cli(capsys, '--macs', '1e6', '--w', '18', '--s', '5')
    assert code == 1 and '0 fit(s)' in out
    code, out, _ = cli(capsys, '--presets', '--format', 'csv')
    rows = {r['model']: r for r in csv.DictReader(io.StringIO(out))}
    assert code == 0 and set(rows) == {f'hs_resnet50_{name}' for name in PRESETS}
    assert float(rows['hs_resnet50_28w_6s']['macs_ratio']) > 2


@pytest.mark.parametrize(
    'argv,match',
    [
        (['--reference', 'resnet5'], "Unknown model 'resnet5'"),
        (['--w', '0'], 'w=0'),
        (['--s', '1'], 's=1'),
        (['--reference', 'resnet50', '--params', '1e6'], 'not both'),
        (['--presets', '--depth', '26'], '--depth 26'),
        (['--input-size', '1', '2', '3'], '--input-size'),
        (['--num-classes', '-1'], 'num_classes=-1'),
        (['--params', '1e6', '--tolerance', '2'], 'tolerance=2.0'),
    ],
)
def test_cli_bad_values_exit_2(capsys, argv, match):
    code, _, err = cli(capsys, *argv)
    assert code == 2 and match in err


BAD_SYNTAX = [['--w', 'x'], ['--w', '9:3'], ['--params', '-1'], ['--depth', '34'], ['--down', 'max']]


@pytest.mark.parametrize('argv', BAD_SYNTAX)
def test_cli_bad_syntax_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli(capsys, *argv)
    assert exc.value.code == 2 and argv[-1] in capsys.readouterr().err


def test_docs_show_the_command_output(capsys):
    """docs/complexity.md quotes commands and their output: each must still print exactly that."""
    text = DOCS.read_text()
    blocks = re.findall(r'```console\n\$ hsresnet complexity(.*?)\n(.*?)```', text, re.S)
    assert len(blocks) >= 2
    for argv, expected in blocks:
        code, out, _ = cli(capsys, *argv.split())
        assert code == 0 and out.strip() == expected.strip(), argv
