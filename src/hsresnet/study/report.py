"""``hsresnet study report``: what the finished runs of a study say, as Markdown tables, CSV and PNG plots.

Per model (a cell: one model of an experiment over its seeds): the mean, standard deviation and 95 % confidence
interval (Student's t) of each metric; against the experiment's reference model, the paired difference over the
seeds both have finished, with its 95 % interval. A difference is called only when that interval excludes zero;
otherwise the report says there is no measurable difference at this scale. It reads whatever has finished, so it
can run while the study is still going.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..engine.logs import new_figure, save_figure, write_csv
from .plan import model_spec
from .runner import PLAN_FILE, read_json

NO_DIFFERENCE = 'no measurable difference at this scale'


def mean_interval(values: Sequence[float], level: float = 0.95) -> Dict[str, Optional[float]]:
    """Mean, sample standard deviation and the two-sided ``level`` t interval of the mean (None where n < 2)."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return {'n': 0, 'mean': None, 'sd': None, 'low': None, 'high': None}
    mean = statistics.fmean(values)
    if n < 2:
        return {'n': 1, 'mean': mean, 'sd': None, 'low': None, 'high': None}
    sd = statistics.stdev(values)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {'n': n, 'mean': mean, 'sd': sd, 'low': mean - half, 'high': mean + half}


def verdict(diff: Dict[str, Optional[float]], higher: str = 'higher', lower: str = 'lower') -> str:
    """``higher``/``lower`` when the interval of a paired difference excludes zero, else no measurable difference."""
    if diff['low'] is None:
        return 'too few paired seeds'
    if diff['low'] > 0:
        return higher
    if diff['high'] < 0:
        return lower
    return NO_DIFFERENCE


def collect(out: Path) -> Dict[str, Any]:
    """The study plan with, per experiment and model, the finished runs' summaries by seed and the benchmark row."""
    plan = read_json(out / PLAN_FILE)
    if plan is None:
        raise ValueError(f'{out} holds no {PLAN_FILE}: pass the output folder of `hsresnet study run`.')
    summaries: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for run in plan['runs']:
        if run['label'] is None:
            continue
        summary = read_json(out / run['key'] / 'summary.json')
        if summary is not None:
            summaries.setdefault(f'{run["key"].split("/")[0]}/{run["label"]}', {})[run['seed']] = summary
    for name, exp in plan['experiments'].items():
        recipe = Path(exp['recipe']).stem
        rows = (read_json(out / 'benchmark' / name / 'results.json') or {}).get('results', [])
        reference = next(m for m in exp['models'] if m['label'] == exp['reference'])
        exp['speed_paths'] = fastest_paths(rows, model_spec(reference['model'], reference['kwargs']))
        for model in exp['models']:
            model['runs'] = summaries.get(f'{recipe}/{model["label"]}', {})
            spec = model_spec(model['model'], model['kwargs'])
            model['benchmark'] = {
                r['bench']: r for r in rows if r['model'] == spec and r.get('path') == exp['speed_paths'][r['bench']]
            }
    return plan


def fastest_paths(rows: List[Dict[str, Any]], reference: str) -> Dict[str, Optional[str]]:
    """Per kind (inference, train), the path of the benchmark in which the reference model runs fastest: every model's
    speed is read from that one path, the one a user would deploy (or train) with."""
    best: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r['model'] == reference and r['samples_per_sec'] > best.get(r['bench'], {}).get('samples_per_sec', -1):
            best[r['bench']] = r
    return {kind: best[kind].get('path') if kind in best else None for kind in ('inference', 'train')}


