"""The run configuration: argparse flags with timm's names, a YAML file (``-c``) underneath, CLI flags on top.

Precedence (low to high): the parser defaults, the YAML file given with ``-c/--config``, the flags typed on the
command line. The resolved config is a plain ``argparse.Namespace``; ``config_to_dict`` turns it into the dict that
is saved in checkpoints and summaries.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import yaml


def int_at_least(minimum: int) -> Callable[[Any], int]:
    """An argparse ``type`` (also applied to YAML values) for integers >= ``minimum``: ``2.5``, ``'x'``, ``True`` and
    smaller numbers are refused, not rounded or replaced by a default."""

    def convert(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise argparse.ArgumentTypeError(f'{value!r} is not an integer')
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'{value!r} is not an integer') from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f'{value!r} is too small: give an integer >= {minimum}')
        return number

    convert.__name__ = f'integer >= {minimum}'
    return convert


def float_in(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse ``type`` for finite numbers in ``[low, high]`` (an open end excludes it); NaN and inf are refused."""

    def convert(value: Any) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        inside = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
        if not math.isfinite(number) or not inside:
            span = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'.replace('inf', '∞')
            raise argparse.ArgumentTypeError(f'{value!r} is not a number in {span}')
        return number

    convert.__name__ = 'number'
    return convert


POSITIVE_INT, NON_NEGATIVE_INT = int_at_least(1), int_at_least(0)
POSITIVE, NON_NEGATIVE = float_in(0, low_open=True), float_in(0)
PROBABILITY, BELOW_ONE = float_in(0, 1), float_in(0, 1, high_open=True)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '-c',
        '--config',
        default=None,
        metavar='YAML',
        help='YAML file of defaults (keys are flag names, dashes or underscores); flags typed on the command line '
        'override it.',
    )


def parse_kwargs(items: Any) -> Dict[str, Any]:
    """``['w=16', 'channels=[16,32,64,128]']`` -> ``{'w': 16, 'channels': [16, 32, 64, 128]}`` (values read as YAML);
    a mapping (from a YAML recipe) is taken as it is."""
    if isinstance(items, dict):
        return dict(items)
    if items is not None and not isinstance(items, (list, tuple)):
        raise ValueError(f'model/backbone kwargs must be a mapping or key=value items (e.g. w=16 s=4), got {items!r}.')
    out: Dict[str, Any] = {}
    for item in items or []:
        if isinstance(item, dict):
            out.update(item)
            continue
        key, sep, value = str(item).partition('=')
        if not sep or not key.strip():
            raise ValueError(f'--model-kwargs expects key=value pairs (e.g. w=16 s=4), got {item!r}.')
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_yaml_config(path: str | Path) -> Dict[str, Any]:
    """Read a YAML recipe; keys may use dashes or underscores. Raises ValueError with the fix when it is unusable."""
    path = Path(path)
    if not path.is_file():
        what = 'is a folder' if path.is_dir() else 'does not exist'
        raise ValueError(f'config file {path} {what}: pass an existing YAML file to -c/--config.')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ValueError(f'config file {path} is not a text (UTF-8) file: pass a YAML recipe.') from None
    except yaml.YAMLError as err:
        raise ValueError(f'config file {path} is not valid YAML: {err}') from None
    if not isinstance(data, dict):
        raise ValueError(f'config file {path} must hold a mapping of flag names to values, not {type(data).__name__}.')
    return {str(k).replace('-', '_'): v for k, v in data.items()}


class RecipeParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reads the YAML recipe named by ``-c/--config`` under the typed flags.

    Parsing starts from a namespace that holds the recipe's values, checked and converted as the flags would be
    (``_coerce``); argparse fills in a default only where the namespace has no value, and a typed flag overwrites it.
    Subparsers of a ``RecipeParser`` are ``RecipeParser``s too, so ``hsresnet detect train -c ...`` reads its recipe.
    Unknown keys are an error that names them and the key meant (a typo in a recipe must not be silently ignored).
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = sys.argv[1:] if args is None else list(args)
        actions = {a.dest: a for a in self._actions}  # argparse offers no public accessor for a parser's arguments
        path = _recipe_path(args) if 'config' in actions else None
        if path:
            namespace = namespace if namespace is not None else argparse.Namespace()
            for key, value in read_recipe(path, actions).items():
                setattr(namespace, key, value)
        return super().parse_known_args(args, namespace)


