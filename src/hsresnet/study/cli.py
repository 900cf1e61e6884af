"""Controlled comparisons of HS-ResNet with same-skeleton baselines, declared in YAML (configs/study/*.yaml).

run     plans the study (widths solved to each experiment's budget), then runs what is not finished: every run an
        `hsresnet train` / `detect train` / `segment train` in its own folder, the benchmarks first. Rerunning skips
        finished runs and resumes interrupted ones. --dry-run lists the runs, their state and an estimated time.
report  aggregates the finished runs of a study folder into Markdown tables, CSV and PNG plots (mean, sd, 95 %
        intervals, paired differences by seed); it may run while the study is still going.

See docs/study.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from .plan import StudyError, load_study


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION', required=True)
    run = sub.add_parser('run', help='run (or resume) a study', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    run.add_argument('config', help='study YAML, e.g. configs/study/quick.yaml')
    run.add_argument('--output', default=None, help='study folder (default: runs/study/<config name>)')
    run.add_argument('--jobs', type=int, default=None, help='runs at once on this machine (default: the YAML jobs)')
    run.add_argument('--threads', type=int, default=None, help='torch threads per run (default: the YAML threads)')
    run.add_argument('--dry-run', action='store_true', help='list the runs, their state and estimated time; run none')
    run.add_argument('--rerun-stale', action='store_true', help='rerun, from scratch, runs whose command changed')
    run.add_argument('--no-progress', action='store_true', help='no progress bar (a line per finished run only)')
    run.add_argument(
        '--submitit',
        choices=('slurm', 'local'),
        default=None,
        help="send each training run as a job through submitit: 'slurm' on a cluster, 'local' on this machine",
    )
    run.add_argument('--slurm-partition', default=None, help='Slurm partition of the jobs')
    run.add_argument('--slurm-gpus', type=int, default=None, help='GPUs per job')
    run.add_argument('--slurm-time', type=int, default=240, help='time limit per job in minutes (default: 240)')
    run.add_argument('--slurm-mem-gb', type=int, default=None, help='memory per job in GB')
    report = sub.add_parser('report', help='tables and plots of what has finished', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    report.add_argument('folder', help='the study folder (--output of `hsresnet study run`)')
    report.add_argument('--output', default=None, help='report folder (default: <folder>/report)')


def _dry_run(study, out: Path, jobs: int) -> None:
    """List every run with its state, command and estimated time, then the time left with ``jobs`` at once."""
    from .runner import estimate_seconds, status

    print(f'{study.name}: {len(study.runs)} runs in {out}')
    estimates = []  # of the runs not done; None where there is none
    for run in study.runs:
        state, eta = status(out, run), ''
        if state != 'done':
            estimates.append(estimate_seconds(study, out, run))
            eta = '  ~?' if estimates[-1] is None else f'  ~{estimates[-1] / 60:.0f} min'
        print(f'  {state:8s} {run.key}{eta}')
        print(f'           hsresnet {shlex.join(run.argv)}')
    total, unknown = round(sum(s for s in estimates if s is not None)), estimates.count(None)
    left = sum(1 for r in study.runs if not (out / r.key / r.result_file).is_file())
    print(
        f'{left} run(s) to go: about {total / 60 / jobs:.0f} min with {jobs} at once'
        + (f' (+ {unknown} without an estimate)' if unknown else '')
    )


def run(args: argparse.Namespace) -> int:
    if args.action == 'report':
        from .report import write_report

        path = write_report(Path(args.folder), Path(args.output) if args.output else None)
        print(path.read_text())
        print(f'wrote {path} (and cells.csv, runs.csv, PNGs beside it)')
        return 0
    study = load_study(args.config)
    out = Path(args.output or Path('runs/study') / study.name)
    jobs, threads = args.jobs or study.jobs, args.threads or study.threads
    if jobs < 1 or threads < 1:
        raise StudyError(f'--jobs and --threads must be >= 1, got {jobs} and {threads}.')
    if args.dry_run:
        _dry_run(study, out, jobs)
        return 0
    from .runner import run_study, submitit_executor

    submit = None
    if args.submitit:
        slurm = dict(slurm_partition=args.slurm_partition, gpus_per_node=args.slurm_gpus, mem_gb=args.slurm_mem_gb)
        slurm = {k: v for k, v in slurm.items() if v is not None}
        submit = submitit_executor(out, args.submitit, timeout_min=args.slurm_time, **slurm)
    outcomes = run_study(study, out, jobs, threads, args.rerun_stale, submit, progress=not args.no_progress)
    failed = [key for key, code, _ in outcomes if code != 0]
    for key in failed:
        logging.getLogger(__name__).error('failed: %s (see log.txt there)', out / key)
    print(f'{len(outcomes) - len(failed)} run(s) finished, {len(failed)} failed; `hsresnet study report {out}`.')
    return 1 if failed else 0
