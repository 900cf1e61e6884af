"""The ``hsresnet`` command line: one entry point, one module per subcommand.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when
their command runs, so ``hsresnet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
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
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f'hsresnet {name}', description=module.__doc__ or help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
