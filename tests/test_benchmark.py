"""`hsresnet benchmark`: a real (tiny) run through the CLI, its ratios, files and the budget solver."""

import argparse
import csv
import ctypes
import json
import statistics

import pytest
import torch

from hsresnet.benchmark import (
    _meta_model,
    add_arguments,
    budget_width,
    check_paths,
    count_macs,
    paired_ratio,
    peak_memory,
    plot_sweep,
    print_sweep_markdown,
    resolve_paths,
)
from hsresnet.cli import main
from hsresnet.optimize import fast_bf16_available


def test_benchmark_cli_inference_and_train(tmp_path, capsys):
    """Three paths in one run: every model (baseline and reference included) goes through every path, each ratio
    refers to resnet50 through the same path; training runs the torch path only."""
    out = tmp_path / 'r.json'
    args = ['benchmark', '-m', 'hs_resnet26', '--baselines', '', '--paths', 'eager', 'optimized', 'onnxruntime',
            '-b', '2', '--img-size', '32',
            '--warmup', '1', '--repeats', '2', '--threads', '1', '--num-classes', '10',
            '--results-file', str(out), '--csv', str(tmp_path / 'r.csv')]  # fmt: skip
    assert main(args) == 0
    data = json.loads(out.read_text())
    rows = {(r['model'], r['path'], r['bench']): r for r in data['results']}
    assert len(rows) == len(data['results'])  # one row per model, path and bench
    models = ('resnet50', 'hs_resnet26', 'hs_resnet26@reference')
    assert set(rows) == {(m, p, 'inference') for m in models for p in ('eager', 'optimized', 'onnxruntime')} | {
        (m, 'eager', 'train') for m in models
    }
    assert data['meta']['paths'] == ['eager', 'optimized', 'onnxruntime']
    for m in models:  # each path applied to each model, not to the HS model only
        eager, opt = rows[m, 'eager', 'inference'], rows[m, 'optimized', 'inference']
        assert eager['runtime'] not in ('OptimizedModel', 'onnxruntime.InferenceSession')
        assert opt['runtime'] == 'OptimizedModel' and opt['batchnorm_layers'] < eager['batchnorm_layers']
        assert rows[m, 'onnxruntime', 'inference']['runtime'] == 'onnxruntime.InferenceSession'
        for p in ('optimized', 'onnxruntime'):  # the same arithmetic through every path
            assert rows[m, p, 'inference']['gmacs'] == eager['gmacs']
            assert rows[m, p, 'inference']['param_count_m'] == eager['param_count_m']
    for p in ('eager', 'optimized', 'onnxruntime'):  # the ratio base is 1 in every path
        base = rows['resnet50', p, 'inference']
        assert base['samples_per_sec_ratio'] == pytest.approx(1.0) and base['gmac_per_sec_ratio'] == pytest.approx(1.0)
        assert base['samples_per_sec_paired_ratio'] == 1.0 and base['gmac_per_sec_paired_ratio'] == 1.0
    base = rows['resnet50', 'eager', 'inference']
    hs, ref = rows['hs_resnet26', 'eager', 'inference'], rows['hs_resnet26@reference', 'eager', 'inference']
    assert hs['gmacs'] == pytest.approx(ref['gmacs']) and hs['param_count_m'] == ref['param_count_m']
    assert hs['gmacs'] < base['gmacs']  # a 26-layer net on a 10-class head costs less than ResNet-50
    for r in data['results']:
        path_base = rows['resnet50', r['path'], r['bench']]
        assert r['samples_per_sec'] > 0 and r['step_time_ms'] > 0
        assert r['samples_per_sec'] == pytest.approx(r['batch_size'] / r['step_time_ms'] * 1e3)
        assert r['gmac_per_sec'] == pytest.approx(r['gmacs'] * r['samples_per_sec'])
        assert (r['peak_mem_mb_per_image'] is None) == (r['path'] == 'onnxruntime')
        assert r['peak_mem_mb_per_image'] is None or r['peak_mem_mb_per_image'] > 0
        # ratios within the path: to the ratio base through the same path, round by round
        assert r['samples_per_sec_ratio'] == pytest.approx(r['samples_per_sec'] / path_base['samples_per_sec'])
        per_round = [b / t for t, b in zip(r['step_times_ms'], path_base['step_times_ms'])]
        assert r['samples_per_sec_paired_ratio'] == pytest.approx(statistics.median(per_round), rel=1e-3)
        assert len(r['step_times_ms']) == 2
        assert min(r['step_times_ms']) == pytest.approx(r['step_time_ms_min'], abs=1e-3)
        q1, q3 = r['gmac_per_sec_paired_q1'], r['gmac_per_sec_paired_q3']
        assert q1 <= r['gmac_per_sec_paired_ratio'] <= q3
    assert base['gmac_per_sec_paired_ratio'] == 1.0 and base['step_time_ms_paired_ratio'] == 1.0
    assert hs['step_time_ms_paired_q1'] <= hs['step_time_ms_paired_ratio'] <= hs['step_time_ms_paired_q3']
    assert rows['hs_resnet26', 'eager', 'train']['gmacs'] == pytest.approx(3 * hs['gmacs'])
    assert data['meta']['torch'] == torch.__version__ and data['meta']['device'] == 'cpu'
    assert data['meta']['matmul_gmac_per_sec']['float32'] > 0 and 'cpu_capability' in data['meta']
    with open(tmp_path / 'r.csv') as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(data['results']) and 'step_times_ms' not in csv_rows[0]
    assert 'gmac_per_sec_paired_ratio' in csv_rows[0]
    assert [r['path'] for r in csv_rows] == [r['path'] for r in data['results']]
    printed = capsys.readouterr().out
    assert 'hs_resnet26@reference' in printed and 'GMAC/s x' in printed
    table = printed[printed.index('-- images/s x resnet50 through the same path') :].splitlines()
    assert table[1].split() == ['path', 'resnet50', 'img/s', *models]
    assert [line.split()[0] for line in table[2:5]] == ['eager', 'optimized', 'onnxruntime']
    assert all(line.split()[2] == '1.000' for line in table[2:5])  # resnet50's column: 1 in every path
    assert 'note: optimized, onnxruntime: inference only, not in train' in printed


