"""`hsresnet study`: planning a YAML grid (budget-solved widths, sweeps, shared runs), running it for real on tiny
Fashion-MNIST subsets (skip, resume, stale runs, submitit's local executor) and the report's statistics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hsresnet.study.plan import StudyError, load_study
from hsresnet.study.report import fastest_paths, mean_interval, verdict
from hsresnet.study.runner import command, run_study, status

TINY_RECIPE = {
    'train_subset': 128, 'val_subset': 128, 'epochs': 1, 'batch_size': 32, 'scale': [1.0, 1.0],
    'ratio': [1.0, 1.0], 'workers': 0, 'no_tensorboard': True, 'recovery_interval': 2,
}  # fmt: skip
SKELETON = {'channels': [8, 16, 32, 64]}
INPUT = {'size': 28, 'in_chans': 1, 'num_classes': 10}


def write_study(folder: Path, experiments: dict, seeds=(0, 1), recipe: dict = TINY_RECIPE) -> Path:
    (folder / 'recipe.yaml').write_text(yaml.safe_dump(recipe))
    path = folder / 'study.yaml'
    path.write_text(yaml.safe_dump({'seeds': list(seeds), 'jobs': 2, 'threads': 1, 'experiments': experiments}))
    return path


def ops_experiment(**extra) -> dict:
    return {
        'question': 'HS vs ResNet',
        'task': 'classify',
        'recipe': 'recipe.yaml',
        'input': INPUT,
        'model_kwargs': SKELETON,
        'budget': {'model': 'resnet26_small'},
        'models': [
            {'model': 'hs_resnet26_small', 'model_kwargs': {'s': 2}, 'match': 'w'},
            {'model': 'resnet26_small', 'match': 'base_width'},
        ],
        'benchmark': {'batch_size': 4, 'args': ['--repeats', 1, '--warmup', 1]},
        **extra,
    }


def test_plan_solves_widths_expands_sweeps_and_shares_runs(tmp_path):
    sweep = ops_experiment(sweep={'s': [2, 3]}, reference={'model': 'resnet26_small', 'match': 'base_width'})
    sweep['models'] = [{'model': 'hs_resnet26_small', 'match': 'w'}]
    study = load_study(write_study(tmp_path, {'ops': ops_experiment(), 's_sweep': sweep}))
    ops, swept = study.experiments['ops'], study.experiments['s_sweep']
    budget = ops.budget.complexity
    for model in ops.models + swept.models:  # every matched width lands within the default 5 % of the budget
        assert abs(model.complexity.params / budget.params - 1) <= 0.05
        assert abs(model.complexity.macs / budget.macs - 1) <= 0.05
    assert [m.own['s'] for m in swept.models] == [2, 3] and all('w' in m.own for m in swept.models)
    assert swept.reference.label == 'resnet26_small-base_width64' and ops.reference.label == ops.models[0].label
    training = [r for r in study.runs if not r.is_benchmark]
    keys = [r.key for r in training]
    assert len(keys) == len(set(keys))
    # hs s=2 and the ResNet appear in both experiments but are trained once per seed
    assert len(training) == 2 * len({m.label for m in ops.models + swept.models + [swept.reference]})
    shared = next(r for r in training if r.key == f'recipe/{ops.models[0].label}/seed1')
    assert shared.experiments == ['ops', 's_sweep'] and shared.argv[-2:] == ['--seed', '1']
    assert 'recipe.yaml@' in ' '.join(shared.identity) and '--model-kwargs' in shared.argv
    benches = [r for r in study.runs if r.is_benchmark]
    assert [r.key for r in benches] == ['benchmark/ops', 'benchmark/s_sweep']
    assert benches[0].argv[benches[0].argv.index('--ratio-base') + 1] == ops.reference.spec()


@pytest.mark.parametrize(
    'change, message',
    [
        ({'tasks': 1}, "unknown keys ['tasks']"),
        ({'task': 'regress'}, 'task must be one of'),
        ({'recipe': 'missing.yaml'}, 'recipe must name an existing recipe'),
        ({'models': []}, 'models must be a non-empty list'),
        ({'budget': None}, 'has `match:` but the experiment has no `budget:`'),
        ({'tolerance': 0.0001}, 'off the budget'),
        ({'sweep': {'s': 3}}, 'sweep maps kwargs to non-empty lists'),
    ],
)
def test_plan_refuses_bad_studies_naming_the_key(tmp_path, change, message):
    with pytest.raises(StudyError, match=message.replace('[', r'\[').replace(']', r'\]')):
        load_study(write_study(tmp_path, {'ops': ops_experiment(**change)}))


def test_plan_refuses_one_folder_for_two_different_runs(tmp_path):
    other = ops_experiment(args={'epochs': 2})
    with pytest.raises(StudyError, match='give one of the models a `name:`'):
        load_study(write_study(tmp_path, {'a': ops_experiment(), 'b': other}))


def study_cli(*args: str) -> str:
    """``hsresnet study ...`` in its own process, as a user runs it; returns its output."""
    done = subprocess.run([sys.executable, '-m', 'hsresnet.cli', 'study', *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_run_skips_finished_resumes_partial_and_reports_what_finished(tmp_path):
    out = tmp_path / 'out'
    path = write_study(tmp_path, {'ops': ops_experiment()})
    study = load_study(path)
    run = ['run', str(path), '--output', str(out), '--jobs', '2', '--threads', '1', '--no-progress']
    assert '5 run(s) finished, 0 failed' in study_cli(*run)  # 2 models x 2 seeds and the benchmark
    assert all(status(out, r) == 'done' for r in study.runs)
    assert '0 run(s) finished, 0 failed' in study_cli(*run)  # nothing left to do

    # a run killed after a checkpoint: no summary yet, its last checkpoint is resumed
    killed = next(r for r in study.runs if not r.is_benchmark)
    (out / killed.key / 'summary.json').unlink()
    assert status(out, killed) == 'partial' and command(out, killed, 1)[-2:] == ['--resume', str(out / killed.key)]
    # the report of a partly finished study counts what is there
    assert 'wrote' in study_cli('report', str(out))
    report = (out / 'report' / 'study.md').read_text()
    label = killed.model.label
    assert f'`{label}`' in report and '(1) |' in report
    rows = _csv(out / 'report' / 'runs.csv')
    assert len(rows) == 3 and {r['model'] for r in rows} == {m.label for m in study.experiments['ops'].models}

    printed = study_cli(*run)
    assert '1 run(s) finished, 0 failed' in printed and 'finished in' in printed and str(out / killed.key) in printed
    assert 'resumed from' in (out / killed.key / 'log.txt').read_text()
    assert (out / 'report' / 'ops.png').is_file()


def test_changed_recipe_makes_runs_stale_and_they_are_left_alone(tmp_path):
    path = write_study(tmp_path, {'ops': ops_experiment(models=[{'model': 'resnet26_small'}])}, seeds=[0])
    study = load_study(path)
    out = tmp_path / 'out'
    run = next(r for r in study.runs if not r.is_benchmark)
    (out / run.key).mkdir(parents=True)
    (out / run.key / 'study_run.json').write_text(json.dumps({'identity': run.identity}))
    (out / run.key / 'summary.json').write_text('{}')
    assert status(out, run) == 'done'
    (tmp_path / 'recipe.yaml').write_text(yaml.safe_dump({**TINY_RECIPE, 'epochs': 2}))
    restudy = load_study(path)
    rerun = next(r for r in restudy.runs if r.key == run.key)
    assert status(out, rerun) == 'stale'
    assert command(out, rerun, 1, fresh=True)[-1] == '--overwrite'  # --rerun-stale starts it over, not resumed


@pytest.mark.slow
def test_submitit_local_executor_runs_the_study(tmp_path):
    from hsresnet.study.runner import submitit_executor

    study = load_study(write_study(tmp_path, {'ops': ops_experiment(models=[{'model': 'resnet26_small'}])}, [3]))
    study.runs = [r for r in study.runs if not r.is_benchmark]
    out = tmp_path / 'out'
    outcomes = run_study(study, out, 1, 1, submit=submitit_executor(out, 'local', timeout_min=10), progress=False)
    assert [code for _, code, _ in outcomes] == [0]
    summary = json.loads((out / study.runs[0].key / 'summary.json').read_text())
    assert summary['epochs'] == 1 and 0 <= summary['top1'] <= 100
    assert any((out / 'submitit').iterdir())  # the job's own logs


def test_cli_dry_run_lists_runs_and_estimates(tmp_path, capsys):
    from hsresnet.cli import main

    path = write_study(tmp_path, {'ops': ops_experiment(minutes_per_run=2)})
    assert main(['study', 'run', str(path), '--output', str(tmp_path / 'out'), '--dry-run']) == 0
    text = capsys.readouterr().out
    assert text.count('todo') == 5 and '~2 min' in text and 'about 4 min with 2 at once' in text
    assert not (tmp_path / 'out').exists()
    assert main(['study', 'run', str(tmp_path / 'nope.yaml')]) == 2
    assert 'does not exist' in capsys.readouterr().err


def test_mean_interval_and_verdict():
    stats = mean_interval([1.0, 2.0, 3.0])
    assert stats['mean'] == 2.0 and stats['sd'] == 1.0
    assert stats['high'] - 2.0 == pytest.approx(4.302653 / 3**0.5, rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert mean_interval([5.0])['low'] is None and mean_interval([])['n'] == 0
    assert verdict(mean_interval([0.5, 0.6, 0.7])) == 'higher'
    assert verdict(mean_interval([-0.5, -0.6, -0.7])) == 'lower'
    assert verdict(mean_interval([-0.5, 0.6, 0.1])) == 'no measurable difference at this scale'
    assert verdict(mean_interval([0.5])) == 'too few paired seeds'


@pytest.mark.slow
def test_quick_and_full_study_files_plan():
    """The committed studies resolve: every width within its tolerance, every recipe present; the full study is the
    quick one's grid with five seeds and longer recipes."""
    quick, full = load_study('configs/study/quick.yaml'), load_study('configs/study/full.yaml')
    assert {'operators', 's_at_budget', 's_at_width'} <= set(quick.experiments)
    for study in (quick, full):
        assert len({r.key for r in study.runs}) == len(study.runs)
        for exp in study.experiments.values():
            assert exp.recipe.is_file() and exp.models
    assert set(full.experiments) == set(quick.experiments) and full.seeds == [0, 1, 2, 3, 4]
    labels = {name: [m.label for m in exp.models] for name, exp in quick.experiments.items()}
    assert labels == {name: [m.label for m in exp.models] for name, exp in full.experiments.items()}
    trees = next(r for r in full.runs if r.key.startswith('trees_fasterrcnn/'))
    assert trees.argv[trees.argv.index('--epochs') + 1] == '60'


def _csv(path: Path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_speed_is_read_from_the_path_fastest_for_the_reference():
    rows = [
        {'model': model, 'bench': bench, 'path': path, 'samples_per_sec': speed}
        for model, bench, path, speed in [
            ('ref', 'inference', 'channels_last', 900.0),
            ('ref', 'inference', 'openvino', 1500.0),
            ('hs', 'inference', 'channels_last', 1000.0),  # faster than the reference here: not what decides
            ('hs', 'inference', 'openvino', 1100.0),
            ('ref', 'train', 'channels_last', 300.0),
        ]
    ]
    assert fastest_paths(rows, 'ref') == {'inference': 'openvino', 'train': 'channels_last'}
    assert fastest_paths(rows, 'other') == {'inference': None, 'train': None}
