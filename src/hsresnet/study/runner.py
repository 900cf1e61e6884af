"""Run a planned study: each run an ``hsresnet`` subprocess writing into its own folder under the study's output.

A finished run (its ``summary.json`` or ``results.json`` is there) is skipped; an interrupted one resumes from its
last checkpoint (``--resume``); a run whose command changed since it was started (another recipe, other kwargs) is
stale and left alone unless asked. The experiments' benchmarks run first, one at a time, so their timings share the
machine with nothing else; the training runs then go ``jobs`` at a time, locally or as one job each through
submitit (Slurm, or submitit's local executor).
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..engine.logs import write_json
from ..engine.outputs import LAUNCHER_FILES
from .plan import Run, Study, unique_models

LOG_FILE, RUN_FILE = LAUNCHER_FILES  # in every run folder: its output, and its identity, command and time when done
PLAN_FILE = 'study.json'  # in the study folder: what `hsresnet study report` reads


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def status(out: Path, run: Run) -> str:
    """``done``, ``partial`` (a checkpoint to resume), ``stale`` (started with another command) or ``todo``."""
    folder = out / run.key
    record = read_json(folder / RUN_FILE)
    if record is not None and record.get('identity') != run.identity:
        return 'stale'
    if (folder / run.result_file).is_file():
        return 'done'
    if not run.is_benchmark and (folder / 'last.safetensors').is_file():
        return 'partial'
    return 'todo'


def command(out: Path, run: Run, threads: int, fresh: bool = False) -> List[str]:
    """The subprocess command of ``run``: resumes its checkpoint unless ``fresh`` (a stale run starts over)."""
    folder = out / run.key
    cmd = [sys.executable, '-m', 'hsresnet.cli', *run.argv, '--threads', str(threads)]
    if run.is_benchmark:
        return cmd + ['--results-file', str(folder / 'results.json')]
    cmd += ['--output', str(folder), '--no-progress']
    if not fresh and (folder / 'last.safetensors').is_file():
        return cmd + ['--resume', str(folder)]
    return cmd + (['--overwrite'] if folder.exists() else [])


def execute(out: Path, run: Run, threads: int, fresh: bool = False) -> Tuple[str, int, float]:
    """Run ``run`` to its end (output appended to ``log.txt`` in its folder) -> (key, exit code, seconds).

    A plain function of picklable arguments, so submitit can send it to a cluster job as it is."""
    folder = out / run.key
    cmd = command(out, run, threads, fresh)
    folder.mkdir(parents=True, exist_ok=True)
    record = {'identity': run.identity, 'argv': run.argv, 'command': cmd, 'threads': threads}
    write_json(folder / RUN_FILE, {**record, 'started': time.strftime('%Y-%m-%d %H:%M:%S')})
    start = time.time()
    with open(folder / LOG_FILE, 'a') as log:
        log.write(f'$ {" ".join(cmd)}\n')
        log.flush()
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = process.wait()
        except BaseException:  # interrupted: stop the run too; its checkpoint lets the next call resume it
            process.terminate()
            process.wait()
            raise
    seconds = time.time() - start
    if code == 0:
        write_json(folder / RUN_FILE, {**record, 'seconds': seconds, 'finished': time.strftime('%Y-%m-%d %H:%M:%S')})
    return run.key, code, seconds


def estimate_seconds(study: Study, out: Path, run: Run) -> Optional[float]:
    """The median time of the finished runs of ``run``'s first experiment, else its ``minutes_per_run``."""
    if run.is_benchmark:
        return None
    exp = run.experiments[0]
    times = [
        record['seconds']
        for other in study.runs
        if not other.is_benchmark and other.experiments[0] == exp
        and (record := read_json(out / other.key / RUN_FILE)) and 'seconds' in record
    ]  # fmt: skip
    if times:
        return statistics.median(times)
    minutes = study.experiments[exp].minutes_per_run
    return minutes * 60 if minutes else None