def signal_stack() -> tuple:
    from hsresnet.benchmark import _SignalStack

    stack = _SignalStack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    return stack.ss_sp, stack.ss_flags, stack.ss_size


def test_kept_signal_stack_puts_the_old_one_back():
    from hsresnet.benchmark import _SignalStack, kept_signal_stack

    before = signal_stack()
    other = ctypes.create_string_buffer(65536)
    with kept_signal_stack():
        assert ctypes.CDLL(None).sigaltstack(ctypes.byref(_SignalStack(ctypes.addressof(other), 0, 65536)), None) == 0
        assert signal_stack()[0] == ctypes.addressof(other)
    assert signal_stack() == before


def test_benchmark_openvino_paths(tmp_path):
    """OpenVINO in fp32 and in bf16 (where the CPU has native bf16: the row says which precision ran), every model
    through both, the signal stack kept."""
    pytest.importorskip('openvino')
    out = tmp_path / 'r.json'
    args = ['benchmark', '-m', 'hs_resnet26', '--baselines', '', '--ratio-base', 'resnet18', '--no-reference',
            '--paths', 'eager', 'openvino', 'openvino_bf16', '--bench', 'inference', '-b', '2', '--img-size', '32',
            '--warmup', '1',
            '--repeats', '2', '--threads', '1', '--num-classes', '10', '--no-memory',
            '--results-file', str(out)]  # fmt: skip
    stack = signal_stack()
    assert main(args) == 0
    # OpenVINO leaves the thread on a signal stack it freed; a SIGCHLD handler (torch's DataLoader) then segfaults
    assert signal_stack() == stack
    rows = {(r['model'], r['path']): r for r in json.loads(out.read_text())['results']}
    paths = ('eager', 'openvino', 'openvino_bf16')
    assert set(rows) == {(m, p) for m in ('resnet18', 'hs_resnet26') for p in paths}
    bf16 = 'bf16' if fast_bf16_available() else 'f32'
    for m in ('resnet18', 'hs_resnet26'):
        assert rows[m, 'openvino']['runtime'] == 'openvino.CompiledModel(f32)'
        assert rows[m, 'openvino_bf16']['runtime'] == f'openvino.CompiledModel({bf16})'
        for p in ('openvino', 'openvino_bf16'):
            assert rows[m, p]['samples_per_sec'] > 0 and rows[m, p]['peak_mem_mb_per_image'] is None
            assert rows['resnet18', p]['samples_per_sec_paired_ratio'] == 1.0


