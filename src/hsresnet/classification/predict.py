"""Predict the top-k classes of images (files or folders, searched recursively) with a trained checkpoint.

Prints (or writes with --output) JSON: one entry per image with its top-k labels and probabilities. Files that
are not readable images are listed under "skipped" and do not stop the run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from ..engine import write_json
from ..engine.checkpoint import CHECKPOINT_HELP
from ..engine.config import POSITIVE_INT
from ..engine.distributed import resolve_device
from ..images import open_image, readable
from .task import load_classifier


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('inputs', nargs='+', help='image files and/or folders.')
    parser.add_argument('--checkpoint', required=True, help=CHECKPOINT_HELP)
    parser.add_argument('--topk', type=POSITIVE_INT, default=5, help='how many classes per image.')
    parser.add_argument('-b', '--batch-size', type=POSITIVE_INT, default=64, help='images per forward pass.')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'.")
    parser.add_argument('--output', help='write the JSON here instead of printing it.')


def collect_files(inputs: List[str]) -> Tuple[List[Path], List[Dict[str, str]]]:
    """Expand folders; missing paths go straight to the skipped list."""
    files: List[Path] = []
    skipped: List[Dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob('*') if f.is_file() and not f.name.startswith('.'))
        elif p.is_file():
            files.append(p)
        else:
            skipped.append({'path': str(p), 'reason': 'no such file or folder'})
    return files, skipped


def predict(args: argparse.Namespace) -> Dict[str, Any]:
    from timm.data import create_transform

    model, meta = load_classifier(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    in_chans, size = int(meta.get('in_chans', 3)), int(meta.get('img_size', 224))
    transform = create_transform(
        (in_chans, size, size),
        is_training=False,
        interpolation=meta.get('interpolation', 'bilinear'),
        mean=tuple(meta.get('mean', (0.5,) * in_chans)),
        std=tuple(meta.get('std', (0.5,) * in_chans)),
        crop_pct=meta.get('crop_pct', 1.0),
    )
    classes = meta['classes']
    k = min(args.topk, len(classes))
    files, skipped = collect_files(args.inputs)
    loaded = [(path, transform(image)) for path, image in readable(files, lambda f: open_image(f, in_chans), skipped)]
    predictions = []
    with torch.no_grad():
        for i in range(0, len(loaded), args.batch_size):
            chunk = loaded[i : i + args.batch_size]
            probs = model(torch.stack([x for _, x in chunk]).to(device)).float().softmax(dim=1)
            top_p, top_i = probs.topk(k, dim=1)
            for (path, _), ps, idx in zip(chunk, top_p.tolist(), top_i.tolist()):
                predictions.append(
                    {
                        'path': str(path),
                        'topk': [{'label': classes[j], 'index': j, 'prob': round(p, 6)} for p, j in zip(ps, idx)],
                    }
                )
    return {'model': meta['model'], 'checkpoint': meta['checkpoint'], 'predictions': predictions, 'skipped': skipped}


def run(args: argparse.Namespace) -> int:
    result = predict(args)
    if args.output:
        write_json(args.output, result)
    else:
        print(json.dumps(result, indent=2))
    if not result['predictions']:
        logging.getLogger(__name__).error('no readable image among the inputs.')
        return 1
    return 0
