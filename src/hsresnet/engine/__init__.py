"""The task-agnostic training engine shared by classification, detection and segmentation.

A task object (see ``engine.task``) supplies the model, loaders, loss and metrics; ``fit(task, cfg)`` does the rest:
torchrun/DDP, timm optimizer and scheduler, AMP, gradient accumulation, EMA, atomic checkpoints and ``--resume``,
progress bars, CSV/TensorBoard/PNG records and the final JSON summary. A command adds ``add_config_argument``, its
own flags and ``add_engine_arguments`` to the ``RecipeParser`` the CLI gives it (YAML recipe under typed flags), then
calls ``fit``.
"""

from .checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_trained_model,
    load_weights,
    save_checkpoint,
    save_weights,
)
from .config import (
    RecipeParser,
    add_amp_arguments,
    add_config_argument,
    add_engine_arguments,
    config_to_dict,
    load_yaml_config,
    parse_kwargs,
)
from .distributed import DistInfo, ShardSampler, init_distributed, make_loader, seed_everything
from .fit import amp_enabled, autocast, count_params, fit, to_device
from .logs import RunLogger, plot_curves, write_csv, write_json
from .task import Task

__all__ = [
    'CheckpointError',
    'DistInfo',
    'RecipeParser',
    'RunLogger',
    'ShardSampler',
    'Task',
    'add_amp_arguments',
    'add_config_argument',
    'add_engine_arguments',
    'amp_enabled',
    'autocast',
    'check_compatible',
    'config_to_dict',
    'count_params',
    'fit',
    'init_distributed',
    'load_checkpoint',
    'load_trained_model',
    'load_weights',
    'load_yaml_config',
    'make_loader',
    'parse_kwargs',
    'plot_curves',
    'save_checkpoint',
    'save_weights',
    'seed_everything',
    'to_device',
    'write_csv',
    'write_json',
]
