"""Params and MACs of HS-ResNets (closed form, equal to FlopCounterMode's count): the w x s grid, the budget
solver and the preset table.

  hsresnet complexity --depth 50 --w 12 16 18 22 28 --s 4 5 6 8      # the grid (markdown, --format csv|json)
  hsresnet complexity --reference resnet50 --tolerance 0.05            # (w, s) within 5 % of ResNet-50
  hsresnet complexity --params 25.5e6 --macs 4.1e9 --w 8:40 --s 2:10   # an explicit budget, custom ranges
  hsresnet complexity --presets                                        # the named presets vs resnet50

MACs are multiply-accumulates of convs and linear layers at batch 1 (FLOPs = 2 x MACs); params include norm
affine params and the classifier. See docs/complexity.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from typing import Any, Dict, List, Optional, Sequence

from .complexity import (
    D_VARIANT_KWARGS,
    DOWN_MODES,
    Complexity,
    Fit,
    check_network_args,
    count_timm_model,
    hs_resnet_complexity,
    preset_complexities,
    solve_budget,
)
from .engine.config import POSITIVE
from .models import LAYOUTS

GRID_W, GRID_S = [12, 16, 18, 22, 28], [4, 5, 6, 8]  # the spec's table
SOLVER_W, SOLVER_S = list(range(8, 33)), list(range(2, 9))
FORMATS = ('markdown', 'csv', 'json')


def int_or_range(text: str) -> List[int]:
    """``'18'`` -> ``[18]``, ``'8:12'`` -> ``[8, 9, 10, 11, 12]`` (inclusive)."""
    try:
        if ':' in text:
            lo, hi = (int(v) for v in text.split(':'))
            if lo > hi:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not an integer or an inclusive range LO:HI (e.g. 8:32)'
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    net = parser.add_argument_group('network (the same for the grid, the solver and the presets)')
    net.add_argument('--depth', type=int, default=50, choices=sorted(LAYOUTS), help='ResNet layout (default 50)')
    net.add_argument('--down', default='pool_conv', choices=DOWN_MODES, help='strided block style (default pool_conv)')
    net.add_argument(
        '--stem', default='plain', choices=('plain', 'd'), help="'d': deep 3x3 stem + avg-down shortcuts (hs_resnet*d)"
    )
    net.add_argument('--small-input', action='store_true', help='3x3 stride-1 stem, no max-pool (28-64 px images)')
    net.add_argument(
        '--input-size', type=int, nargs='+', default=[224], metavar='N', help='H (square) or H W (default 224)'
    )
    net.add_argument('--num-classes', type=int, default=1000, help='classifier classes, 0: no head (default 1000)')
    net.add_argument('--in-chans', type=int, default=3, help='input channels (default 3)')
    net.add_argument('--output-stride', type=int, default=32, choices=(8, 16, 32), help='default 32')

    grid = parser.add_argument_group('configurations')
    grid.add_argument(
        '--w',
        type=int_or_range,
        nargs='+',
        metavar='W',
        help='w values or ranges LO:HI (grid: 12 16 18 22 28; solver: 8:32)',
    )
    grid.add_argument(
        '--s', type=int_or_range, nargs='+', metavar='S', help='s values or ranges (grid: 4 5 6 8; solver: 2:8)'
    )

    budget = parser.add_argument_group('budget solver (list the (w, s) that fit, closest first)')
    budget.add_argument('--reference', metavar='MODEL', help='a timm model name: its params and MACs are the budget')
    budget.add_argument('--params', type=POSITIVE, help='params budget, e.g. 25.5e6')
    budget.add_argument('--macs', type=POSITIVE, help='MACs budget, e.g. 4.1e9')
    budget.add_argument('--tolerance', type=float, default=0.05, help='relative tolerance (default 0.05 = 5 %%)')
    budget.add_argument('--top', type=int, default=0, help='print only the N closest fits (default: all)')

    parser.add_argument(
        '--presets', action='store_true', help='the named HS-ResNet-50 presets vs --reference (resnet50)'
    )
    parser.add_argument('--format', default='markdown', choices=FORMATS, help='output format (default markdown)')


def net_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of ``hs_resnet_complexity`` (and of ``HSResNet``) that the flags select."""
    if len(args.input_size) > 2:
        raise ValueError(f'--input-size {args.input_size} is invalid; give H (square) or H W.')
    names = ('depth', 'down', 'num_classes', 'in_chans', 'output_stride', 'small_input')
    kwargs: Dict[str, Any] = {name: getattr(args, name) for name in names}
    kwargs['input_size'] = tuple(args.input_size)
    if args.stem == 'd':
        kwargs.update(D_VARIANT_KWARGS)
    check_network_args(**kwargs)
    return kwargs


def describe(kwargs: Dict[str, Any]) -> str:
    h, w = kwargs['input_size'] * 2 if len(kwargs['input_size']) == 1 else kwargs['input_size']
    name = f'HS-ResNet-{kwargs["depth"]}{"-D" if kwargs.get("avg_down") else ""}'
    extras = [f'down={kwargs["down"]}', f'{h}x{w} input', f'{kwargs["num_classes"]} classes']
    if kwargs['in_chans'] != 3:
        extras.append(f'in_chans={kwargs["in_chans"]}')
    if kwargs['output_stride'] != 32:
        extras.append(f'output_stride={kwargs["output_stride"]}')
    if kwargs['small_input']:
        extras.append('small_input')
    return f'{name} ({", ".join(extras)})'


def flatten(values: Optional[Sequence[List[int]]], default: List[int]) -> List[int]:
    if not values:
        return default
    return sorted({v for chunk in values for v in chunk})