def plan_record(study: Study) -> Dict[str, Any]:
    """What the report needs, written to ``study.json``: experiments, their models with counts, and the runs."""
    experiments = {}
    for name, exp in study.experiments.items():
        experiments[name] = {
            'question': exp.question,
            'task': exp.task,
            'recipe': str(exp.recipe),
            'metrics': exp.metrics,
            'input': exp.input,
            'sweep': exp.sweep,
            'reference': exp.reference.label,
            'budget': {'label': exp.budget.label, **asdict(exp.budget.complexity)},
            'models': [
                {'label': m.label, 'model': m.model, 'kwargs': m.kwargs, 'own': m.own, **asdict(m.complexity)}
                for m in unique_models([exp.reference, *exp.models])
            ],
        }
    runs = [
        {'key': r.key, 'experiments': r.experiments, 'label': r.model.label if r.model else None, 'seed': r.seed}
        for r in study.runs
    ]
    return {'study': str(study.path), 'seeds': study.seeds, 'experiments': experiments, 'runs': runs}


def run_study(
    study: Study,
    out: Path,
    jobs: int,
    threads: int,
    rerun_stale: bool = False,
    submit: Optional[Callable[[List[Run], int, bool], Iterator[Tuple[str, int, float]]]] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> List[Tuple[str, int, float]]:
    """Run every run of ``study`` that is not done (stale ones only with ``rerun_stale``); returns the outcomes.

    ``submit`` (see :func:`submitit_executor`) takes the training runs instead of the local pool."""
    from tqdm import tqdm

    write_json(out / PLAN_FILE, plan_record(study))
    states = {run.key: status(out, run) for run in study.runs}
    stale = [key for key, state in states.items() if state == 'stale']
    if stale and not rerun_stale:
        log(f'{len(stale)} stale run(s) left as they are (started with another command; --rerun-stale reruns them):')
        for key in stale:
            log(f'  {out / key}')
    todo = [r for r in study.runs if states[r.key] in ('todo', 'partial') or (rerun_stale and states[r.key] == 'stale')]
    outcomes: List[Tuple[str, int, float]] = []
    bar = tqdm(total=len(todo), unit='run', disable=not progress, desc=study.name)

    def finished(outcome: Tuple[str, int, float]) -> None:
        key, code, seconds = outcome
        outcomes.append(outcome)
        bar.update()
        bar.write(f'{"finished" if code == 0 else f"FAILED (exit {code})"} in {seconds / 60:.1f} min: {out / key}')

    for run in (r for r in todo if r.is_benchmark):  # alone on the machine, one after the other
        finished(execute(out, run, run.threads or threads * jobs, states[run.key] == 'stale'))
    training = [r for r in todo if not r.is_benchmark]
    if submit is not None:
        for outcome in submit(training, threads, rerun_stale):
            finished(outcome)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            pending: set[Future] = {
                pool.submit(execute, out, r, r.threads or threads, states[r.key] == 'stale') for r in training
            }
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finished(future.result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    bar.close()
    return outcomes


def submitit_executor(out: Path, cluster: str, **slurm: Any) -> Callable:
    """A ``submit`` for :func:`run_study`: every training run becomes one job of submitit's ``cluster`` executor
    (``'slurm'``, or ``'local'`` for testing on this machine); ``slurm`` are ``update_parameters`` settings
    (``slurm_partition``, ``timeout_min``, ``gpus_per_node`` ...). Job logs go to ``<out>/submitit``."""
    import submitit
    from submitit.helpers import as_completed

    def submit(runs: List[Run], threads: int, rerun_stale: bool) -> Iterator[Tuple[str, int, float]]:
        executor = submitit.AutoExecutor(folder=out / 'submitit', cluster=cluster)
        executor.update_parameters(**{'cpus_per_task': threads, 'name': 'hsresnet-study', **slurm})
        with executor.batch():
            jobs = [executor.submit(execute, out, run, run.threads or threads, rerun_stale) for run in runs]
        keys = {job.job_id: run.key for job, run in zip(jobs, runs)}
        for job in as_completed(jobs, poll_frequency=2):
            try:
                yield job.result()
            except Exception as err:  # the job itself failed (node lost, time limit): the run resumes next time
                logging.getLogger(__name__).error('submitit job %s of %s failed: %s', job.job_id, keys[job.job_id], err)
                yield keys[job.job_id], -1, 0.0

    return submit