def _recipe_path(args: Sequence[str]) -> Optional[str]:
    """The ``-c/--config`` value among ``args`` (in any of argparse's spellings), or None."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument('-c', '--config')
    return finder.parse_known_args(args)[0].config


def read_recipe(path: str, actions: Dict[str, argparse.Action]) -> Dict[str, Any]:
    """The recipe's values, each checked and converted by the flag ``actions[key]`` it sets."""
    data = load_yaml_config(path)
    known = {k for k in actions if k not in ('help', 'config')}
    unknown = sorted(set(data) - known)
    if unknown:
        import difflib

        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints = ', '.join(f'{k!r} -> {m[0]!r}?' for k, m in close.items() if m)
        raise ValueError(
            f'config file {path} has unknown keys {unknown}{f" (did you mean: {hints})" if hints else ""}; valid keys '
            f'are the flag names of this command (see --help), e.g. {sorted(known)[:6]} ...'
        )
    values = {}
    for key, value in data.items():
        if key.endswith('_kwargs') and isinstance(value, dict):
            value = [f'{k}={yaml.safe_dump(v, default_flow_style=True).strip()}' for k, v in value.items()]
        elif key.endswith('_kwargs') and not isinstance(value, list):
            raise ValueError(f'config file {path}: {key}: {value!r} should be a mapping (w: 16) or k=v items.')
        try:
            values[key] = _coerce(actions[key], value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f'config file {path}: {key}: {err}.') from None
    return values


def _coerce(action: argparse.Action, value: Any) -> Any:
    """Check and convert a YAML value as the flag would its text: its ``type`` (so '1e-3' or 3 become floats where
    the flag wants one, and 2.5 is refused where it wants an integer), its ``choices`` and whether it takes a list."""
    if value is None:
        return value
    if action.nargs == 0:  # a switch (store_true, --x/--no-x)
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f'{value!r} should be true or false')
        return value
    takes_list = action.nargs not in (None, '?')
    if takes_list != isinstance(value, (list, tuple)):
        raise argparse.ArgumentTypeError(f'{value!r} should be {"a list" if takes_list else "a single value"}')
    values = list(value) if takes_list else [value]
    if isinstance(action.nargs, int) and len(values) != action.nargs:
        raise argparse.ArgumentTypeError(f'{value!r} should have {action.nargs} values')
    if action.type is not None:
        values = [action.type(v) for v in values]
    if action.choices is not None and any(v not in action.choices for v in values):
        raise argparse.ArgumentTypeError(f'{value!r} is not one of {sorted(map(str, action.choices))}')
    return values if takes_list else values[0]