@pytest.mark.slow
def test_benchmark_optimized_compiled_path_compiles_every_model(tmp_path):
    """``optimize(model, compile=True)`` for the baseline and the HS model alike, BN folded in both."""
    out = tmp_path / 'r.json'
    args = ['benchmark', '-m', 'hs_resnet26', '--baselines', '', '--no-reference', '--paths', 'optimized_compiled',
            '--bench', 'inference', '-b', '2', '--img-size', '32', '--warmup', '1', '--repeats', '2', '--threads', '2',
            '--num-classes', '10', '--no-memory', '--results-file', str(out)]  # fmt: skip
    assert main(args) == 0
    rows = {r['model']: r for r in json.loads(out.read_text())['results']}
    assert set(rows) == {'resnet50', 'hs_resnet26'}
    for row in rows.values():
        assert row['path'] == 'optimized_compiled' and row['runtime'] == 'OptimizedModel(OptimizedModule)'
        assert row['batchnorm_layers'] == 0 and row['samples_per_sec'] > 0
    assert rows['resnet50']['samples_per_sec_paired_ratio'] == 1.0


@pytest.mark.parametrize('path', ['onnxruntime', 'openvino', 'openvino_bf16', 'optimized', 'optimized_compiled'])
def test_benchmark_training_refuses_inference_only_paths(path):
    with pytest.raises(SystemExit, match=f'--bench train runs the torch paths only .*; {path} is inference only'):
        main(['benchmark', '-m', 'hs_resnet26', '--bench', 'train', '--paths', 'eager', path])


@pytest.mark.parametrize('path', ['openvino', 'openvino_bf16'])
def test_openvino_paths_refuse_a_gpu(path):
    pytest.importorskip('openvino')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(['--paths', 'eager', path])
    with pytest.raises(SystemExit, match=f'the {path} path runs on the CPU; use --device cpu'):
        check_paths(resolve_paths(args), args, torch.device('cuda'))


def test_benchmark_shorthand_flags_name_paths():
    def paths(*argv):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return resolve_paths(parser.parse_args(list(argv)))

    assert paths() == ['eager']
    assert paths('--amp', '--channels-last') == paths('--paths', 'amp_channels_last') == ['amp_channels_last']
    assert paths('--channels-last') == ['channels_last']
    assert paths('--optimized', '--onnxruntime') == ['eager', 'optimized', 'onnxruntime']
    assert paths('--torchcompile', 'max-autotune') == ['eager', 'compiled']
    assert paths('--paths', 'onnxruntime', 'eager', '--amp') == ['onnxruntime', 'eager', 'amp']
    assert paths('--paths', 'eager', 'optimized', '--optimized') == ['eager', 'optimized']


