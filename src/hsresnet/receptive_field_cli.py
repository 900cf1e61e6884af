"""Receptive fields (RQ1): which input pixels each output group of a block, or each channel of a trained network's
stages, depends on; the theoretical field and the effective field over real Fashion-MNIST images.

  hsresnet receptive-field block --width 8 --s 5 --output runs/rf              # HS vs Res2Net vs a 3x3 conv
  hsresnet receptive-field network RUN_DIR [RUN_DIR ...] --output runs/rf      # per-channel fields per stage

Writes JSON and CSV tables and a PNG (block: heat maps per output group; network: histograms per stage). The
effective field's size is the side of the smallest centred square holding --share of the mean absolute gradient of
the centre output (Luo et al. 2016). See docs/study.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List

import torch

from .engine.logs import new_figure, save_figure, write_csv, write_json

KINDS = ('conv', 'res2net', 'hs')


def fashion_mnist_canvas(count: int, size: int, mean: float = 0.2860, std: float = 0.3530) -> torch.Tensor:
    """``count`` Fashion-MNIST test images centred on a black ``size x size`` canvas (or centre-cropped to it),
    normalised: (N, 1, size, size). Real images for the effective fields; a canvas leaves room for fields larger
    than the 28 px image."""
    from .classification.data import FashionMNIST, find_fashion_mnist

    images = torch.from_numpy(FashionMNIST(find_fashion_mnist(), 'test').images[:count].copy())
    n, side = images.shape[0], images.shape[-1]
    canvas = torch.zeros(n, 1, size, size)
    keep = min(size, side)
    src, dst = (side - keep) // 2, (size - keep) // 2
    canvas[:, 0, dst : dst + keep, dst : dst + keep] = images[:, src : src + keep, src : src + keep].float() / 255
    return (canvas - mean) / std


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='action', metavar='ACTION', required=True)
    block = sub.add_parser('block', help='per output group of one block: HS, Res2Net and a plain 3x3 conv')
    block.add_argument('--width', type=int, default=8, help='channels per group (default 8)')
    block.add_argument('--s', type=int, default=5, help='groups (HS s, Res2Net scale; default 5)')
    block.add_argument('--size', type=int, default=33, help='odd input size in pixels (default 33)')
    block.add_argument('--images', type=int, default=256, help='Fashion-MNIST test images averaged (default 256)')
    block.add_argument('--inits', type=int, default=4, help='random initialisations averaged (default 4)')
    net = sub.add_parser('network', help='per channel of each stage of trained classifiers')
    net.add_argument('checkpoints', nargs='+', help='run folders or .safetensors of `hsresnet train` (Fashion-MNIST)')
    net.add_argument('--size', type=int, default=65, help='odd canvas size the 28 px images are centred on (65)')
    net.add_argument('--images', type=int, default=32, help='Fashion-MNIST test images averaged (default 32)')
    net.add_argument('--channels', type=int, default=64, help='channels sampled per stage, evenly (default 64)')
    net.add_argument('--stages', nargs='+', default=['layer1', 'layer2', 'layer3', 'layer4'], help='stage modules')
    for p in (block, net):
        p.add_argument('--share', type=float, default=0.95, help='share of the gradient mass (default 0.95)')
        p.add_argument('--output', default='runs/receptive_field', help='folder for the JSON, CSV and PNG')
        p.add_argument('--threads', type=int, default=None, help='torch CPU threads')


def run_block(args: argparse.Namespace) -> Dict[str, Any]:
    from .receptive_field import block_groups, effective_rf, erf_size, theoretical_rf

    channels = args.width * args.s
    # pixel values in [0, 1] (a block's input follows a ReLU in a bottleneck), the same image in every channel
    images = fashion_mnist_canvas(args.images, args.size, mean=0.0, std=1.0).expand(-1, channels, -1, -1)
    rows, maps = [], {}
    for kind in KINDS:
        total = None
        for seed in range(args.inits):
            torch.manual_seed(seed)
            block, groups, expected = block_groups(kind, args.width, args.s)
            heat = effective_rf(block, images, groups)
            total = heat if total is None else total + heat
        measured = theoretical_rf(block, channels, groups, args.size)
        maps[kind] = (groups, total / args.inits)
        for g, field, exp_field, heat in zip(groups, measured, expected, total):
            rows.append(
                {
                    'block': kind,
                    'group': g.name,
                    'channels': g.stop - g.start,
                    'theoretical_rf': field,
                    'theoretical_rf_by_construction': exp_field,
                    'erf_size': erf_size(heat, args.share),
                }
            )
    _plot_block(maps, rows, Path(args.output) / 'block_erf.png', args)
    return {'width': args.width, 's': args.s, 'share': args.share, 'images': args.images, 'rows': rows}


def _plot_block(maps, rows: List[Dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    cols = max(len(groups) for groups, _ in maps.values())
    from matplotlib.patches import Rectangle

    fig, axes = new_figure(len(maps), cols, figsize=(1.9 * cols, 2.1 * len(maps)), squeeze=False)
    crop = min(args.size // 2, args.s + 2)
    c = args.size // 2
    for r, (kind, (groups, heat)) in enumerate(maps.items()):
        sizes = [row for row in rows if row['block'] == kind]
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k >= len(groups):
                ax.axis('off')
                continue
            ax.imshow(heat[k][c - crop : c + crop + 1, c - crop : c + crop + 1].numpy(), cmap='magma')
            side = sizes[k]['erf_size']
            ax.add_patch(Rectangle((crop - side / 2, crop - side / 2), side, side, fill=False, ec='cyan', lw=1))
            ax.set_title(f'{kind} ${groups[k].name}$\nRF {sizes[k]["theoretical_rf"]}, ERF {side}', fontsize=8)
    fig.suptitle(
        f'Effective receptive field per output group (mean |gradient| of the centre over {args.images} Fashion-MNIST '
        f'images, {args.inits} inits; square: {args.share:.0%} of the mass), width {args.width}, s {args.s}',
        fontsize=8,
    )
    save_figure(fig, path)


def _label(meta: Dict[str, Any]) -> str:
    kwargs = json.loads(meta.get('model_kwargs') or '{}')
    own = {k: v for k, v in kwargs.items() if k in ('w', 's', 'base_width')}
    return meta['model'] + ''.join(f'-{k}{v}' for k, v in sorted(own.items()))


def run_network(args: argparse.Namespace) -> Dict[str, Any]:
    from .classification.task import load_classifier
    from .receptive_field import network_erf_sizes

    results: Dict[str, Any] = {}
    for checkpoint in args.checkpoints:
        model, meta = load_classifier(checkpoint)
        if int(meta.get('in_chans', 1)) != 1:
            raise ValueError(f'{checkpoint} was trained on {meta["in_chans"]}-channel images; give Fashion-MNIST runs.')
        images = fashion_mnist_canvas(args.images, args.size, meta['mean'][0], meta['std'][0])
        sizes = network_erf_sizes(model, images, args.stages, args.share, args.channels)
        label = _label(meta)
        while label in results:
            label += "'"
        results[label] = {'checkpoint': meta['checkpoint'], 'stages': sizes}
    summary = []
    for label, result in results.items():
        for stage, values in result['stages'].items():
            q1, median, q3 = statistics.quantiles(values, n=4, method='inclusive')
            summary.append(
                {
                    'model': label,
                    'stage': stage,
                    'channels': len(values),
                    'median': median,
                    'q1': q1,
                    'q3': q3,
                    'min': min(values),
                    'max': max(values),
                    'distinct_sizes': len(set(values)),
                }
            )
    _plot_network(results, Path(args.output) / 'network_erf.png', args)
    return {'share': args.share, 'size': args.size, 'images': args.images, 'models': results, 'summary': summary}


def _plot_network(results: Dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    fig, axes = new_figure(1, len(args.stages), figsize=(4 * len(args.stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], args.stages):
        values = [v for r in results.values() for v in r['stages'][stage]]
        bins = range(min(values), max(values) + 3, 2)
        for label, result in results.items():
            ax.hist(result['stages'][stage], bins=bins, histtype='step', lw=1.5, label=label)
        ax.set_title(f'{stage}: per-channel ERF size', fontsize=9)
        ax.set_xlabel(f'side of the square with {args.share:.0%} of the gradient mass (px)')
        ax.set_ylabel('channels')
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size < 3 or args.size % 2 == 0:
        raise ValueError(f'--size {args.size}: give an odd size >= 3, so the output has a centre pixel.')
    if not 0 < args.share < 1:
        raise ValueError(f'--share {args.share}: give a fraction between 0 and 1, e.g. 0.95.')
    out = Path(args.output)
    if args.action == 'block':
        result = run_block(args)
        rows = result['rows']
    else:
        result = run_network(args)
        rows = [
            {'model': m, 'stage': stage, 'erf_size': v}
            for m, r in result['models'].items()
            for stage, values in r['stages'].items()
            for v in values
        ]
        write_csv(out / 'network_erf_summary.csv', result['summary'])
    write_json(out / f'{args.action}_erf.json', result)
    write_csv(out / f'{args.action}_erf.csv', rows)
    for row in result.get('summary', rows):  # network: the summary per stage
        print('  '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))
    print(f'wrote {out}/{args.action}_erf.{{json,csv,png}}')
    return 0
