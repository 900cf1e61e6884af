"""The ``hsresnet`` command line: one entry point, one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when
their command runs, so ``hsresnet --help`` stays fast. A command reports a problem of the user's making (a bad value,
a missing or unreadable file, a full disk) by raising; ``main`` prints it as one sentence, ``hsresnet <command>:
error: ...``, and exits with 2 (130 when interrupted), instead of a traceback (``HSRESNET_TRACEBACK=1`` shows it).

Output: a command's result (JSON, tables) goes to stdout; everything said along the way (progress, epoch lines,
skipped files, warnings) goes through the ``hsresnet`` logger to stderr, as ``hsresnet <command>: message``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

# command -> (module, one-line help)
COMMANDS = {
    'train': ('hsresnet.classification.train', 'train and evaluate an image classifier (default: Fashion-MNIST)'),
    'validate': ('hsresnet.classification.validate', 'top-1/top-5 of a checkpoint on a dataset, confusion matrix'),
    'predict': ('hsresnet.classification.predict', 'top-k labels of images or a folder, as JSON'),
    'export': ('hsresnet.classification.export', 'export a checkpoint to safetensors, TorchScript and ONNX'),
    'complexity': ('hsresnet.complexity_cli', 'params/MACs of HS-ResNets: the w x s grid and the budget solver'),
    'benchmark': ('hsresnet.benchmark', 'speed/memory/MACs vs resnet50 baselines (ratios), --sweep over s'),
    'segment': ('hsresnet.segmentation.cli', 'semantic segmentation (DeepLabV3+): train, eval, predict'),
    'detect': ('hsresnet.detection.cli', 'Faster/Mask R-CNN detection and instance segmentation: train, eval, predict'),
    'data': ('hsresnet.prepare', 'data prepare: small real datasets (tree crowns, nuclei) from package wheels'),
    'receptive-field': ('hsresnet.receptive_field_cli', 'receptive fields of blocks and trained networks (RQ1)'),
    'study': ('hsresnet.study.cli', 'controlled comparisons with same-skeleton baselines: run, report (YAML)'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='hsresnet', description='HS-ResNet (Hierarchical-Split block, arXiv 2010.07621): models, tasks and tools.'
    )
    from . import __version__

    parser.add_argument('--version', action='version', version=f'hsresnet {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ['--help'])  # prints help or the error for an unknown command
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    prog = f'hsresnet {name}'
    log_to_stderr(prog)
    try:
        module = importlib.import_module(module_name)
        from .engine.config import RecipeParser  # a command with -c/--config reads its YAML recipe under its flags

        parser = RecipeParser(prog=prog, description=module.__doc__ or help_text)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        prog += f' {args.action}' if isinstance(getattr(args, 'action', None), str) else ''
        return int(module.run(args) or 0)
    except KeyboardInterrupt as err:
        print(f'{prog}: {err or "interrupted"}', file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get('HSRESNET_TRACEBACK'):  # for bug reports: the full traceback instead of the sentence
            raise
        print(f'{prog}: error: {user_message(err)}', file=sys.stderr)
        return 2


class _ProgressSafeHandler(logging.Handler):
    """Writes a record to stderr through ``tqdm.write``, which keeps an open progress bar whole."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def log_to_stderr(prog: str) -> None:
    """Show the ``hsresnet`` logger's records (INFO and above) on stderr as ``<prog>: message``."""
    logger = logging.getLogger('hsresnet')
    handler = next((h for h in logger.handlers if isinstance(h, _ProgressSafeHandler)), None)
    if handler is None:
        handler = _ProgressSafeHandler()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(f'{prog}: %(message)s'))
    logger.setLevel(logging.INFO)


# the import name of each package an extra of pyproject.toml adds (the model library needs torch, torchvision, timm)
EXTRA_OF_PACKAGE = {
    **dict.fromkeys(
        ('numpy', 'PIL', 'yaml', 'safetensors', 'tqdm', 'torchmetrics', 'tensorboard', 'matplotlib'), 'train'
    ),
    'faster_coco_eval': 'detect',
    'segmentation_models_pytorch': 'segment',
    **dict.fromkeys(('onnx', 'onnxruntime', 'onnxscript', 'openvino'), 'export'),
    **dict.fromkeys(('scipy', 'submitit'), 'study'),
}

# what a user's input can cause: bad values (ValueError, the checkpoint/output/study errors derive from it), missing
# or unwritable files (OSError), a diverged run (FloatingPointError), a missing optional package (ImportError)
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)


def user_message(err: BaseException) -> str:
    """The error in one message: a file-system error in words; an error raised in a data-loader worker without the
    wrapper and worker traceback torch adds when it re-raises it; a missing package with the install command."""
    text = str(err)
    marker = f'\n{type(err).__name__}: '
    if 'in DataLoader worker process' in text and marker in text:
        text = text[text.rindex(marker) + len(marker) :].strip()
    elif isinstance(err, OSError) and err.errno is not None:
        from .engine.outputs import describe_os_error

        text = describe_os_error(err)
    elif isinstance(err, ImportError) and err.name:
        extra = EXTRA_OF_PACKAGE.get(err.name.split('.')[0], 'all')
        text = f"{text}: this command needs the '{extra}' extra (pip install 'hsresnet[{extra}]')"
    return text


if __name__ == '__main__':
    sys.exit(main())
