"""A study declared in YAML (``configs/study/*.yaml``): experiments, each a grid of models x seeds on one task.

Every run is an ordinary ``hsresnet train`` / ``detect train`` / ``segment train`` command with a recipe (``-c``),
a model (or backbone) with its kwargs, and a seed. The YAML names, per experiment, a budget model and which width
argument of each model to solve (``match:``), so that params and MACs match the budget (:func:`match_width`). The
plan lists every run once (a run shared by several experiments is trained once) with its folder and command.

Schema (unknown keys are refused)::

    seeds: [0, 1, 2]                 # every model of every experiment, paired by seed
    jobs: 2                          # default of `hsresnet study run --jobs`
    threads: 1                       # torch threads per run
    experiments:
      NAME:
        question: RQ2 ...            # shown in the report
        task: classify               # classify | detect | segment
        recipe: recipe.yaml          # the -c recipe of every run, relative to this file
        args: {epochs: 2}            # more flags of every run
        input: {size: 28, in_chans: 1, num_classes: 10}    # for counting MACs and the benchmark
        model_kwargs: {channels: [16, 32, 64, 128]}         # shared by the budget and every model
        budget: {model: resnet26_small}
        tolerance: 0.05              # how far params and MACs may be off the budget (a model may set its own)
        models:
          - {model: hs_resnet26_small, model_kwargs: {s: 5}, match: w}
          - {model: resnet26_small, match: base_width}
        sweep: {s: [2, 3, 4]}        # optional: every model entry once per value
        reference: {model: ...}      # paired differences are taken against it (default: the first model)
        metrics: [top1]              # summary.json keys, the first is the main one (default per task)
        minutes_per_run: 6           # the time estimate before any run has finished
        benchmark: {batch_size: 128, args: [--channels-last, --repeats, 15]}
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..complexity import Complexity, count_timm_model, match_width

# task -> (command, flag of the model, flag of its kwargs, default metrics)
TASKS: Dict[str, tuple] = {
    'classify': (['train'], '--model', '--model-kwargs', ['top1']),
    'detect': (['detect', 'train'], '--backbone', '--backbone-kwargs', ['bbox_AP']),
    'segment': (['segment', 'train'], '--backbone', '--backbone-kwargs', ['miou']),
}
STUDY_KEYS = {'seeds', 'jobs', 'threads', 'experiments'}
EXPERIMENT_KEYS = {
    'question', 'task', 'recipe', 'args', 'input', 'model_kwargs', 'budget', 'tolerance', 'models', 'sweep',
    'reference', 'metrics', 'minutes_per_run', 'benchmark',
}  # fmt: skip
MODEL_KEYS = {'model', 'model_kwargs', 'match', 'tolerance', 'name'}
BENCHMARK_KEYS = {'batch_size', 'args', 'threads'}


class StudyError(ValueError):
    """A study file that cannot be planned: names the key and the fix."""


@dataclass(frozen=True)
class Model:
    """One model of an experiment: ``label`` names it in folders and tables (its name and own kwargs)."""

    label: str
    model: str
    kwargs: Dict[str, Any]  # everything the constructor gets (shared + own + the solved width)
    own: Dict[str, Any]  # the kwargs that tell it apart from the other models of its experiment
    complexity: Complexity

    def spec(self) -> str:
        return model_spec(self.model, self.kwargs)


@dataclass
class Experiment:
    name: str
    question: str
    task: str
    recipe: Path
    models: List[Model]
    reference: Model
    budget: Model
    metrics: List[str]
    minutes_per_run: Optional[float]
    input: Dict[str, int]
    benchmark: Dict[str, Any]
    sweep: Dict[str, List[Any]]


@dataclass
class Run:
    """One command of the study in its own folder ``key`` under the study's output: a training run
    (``<recipe>/<label>/seed<k>``) or an experiment's benchmark (``benchmark/<experiment>``, no model or seed)."""

    key: str
    argv: List[str]  # `hsresnet` arguments, without --output/--results-file, --resume and --threads
    identity: List[str]  # argv with the recipe named by its content: a run whose identity changed is stale
    experiments: List[str] = field(default_factory=list)
    model: Optional[Model] = None
    seed: Optional[int] = None
    threads: Optional[int] = None  # torch threads, when not the study's

    @property
    def is_benchmark(self) -> bool:
        return self.model is None

    @property
    def result_file(self) -> str:
        """The file that exists once the run has finished."""
        return 'results.json' if self.is_benchmark else 'summary.json'


@dataclass
class Study:
    path: Path
    seeds: List[int]
    jobs: int
    threads: int
    experiments: Dict[str, Experiment]
    runs: List[Run]

    @property
    def name(self) -> str:
        return self.path.stem