def render(rows: List[Dict[str, Any]], fmt: str, title: str, markdown: str, meta: Dict[str, Any]) -> str:
    if fmt == 'json':
        return json.dumps({**meta, 'rows': rows}, indent=2)
    if fmt == 'csv':
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ['w', 's'], lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip('\n')
    return f'{title}\n\n{markdown}' if markdown else title


def table(header: List[str], body: List[List[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in body]
    return '\n'.join(lines)


def cell(c: Complexity) -> str:
    return f'{c.mparams:.1f} M / {c.gmacs:.2f} G'


def row(c: Complexity, **fields: Any) -> Dict[str, Any]:
    return {**fields, 'params': c.params, 'macs': c.macs, 'params_m': round(c.mparams, 3), 'gmacs': round(c.gmacs, 3)}


def run_grid(args: argparse.Namespace, kwargs: Dict[str, Any]) -> int:
    ws, ss = flatten(args.w, GRID_W), flatten(args.s, GRID_S)
    grid = {(w, s): hs_resnet_complexity(w, s, **kwargs) for s in ss for w in ws}
    title = f'{describe(kwargs)}: params (M) / GMACs per (w, s); MACs = FLOPs / 2'
    markdown = table(['s \\ w'] + [str(w) for w in ws], [[str(s)] + [cell(grid[w, s]) for w in ws] for s in ss])
    rows = [row(c, w=w, s=s) for (w, s), c in grid.items()]
    print(render(rows, args.format, title, markdown, {'network': describe(kwargs)}))
    return 0


def run_budget(args: argparse.Namespace, kwargs: Dict[str, Any]) -> int:
    if args.reference and (args.params or args.macs):
        raise ValueError('give either --reference MODEL or --params/--macs, not both.')
    params, macs, source = args.params, args.macs, 'budget'
    if args.reference:
        ref = count_timm_model(
            args.reference, kwargs['input_size'], num_classes=args.num_classes, in_chans=args.in_chans
        )
        params, macs, source = ref.params, ref.macs, args.reference
    ws, ss = flatten(args.w, SOLVER_W), flatten(args.s, SOLVER_S)
    fits: List[Fit] = solve_budget(params, macs, args.tolerance, ws, ss, **kwargs)
    if args.top > 0:
        fits = fits[: args.top]
    budget = ', '.join(
        text for text in (params and f'{params / 1e6:.2f} M params', macs and f'{macs / 1e9:.2f} GMACs') if text
    )
    title = (
        f'{source}: {budget}, tolerance {args.tolerance:.0%}; {describe(kwargs)} with w in {ws[0]}..{ws[-1]}, '
        f's in {ss[0]}..{ss[-1]}: {len(fits)} fit(s), closest first'
    )
    header = ['w', 's', 'params (M)', 'GMACs']
    header += ['params / budget'] * (params is not None) + ['MACs / budget'] * (macs is not None) + ['distance']
    body = [
        [str(f.w), str(f.s), f'{f.complexity.mparams:.2f}', f'{f.complexity.gmacs:.2f}']
        + [f'{r:.3f}' for r in (f.params_ratio, f.macs_ratio, f.distance) if r is not None]
        for f in fits
    ]
    rows = [
        row(f.complexity, w=f.w, s=f.s, params_ratio=f.params_ratio, macs_ratio=f.macs_ratio, distance=f.distance)
        for f in fits
    ]
    meta = {'network': describe(kwargs), 'reference': args.reference, 'budget_params': params, 'budget_macs': macs}
    meta['tolerance'] = args.tolerance
    print(render(rows, args.format, title, table(header, body) if fits else '', meta))
    return 0 if fits else 1


def run_presets(args: argparse.Namespace, kwargs: Dict[str, Any]) -> int:
    if args.depth != 50:
        raise ValueError(f'--presets describes the HS-ResNet-50 presets; --depth {args.depth} is not allowed with it.')
    if args.params or args.macs:
        raise ValueError('--presets compares with --reference MODEL; --params/--macs are not allowed with it.')
    reference = args.reference or 'resnet50'
    ref = count_timm_model(reference, kwargs['input_size'], num_classes=args.num_classes, in_chans=args.in_chans)
    rows, body = [], []
    for name, (w, s, c) in preset_complexities(**{k: v for k, v in kwargs.items() if k != 'depth'}).items():
        pr, mr = c.params / ref.params, c.macs / ref.macs
        if kwargs.get('avg_down'):  # the presets' (w, s) on the d variant, which has no preset name of its own
            name = f'hs_resnet50d (w={w}, s={s})'
        rows.append(row(c, model=name, w=w, s=s, params_ratio=round(pr, 4), macs_ratio=round(mr, 4)))
        body.append([f'`{name}`', str(w), str(s), f'{c.mparams:.2f}', f'{c.gmacs:.2f}', f'{pr:.2f}', f'{mr:.2f}'])
    body.append([f'`{reference}` (reference)', '', '', f'{ref.mparams:.2f}', f'{ref.gmacs:.2f}', '1.00', '1.00'])
    header = ['model', 'w', 's', 'params (M)', 'GMACs', f'params / {reference}', f'MACs / {reference}']
    alias = '' if kwargs.get('avg_down') else ' (hs_resnet50 = hs_resnet50_18w_5s)'
    title = f'{describe(kwargs)} presets{alias}; MACs = FLOPs / 2'
    meta = {'network': describe(kwargs), 'reference': reference, 'reference_params': ref.params}
    meta['reference_macs'] = ref.macs
    print(render(rows, args.format, title, table(header, body), meta))
    return 0


def run(args: argparse.Namespace) -> int:
    kwargs = net_kwargs(args)
    if args.presets:
        return run_presets(args, kwargs)
    if args.reference or args.params or args.macs:
        return run_budget(args, kwargs)
    return run_grid(args, kwargs)