def cells(exp: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per model of an experiment: counts, throughput and, per metric, its statistics and the paired
    difference to the reference."""
    models = {m['label']: m for m in exp['models']}
    reference = models[exp['reference']]
    budget = exp['budget']
    rows = []
    for m in exp['models']:
        bench = m.get('benchmark') or {}
        row: Dict[str, Any] = {
            'model': m['label'],
            'reference': m['label'] == exp['reference'],
            **{k: m['own'].get(k) for k in exp['sweep']},
            'params_m': m['params'] / 1e6,
            'params_x': m['params'] / budget['params'],
            'mmacs': m['macs'] / 1e6,
            'macs_x': m['macs'] / budget['macs'],
            **{
                f'{kind}_{key}': value
                for kind in ('inference', 'train')
                for key, value in _speed(bench.get(kind)).items()
            },
            'seeds': sorted(m['runs']),
        }
        for metric in exp['metrics']:
            values = {seed: s[metric] for seed, s in m['runs'].items() if s.get(metric) is not None}
            stats = mean_interval(list(values.values()))
            row.update({f'{metric}_{k}': v for k, v in stats.items()})
            ref_values = {seed: s[metric] for seed, s in reference['runs'].items() if s.get(metric) is not None}
            paired = [values[s] - ref_values[s] for s in sorted(values.keys() & ref_values.keys())]
            diff = mean_interval(paired)
            row.update({f'{metric}_diff_{k}': v for k, v in diff.items()})
            row[f'{metric}_verdict'] = '(reference)' if row['reference'] else verdict(diff)
        rows.append(row)
    return rows


def _speed(row: Optional[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Images/s of a benchmark row and its ratio to the reference (the median over rounds, paired)."""
    ratio = row and row.get('step_time_ms_paired_ratio')
    return {'images_per_s': row and row['samples_per_sec'], 'speed_x': 1 / ratio if ratio else None}


def _f(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def _digits(rows: List[Dict[str, Any]], metric: str) -> int:
    """Two decimals for percentages, three for metrics on a 0-1 scale (AP, mIoU)."""
    means = [abs(r[f'{metric}_mean']) for r in rows if r[f'{metric}_mean'] is not None]
    return 3 if means and max(means) <= 1.5 else 2


def _diff(r: Dict[str, Any], metric: str, digits: int) -> str:
    """The paired difference to the reference and its interval, e.g. ``+0.40 [-1.87, +2.68]``."""
    if r['reference'] or r[f'{metric}_diff_mean'] is None:
        return '-'
    low, high = r[f'{metric}_diff_low'], r[f'{metric}_diff_high']
    interval = f' [{low:+.{digits}f}, {high:+.{digits}f}]' if low is not None else ''
    return f'{r[f"{metric}_diff_mean"]:+.{digits}f}' + interval


def markdown(name: str, exp: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """The experiment's table: counts against the budget, throughput against the reference, each metric's mean,
    standard deviation, interval and paired difference to the reference."""
    metric, budget = exp['metrics'][0], exp['budget']
    d = _digits(rows, metric)
    lines = [
        f'### {name}',
        '',
        exp['question'] or '',
        '',
        f'Task `{exp["task"]}`, recipe `{Path(exp["recipe"]).name}`, input {exp["input"]["size"]} px; budget '
        f'`{budget["label"]}` ({budget["params"] / 1e6:.3f} M params, {budget["macs"] / 1e6:.2f} M MACs); '
        f'differences are paired by seed against `{exp["reference"]}`. Speed through '
        + ', '.join(f'`{path}` ({kind})' for kind, path in exp['speed_paths'].items() if path)
        + ', the fastest path measured for the reference.',
        '',
        f'| model | params (M) | x budget | MMACs | x budget | inference img/s (x ref) | training img/s (x ref) | '
        f'{metric} mean ± sd (n) | 95 % CI | diff to ref [95 % CI] | verdict |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        n = r[f'{metric}_n']
        mean = f'{_f(r[f"{metric}_mean"], d)} ± {_f(r[f"{metric}_sd"], d)} ({n})' if n else '-'
        ci = f'[{_f(r[f"{metric}_low"], d)}, {_f(r[f"{metric}_high"], d)}]' if r[f'{metric}_low'] is not None else '-'
        diff = _diff(r, metric, d)
        lines.append(
            f'| `{r["model"]}` | {r["params_m"]:.3f} | {r["params_x"]:.3f} | {r["mmacs"]:.2f} | {r["macs_x"]:.3f} | '
            f'{_f(r["inference_images_per_s"], 0)} ({_f(r["inference_speed_x"])}) | '
            f'{_f(r["train_images_per_s"], 0)} ({_f(r["train_speed_x"])}) | {mean} | {ci} | {diff} | '
            f'{r[f"{metric}_verdict"]} |'
        )
    for other in exp['metrics'][1:]:
        d = _digits(rows, other)
        lines += ['', f'{other}: ' + '; '.join(
            f'`{r["model"]}` {_f(r[f"{other}_mean"], d)} ± {_f(r[f"{other}_sd"], d)}'
            + ('' if r['reference'] else f', diff {_diff(r, other, d)} ({r[f"{other}_verdict"]})')
            for r in rows
        )]  # fmt: skip
    return '\n'.join(lines) + '\n'


def plot(name: str, exp: Dict[str, Any], rows: List[Dict[str, Any]], folder: Path) -> List[Path]:
    """``<name>.png``: the main metric against MACs and against measured throughput (mean and 95 % interval per
    model), and for a sweep the metric and the throughput against the swept value."""
    metric = exp['metrics'][0]
    done = [r for r in rows if r[f'{metric}_n']]
    if not done:
        return []
    sweep = next(iter(exp['sweep']), None)
    speed_label = f'measured inference images/s ({exp["speed_paths"]["inference"] or "?"})'
    panels = [('mmacs', 'MMACs per image'), ('inference_images_per_s', speed_label)]
    panels += [(sweep, f'split count {sweep}' if sweep == 's' else sweep)] if sweep else []
    fig, axes = new_figure(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for ax, (key, xlabel) in zip(axes, panels):
        points = [r for r in done if r.get(key) is not None]
        for r in points:
            x, y = r[key], r[f'{metric}_mean']
            half = r[f'{metric}_high'] - y if r[f'{metric}_high'] is not None else 0
            ax.errorbar(x, y, yerr=half, fmt='o', capsize=3, color='C3' if r['reference'] else 'C0')
            if key != sweep:
                ax.annotate(r['model'], (x, y), fontsize=6, xytext=(3, 3), textcoords='offset points')
        if key == sweep and points:
            points.sort(key=lambda r: r[key])
            ax.plot([r[key] for r in points], [r[f'{metric}_mean'] for r in points], '-', color='C0', alpha=0.5)
            speed = [r for r in points if r['inference_images_per_s']]
            if speed:
                twin = ax.twinx()
                twin.plot([r[key] for r in speed], [r['inference_images_per_s'] for r in speed], 's--', color='C2')
                twin.set_ylabel(speed_label, color='C2')
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f'{metric} (mean, 95 % CI)')
        ax.grid(alpha=0.3)
    fig.suptitle(f'{name}: {exp["question"]}'[:150], fontsize=9)
    path = folder / f'{name}.png'
    save_figure(fig, path)
    return [path]


def write_report(out: Path, folder: Optional[Path] = None) -> Path:
    """Write ``study.md``, ``cells.csv``, ``runs.csv`` and one PNG per experiment into ``folder``
    (default ``<out>/report``); returns the Markdown file."""
    plan = collect(out)
    folder = folder or out / 'report'
    folder.mkdir(parents=True, exist_ok=True)
    sections, all_cells, all_runs = [], [], []
    finished = sum(len(m['runs']) for e in plan['experiments'].values() for m in e['models'])
    for name, exp in plan['experiments'].items():
        rows = cells(exp)
        sections.append(markdown(name, exp, rows))
        plot(name, exp, rows, folder)
        all_cells += [{'experiment': name, **{k: v for k, v in r.items() if k != 'seeds'}} for r in rows]
        for m in exp['models']:
            for seed, summary in sorted(m['runs'].items()):
                metrics = {k: summary.get(k) for k in exp['metrics']}
                all_runs.append({'experiment': name, 'model': m['label'], 'seed': seed, **metrics,
                                 'train_time_s': summary.get('train_time_s')})  # fmt: skip
    total = sum(1 for r in plan['runs'] if r['label'] is not None)  # the training runs: their keys are unique
    text = (
        f'# Study `{Path(plan["study"]).name}`: {total} runs planned (seeds {plan["seeds"]})\n\n'
        f'Finished runs counted per experiment: {finished}; planned: {total}.\n\n'
    )
    path = folder / 'study.md'
    path.write_text(text + '\n'.join(sections))
    write_csv(folder / 'cells.csv', all_cells)
    write_csv(folder / 'runs.csv', all_runs)
    return path
