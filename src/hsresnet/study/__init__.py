"""Controlled comparisons declared in YAML (``hsresnet study``): plan, run and report. See docs/study.md."""

from .plan import Study, StudyError, load_study
from .report import mean_interval, verdict, write_report
from .runner import run_study, status, submitit_executor

__all__ = [
    'Study',
    'StudyError',
    'load_study',
    'mean_interval',
    'run_study',
    'status',
    'submitit_executor',
    'verdict',
    'write_report',
]