def config_to_dict(cfg: argparse.Namespace, skip: Sequence[str] = ()) -> Dict[str, Any]:
    """The config as a JSON/YAML-friendly dict (paths and tuples become strings and lists)."""
    out: Dict[str, Any] = {}
    for key, value in sorted(vars(cfg).items()):
        if key.startswith('_') or key in skip or callable(value):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def amp_mode(value: Any) -> bool | str:
    """``--amp`` / ``amp:`` values: on (``true``, no value), ``false``, or ``auto`` (on where the device has fast
    bf16 units; see ``engine.fit.amp_enabled``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == 'auto':
        return 'auto'
    if text in ('true', 'on', 'yes', '1'):
        return True
    if text in ('false', 'off', 'no', '0'):
        return False
    raise argparse.ArgumentTypeError(
        f'--amp takes no value, or one of auto, true, false; got {value!r} (a path right after --amp is read as its '
        'value: put it before --amp).'
    )


def add_amp_arguments(parser: Any) -> None:
    """``--amp [auto|true|false]`` and ``--amp-dtype`` on a parser or argument group, the same for training and
    evaluation commands."""
    parser.add_argument(
        '--amp',
        nargs='?',
        const=True,
        default=False,
        type=amp_mode,
        metavar='auto|true|false',
        help="mixed precision: bf16 autocast on the CPU, --amp-dtype on GPUs. 'auto' turns it on only where the "
        'device has fast bf16 units (GPUs; CPUs with AMX or AVX512-BF16: elsewhere CPU bf16 is emulated and several '
        'times slower than fp32).',
    )
    parser.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'], help='GPU dtype for --amp.')


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every training task shares (timm's names)."""
    group = parser.add_argument_group('training (engine)')
    group.add_argument(
        '--output', default='runs/train', help='run directory: checkpoints, CSV, TensorBoard, PNG, JSON.'
    )
    group.add_argument('--overwrite', action='store_true', help='start a fresh run even if --output has a checkpoint.')
    group.add_argument('--resume', default=None, metavar='PATH', help='continue from a checkpoint (run dir or file).')
    group.add_argument(
        '--recovery-interval',
        type=NON_NEGATIVE_INT,
        default=0,
        metavar='N',
        help='also checkpoint every N optimizer steps inside an epoch, so --resume loses at most N steps '
        '(0: checkpoints at epoch ends only).',
    )
    group.add_argument('--epochs', type=POSITIVE_INT, default=10, help='number of epochs to train.')
    group.add_argument('-b', '--batch-size', type=POSITIVE_INT, default=128, help='batch size per process.')
    group.add_argument(
        '--grad-accum-steps', type=POSITIVE_INT, default=1, help='micro-batches accumulated per optimizer step.'
    )
    group.add_argument('--opt', default='sgd', help="timm optimizer name ('sgd', 'momentum', 'adamw', 'lamb' ...).")
    group.add_argument(
        '--lr',
        type=POSITIVE,
        default=None,
        help='learning rate; when omitted, lr = --lr-base * global batch / --lr-base-size (linear scaling rule).',
    )
    group.add_argument(
        '--lr-base', type=POSITIVE, default=0.1, help='learning rate for a global batch of --lr-base-size.'
    )
    group.add_argument(
        '--lr-base-size', type=POSITIVE_INT, default=256, help='global batch size that --lr-base refers to.'
    )
    group.add_argument('--momentum', type=BELOW_ONE, default=0.9, help='SGD momentum.')
    group.add_argument(
        '--weight-decay', type=NON_NEGATIVE, default=1e-4, help='weight decay (not on norms and biases).'
    )
    group.add_argument('--clip-grad', type=POSITIVE, default=None, help='clip the gradient norm to this value.')
    group.add_argument('--sched', default='cosine', help="timm scheduler ('cosine', 'step', 'multistep', 'poly' ...).")
    group.add_argument('--warmup-epochs', type=NON_NEGATIVE, default=0, help='linear warm-up length in epochs.')
    group.add_argument(
        '--warmup-lr', type=NON_NEGATIVE, default=1e-5, help='learning rate at the start of the warm-up.'
    )
    group.add_argument('--min-lr', type=NON_NEGATIVE, default=0.0, help='floor of the schedule.')
    group.add_argument('--decay-epochs', type=POSITIVE, default=90, help='step length for --sched step.')
    group.add_argument(
        '--decay-milestones', type=POSITIVE_INT, nargs='+', default=[90, 180, 270], help='for multistep.'
    )
    group.add_argument('--decay-rate', type=POSITIVE, default=0.1, help='lr factor at each step (step/multistep).')
    group.add_argument(
        '--sched-on-epochs', action='store_true', help='update the lr once per epoch (default: every optimizer step).'
    )
    add_amp_arguments(group)
    group.add_argument('--channels-last', action='store_true', help='use the channels_last memory format.')
    group.add_argument(
        '--torchcompile',
        nargs='?',
        const='inductor',
        default=None,
        help='torch.compile the model (optionally name the backend; default inductor).',
    )
    group.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (timm ModelEmaV3).')
    group.add_argument('--model-ema-decay', type=BELOW_ONE, default=0.9998, help='EMA decay per optimizer step.')
    group.add_argument('--seed', type=NON_NEGATIVE_INT, default=42, help='random seed.')
    group.add_argument(
        '--deterministic', action='store_true', help='deterministic algorithms (a resumed run then matches exactly).'
    )
    group.add_argument(
        '-j', '--workers', type=NON_NEGATIVE_INT, default=2, help='data loading processes per training process.'
    )
    group.add_argument('--device', default='auto', help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda'.")
    group.add_argument(
        '--eval-interval', type=POSITIVE_INT, default=1, help='evaluate every N epochs (and after the last).'
    )
    group.add_argument('--no-progress', action='store_true', help='no progress bars (log lines only).')
    group.add_argument('--no-tensorboard', action='store_true', help='do not write TensorBoard events.')
    group.add_argument(
        '--threads', type=POSITIVE_INT, default=None, help='torch CPU threads per process (default: torch).'
    )