def _check_keys(where: str, data: Any, allowed: Optional[set] = None) -> Dict[str, Any]:
    """``data`` as a mapping whose keys are all ``allowed`` (any keys when None), else a StudyError naming them."""
    if not isinstance(data, dict):
        raise StudyError(f'{where} must be a mapping, not {type(data).__name__}.')
    unknown = sorted(set(data) - allowed) if allowed is not None else []
    if unknown:
        raise StudyError(f'{where} has unknown keys {unknown}; allowed: {sorted(allowed)}.')
    return data


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StudyError(f'{where} must be an integer >= 1, got {value!r}.')
    return value


def flags(args: Dict[str, Any]) -> List[str]:
    """``{'epochs': 2, 'channels_last': True, 'scale': [1, 1]}`` -> ``['--epochs', '2', '--channels-last', ...]``."""
    out: List[str] = []
    for key, value in args.items():
        flag = '--' + str(key).replace('_', '-')
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def flow(value: Any) -> str:
    """A value in one line of YAML flow style: ``{s: 5, w: 19}``, ``[16, 32]``, ``19``."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix('...').strip()


def model_spec(model: str, kwargs: Dict[str, Any]) -> str:
    """``NAME{kwargs}``, the model syntax of ``hsresnet benchmark -m``."""
    return model + (flow(kwargs) if kwargs else '')


def _label(model: str, own: Dict[str, Any]) -> str:
    return '-'.join([model] + [f'{k}{v}' for k, v in sorted(own.items())]).replace(' ', '')


def _build_model(where: str, entry: Any, shared: Dict[str, Any], budget: Optional[Complexity], exp: Dict) -> Model:
    entry = _check_keys(where, entry, MODEL_KEYS)
    if not isinstance(entry.get('model'), str):
        raise StudyError(f'{where} needs `model: NAME` (a timm/hsresnet model).')
    own = dict(_check_keys(f'{where}.model_kwargs', entry.get('model_kwargs') or {}))
    inp = exp['input']
    count_kwargs = dict(in_chans=inp['in_chans'], num_classes=inp['num_classes'])
    try:
        if entry.get('match'):
            if budget is None:
                raise StudyError(f'{where} has `match:` but the experiment has no `budget:`.')
            tolerance = float(entry.get('tolerance', exp.get('tolerance', 0.05)))
            knob = str(entry['match'])
            value, complexity = match_width(
                entry['model'], budget, knob, inp['size'], tolerance, **count_kwargs, **shared, **own
            )
            own[knob] = value
        else:
            complexity = count_timm_model(entry['model'], inp['size'], **count_kwargs, **shared, **own)
    except ValueError as err:
        raise StudyError(f'{where}: {err}') from None
    label = str(entry.get('name') or _label(entry['model'], own))
    return Model(label, entry['model'], dict(sorted({**shared, **own}.items())), own, complexity)


def load_study(path: str | Path) -> Study:
    """Read and plan a study file: solve every matched width, expand sweeps and seeds, give every run its folder."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f'study file {path} does not exist: pass a YAML file such as configs/study/quick.yaml.')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StudyError(f'study file {path} is not valid YAML: {err}') from None
    data = _check_keys(str(path), data, STUDY_KEYS)
    seeds = data.get('seeds', [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise StudyError(f'{path}: seeds must be a non-empty list of integers, got {seeds!r}.')
    if len(set(seeds)) != len(seeds):
        raise StudyError(f'{path}: seeds {seeds} repeat a seed.')
    jobs = _positive_int(f'{path}: jobs', data.get('jobs', 1))
    threads = _positive_int(f'{path}: threads', data.get('threads', 1))
    experiments = data.get('experiments')
    if not isinstance(experiments, dict) or not experiments:
        raise StudyError(f'{path} needs `experiments:`, a mapping of experiment names to their settings.')
    planned = {name: _plan_experiment(path, str(name), exp) for name, exp in experiments.items()}

    runs: Dict[str, Run] = {}
    for exp in planned.values():
        command, model_flag, kwargs_flag, _ = TASKS[exp.task]
        extra = _check_keys(f'{path}: experiments.{exp.name}.args', experiments[exp.name].get('args') or {})
        recipe = os.path.relpath(exp.recipe) if exp.recipe.is_relative_to(Path.cwd()) else str(exp.recipe)
        digest = hashlib.sha256(exp.recipe.read_bytes()).hexdigest()[:12]
        for model in unique_models(exp.models + [exp.reference]):
            for seed in seeds:
                rest = [model_flag, model.model]
                items = [f'{k}={flow(v)}' for k, v in sorted(model.kwargs.items())]  # --model-kwargs K=V ...
                rest += [kwargs_flag, *items] if items else []
                rest += [*flags(extra), '--seed', str(seed)]
                key = f'{exp.recipe.stem}/{model.label}/seed{seed}'
                identity = [*command, '-c', f'{exp.recipe.name}@{digest}', *rest]
                run = runs.setdefault(key, Run(key, [*command, '-c', recipe, *rest], identity, [], model, seed))
                if run.identity != identity:
                    raise StudyError(
                        f'{path}: experiments {run.experiments[0]!r} and {exp.name!r} both run {key} but with '
                        f'different settings ({run.identity} vs {identity}); give one of the models a `name:`.'
                    )
                run.experiments.append(exp.name)
    benchmarks = [_benchmark_run(exp) for exp in planned.values()]
    return Study(path, seeds, jobs, threads, planned, benchmarks + list(runs.values()))


def _benchmark_run(exp: Experiment) -> Run:
    """``hsresnet benchmark`` of the models of ``exp`` in one interleaved run, at the experiment's input size, with
    ratios to its reference: inference and training steps at ``benchmark.batch_size`` (default 8)."""
    bench = exp.benchmark
    inp = exp.input
    argv = ['benchmark', '-m', *(m.spec() for m in exp.models), '--ratio-base', exp.reference.spec()]
    argv += ['--baselines', '', '--no-reference', '--no-memory', '--img-size', str(inp['size'])]
    argv += ['--in-chans', str(inp['in_chans']), '--num-classes', str(inp['num_classes'] or 1000)]
    argv += ['-b', str(bench.get('batch_size', 8)), '--bench', 'both', *map(str, bench.get('args') or [])]
    return Run(f'benchmark/{exp.name}', argv, argv, [exp.name], threads=bench.get('threads'))


def unique_models(models: Sequence[Model]) -> List[Model]:
    """One model per label, in first-seen order."""
    return list({m.label: m for m in models}.values())


def _plan_experiment(path: Path, name: str, exp: Any) -> Experiment:
    where = f'{path}: experiments.{name}'
    exp = dict(_check_keys(where, exp, EXPERIMENT_KEYS))
    task = exp.get('task')
    if task not in TASKS:
        raise StudyError(f'{where}.task must be one of {sorted(TASKS)}, got {task!r}.')
    recipe = (path.parent / str(exp.get('recipe', ''))).resolve()
    if not exp.get('recipe') or not recipe.is_file():
        raise StudyError(f'{where}.recipe must name an existing recipe YAML (relative to {path.parent}), got {recipe}.')
    inp = _check_keys(f'{where}.input', exp.get('input') or {}, {'size', 'in_chans', 'num_classes'})
    default_classes = 1000 if task == 'classify' else 0  # dense tasks: the backbone without its classifier
    exp['input'] = {'size': 224, 'in_chans': 3, 'num_classes': default_classes, **inp}
    shared = _check_keys(f'{where}.model_kwargs', exp.get('model_kwargs') or {})
    budget = None
    if exp.get('budget') is not None:
        budget = _build_model(f'{where}.budget', exp['budget'], shared, None, exp)
    entries = exp.get('models')
    if not isinstance(entries, list) or not entries:
        raise StudyError(f'{where}.models must be a non-empty list of model entries.')
    sweep = _check_keys(f'{where}.sweep', exp.get('sweep') or {})
    if any(not isinstance(v, list) or not v for v in sweep.values()):
        raise StudyError(f'{where}.sweep maps kwargs to non-empty lists of values, got {sweep!r}.')
    expanded = []
    for i, entry in enumerate(entries):
        for values in itertools.product(*sweep.values()):
            e = dict(_check_keys(f'{where}.models[{i}]', entry, MODEL_KEYS))
            e['model_kwargs'] = {**(e.get('model_kwargs') or {}), **dict(zip(sweep, values))}
            expanded.append((f'{where}.models[{i}]', e))
    bc = budget.complexity if budget else None
    models = unique_models([_build_model(w, e, shared, bc, exp) for w, e in expanded])
    reference = models[0]
    if exp.get('reference') is not None:
        reference = _build_model(f'{where}.reference', exp['reference'], shared, bc, exp)
    metrics = exp.get('metrics') or TASKS[task][3]
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise StudyError(f'{where}.metrics must be a list of summary.json keys, got {metrics!r}.')
    bench = dict(_check_keys(f'{where}.benchmark', exp.get('benchmark') or {}, BENCHMARK_KEYS))
    minutes = exp.get('minutes_per_run')
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0):
        raise StudyError(f'{where}.minutes_per_run must be a positive number, got {minutes!r}.')
    return Experiment(
        name=name,
        question=str(exp.get('question', '')),
        task=task,
        recipe=recipe,
        models=models,
        reference=reference,
        budget=budget or reference,
        metrics=metrics,
        minutes_per_run=minutes,
        input=exp['input'],
        benchmark=bench,
        sweep=sweep,
    )