def test_paired_ratio_follows_the_rounds_where_the_ratio_of_medians_mixes_them():
    """The machine is 3x slower in the second half of the run; the model is 0.8x the baseline's rate in every round
    but one, where it lost another 10 %. The medians of the two columns come from different phases, the paired
    ratio does not."""
    drift = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0]
    base_times = list(drift)
    model_times = [1.25 * d for d in drift]
    model_times[2] *= 1.1
    assert statistics.median(base_times) / statistics.median(model_times) == pytest.approx(0.78, abs=0.005)
    median, q1, q3 = paired_ratio(model_times, base_times, work_ratio=1.0)
    assert (median, q1, q3) == pytest.approx((0.8, 0.8, 0.8))  # one odd round of six moves neither quartile
    assert paired_ratio([1.25] * 3, [1.0] * 3, work_ratio=1.1)[0] == pytest.approx(0.88)  # 10 % more MACs per step
    assert paired_ratio([2.0], [1.0], 1.0) == (0.5, 0.5, 0.5)
    assert paired_ratio(model_times, base_times)[0] == pytest.approx(1.25)  # step time: the model's over the base's


def test_benchmark_refuses_unknown_model():
    with pytest.raises(SystemExit, match='(?i)unknown model'):
        main(['benchmark', '-m', 'hs_resnet_does_not_exist', '--baselines', ''])


def test_budget_width_matches_resnet50_budget():
    """The w closest to ResNet-50's MACs (4.09 G): the spec's presets for s = 4 and 5, and within 10 % for all s."""
    from hsresnet.complexity import hs_resnet_complexity

    target = count_macs(_meta_model('resnet50', {}))
    assert target == pytest.approx(4.09e9, rel=0.01)
    assert budget_width(4, target) == 22
    assert budget_width(5, target) == 18
    widths = [budget_width(s, target) for s in range(2, 9)]
    assert widths == sorted(widths, reverse=True)  # more groups, narrower groups
    for s, w in zip(range(2, 9), widths):
        assert hs_resnet_complexity(w, s, 50).macs == pytest.approx(target, rel=0.1)


def test_peak_memory_counts_a_known_allocation():
    def step():
        a = torch.empty(4 * 2**20, dtype=torch.uint8)  # 4 MiB, freed at return
        b = torch.empty(2 * 2**20, dtype=torch.uint8)
        del a, b

    peak = peak_memory(step, torch.device('cpu'))
    assert 6 * 2**20 <= peak < 7 * 2**20


def sweep_rows():
    """Rows as bench_group writes them for resnet50 and two HS models (s = 2, 5) at batch 1 and 8."""
    rows, specs = [], [{'name': 'resnet50'}]
    for name, s, scale in [('resnet50', None, 1.0), ('a', 2, 0.9), ('b', 5, 0.8)]:
        if s is not None:
            specs.append({'name': name, 's': s})
        for batch in (1, 8):
            row = {'model': name, 'batch_size': batch, 'gmac_per_sec': 10 * scale, 'samples_per_sec': batch * scale,
                   'step_time_ms': 100 / scale, 'param_count_m': 25.0, 'gmacs': 4.0}  # fmt: skip
            for key, ratio, spread in (('step_time_ms', 1 / scale, 0.01), ('gmac_per_sec', scale, 0.02)):
                row.update({f'{key}_paired_ratio': ratio, f'{key}_paired_q1': ratio - spread,
                            f'{key}_paired_q3': ratio + spread})  # fmt: skip
            rows.append(row)
    return rows, specs


def test_plot_sweep_writes_png(tmp_path):
    rows, specs = sweep_rows()
    path = tmp_path / 'sweep.png'
    meta = {'device': 'cpu', 'cpu': 'test', 'torch_threads': 1, 'date_utc': 'now'}
    plot_sweep(rows, specs, 8, str(path), meta)
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_sweep_markdown_shows_paired_ratios(capsys):
    rows, specs = sweep_rows()
    print_sweep_markdown(rows, specs, 8)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    assert [line.split(' | ')[0] for line in lines] == ['| model', '| resnet50', '| a', '| b']
    assert lines[3].split(' | ')[5] == '1.25 (1.24-1.26)'  # b's batch-1 latency: 1 / 0.8 of resnet50's, paired
    assert lines[3].rstrip(' |').split(' | ')[-1] == '0.80 (0.78-0.82)'  # b's GMAC/s at batch 8
