"""Export a trained classifier to safetensors, TorchScript and ONNX; each export is checked on the way out.

TorchScript is compared with the eager model; ONNX is run with onnxruntime and compared with the eager model. Every
file is written and checked in a staging folder and moved into --output only when all checks pass, so a mismatch
leaves no unverified file where a good one is expected. ``export.json`` records the classes and the preprocessing.
--output must be new, empty or (with --overwrite) an earlier export; a training run folder is never written into.
``--optimize`` makes the TorchScript file from :func:`hsresnet.optimize.optimize` instead: BN folded into the convs,
channels_last, and bf16 where this machine has native bf16. ONNX stays float32 NCHW, the portable form (the exporter
folds BN itself; runtimes pick their own precision and layout).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict

import torch

from ..engine import save_weights, write_json
from ..engine.checkpoint import CHECKPOINT_HELP
from ..engine.config import POSITIVE, POSITIVE_INT
from ..engine.outputs import EXPORT_RECORD, claim_export_folder
from .task import load_classifier

FORMATS = ('safetensors', 'torchscript', 'onnx')
BF16_ATOL = 5e-2  # bf16 keeps 8 bits of mantissa: logits move by about 1 % of their scale through a deep net


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help=CHECKPOINT_HELP)
    parser.add_argument('--output', required=True, help='folder for model.safetensors, model.ts and model.onnx.')
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier export in --output.')
    parser.add_argument('--formats', nargs='+', default=list(FORMATS), choices=FORMATS, help='what to export.')
    parser.add_argument('--opset', type=POSITIVE_INT, default=18, help='ONNX opset.')
    parser.add_argument('--atol', type=POSITIVE, default=1e-4, help='tolerance of the output checks (x max |logit|).')
    parser.add_argument(
        '--optimize',
        action='store_true',
        help='TorchScript of hsresnet.optimize(model): BN folded, channels_last, bf16 where the device has native bf16 '
        f'(then checked at --atol {BF16_ATOL:g}). ONNX is float32 either way (the exporter folds BN itself).',
    )


def _check(name: str, expected: torch.Tensor, got: torch.Tensor, atol: float) -> float:
    err = float((expected - got).abs().max())
    tol = atol * max(1.0, float(expected.abs().max()))
    if not err <= tol:  # NaN fails too
        raise ValueError(f'{name} export differs from the PyTorch model by {err:.3g} (> {tol:.3g}); not trusted.')
    return err


def export(args: argparse.Namespace) -> Dict[str, Any]:
    model, meta = load_classifier(args.checkpoint)
    out = Path(args.output)
    claim_export_folder(out, args.overwrite)
    c, s = int(meta.get('in_chans', 3)), int(meta.get('img_size', 224))
    example = torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(example)
    if not bool(torch.isfinite(expected).all()):
        raise ValueError(f'{meta["checkpoint"]} gives NaN or infinite outputs; there is nothing sound to export.')
    with tempfile.TemporaryDirectory(prefix='.export-', dir=out) as tmp:
        report = _export_into(Path(tmp), model, meta, example, expected, args)
        for name in report['files'].values():  # all checked: move them in, export.json last
            os.replace(Path(tmp) / name, out / name)
    report['files'] = {fmt: str(out / name) for fmt, name in report['files'].items()}
    write_json(out / EXPORT_RECORD, report)
    return report


def _export_into(
    folder: Path, model: torch.nn.Module, meta: Dict[str, Any], example: torch.Tensor, expected: torch.Tensor, args
) -> Dict[str, Any]:
    """Write and check every format in ``folder``; the report names the files relative to it."""
    c, s = example.shape[1], example.shape[2]
    report: Dict[str, Any] = {'model': meta['model'], 'input_shape': [-1, c, s, s], 'files': {}, 'max_abs_err': {}}
    script_model, script_atol = model, args.atol
    if args.optimize:
        from ..optimize import optimize

        script_model = optimize(model)
        report['optimized'] = {'torchscript_dtype': str(script_model.dtype).replace('torch.', ''), 'bn_folded': True}
        if script_model.dtype == torch.bfloat16:
            script_atol = max(args.atol, BF16_ATOL)
    if 'safetensors' in args.formats:
        keep = {k: v for k, v in meta.items() if not k.startswith('_') and k != 'checkpoint'}
        save_weights(folder / 'model.safetensors', model.state_dict(), keep)
        report['files']['safetensors'] = 'model.safetensors'
    if 'torchscript' in args.formats:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # jit deprecation and the input-check TracerWarning: checked below
            torch.jit.trace(script_model, example[:1], check_trace=False).save(str(folder / 'model.ts'))
            got = torch.jit.load(str(folder / 'model.ts'))(example)
        report['max_abs_err']['torchscript'] = _check('TorchScript', expected, got, script_atol)
        report['files']['torchscript'] = 'model.ts'
    if 'onnx' in args.formats:
        import onnxruntime as ort

        write_onnx(model, example, folder / 'model.onnx', args.opset)
        session = ort.InferenceSession(str(folder / 'model.onnx'), providers=['CPUExecutionProvider'])
        (got,) = session.run(None, {session.get_inputs()[0].name: example.numpy()})
        report['max_abs_err']['onnx'] = _check('ONNX (onnxruntime)', expected, torch.from_numpy(got), args.atol)
        report['files']['onnx'] = 'model.onnx'
    report['preprocessing'] = {k: meta.get(k) for k in ('img_size', 'mean', 'std', 'crop_pct', 'interpolation')}
    report['classes'] = meta.get('classes')
    return report


def write_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int = 18) -> None:
    """The project's ONNX file: torch.onnx's dynamo exporter, input ``input``, output ``logits``, a dynamic batch axis,
    weights inside the file."""
    batch = torch.export.Dim('batch', min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=['input'],
        output_names=['logits'],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )


def run(args: argparse.Namespace) -> int:
    report = export(args)
    print(json.dumps({k: v for k, v in report.items() if k != 'classes'}, indent=2))
    return 0
