"""Atomic checkpoints: model weights as safetensors plus the training state as a ``torch.save`` file.

A checkpoint named ``<dir>/last`` is ``last.state.pt`` (the model weights, their metadata, epoch, step, optimizer,
scheduler, EMA, RNG states, the resolved config, the metric history), which alone is what ``--resume`` needs, and
``last.safetensors``, the same weights for people and tools. Each file is written to a temporary name, flushed and
then renamed over the old one (``os.replace``), the state first: a kill or a full disk at any moment leaves the
previous state file or the new one, never half a file, and never a pair that cannot be resumed (the weights file
may lag one save behind the state, which is complete by itself). Loading uses ``safetensors`` and
``torch.load(weights_only=True)``; weights with NaN or infinite values are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .outputs import atomic_write

FORMAT = 'hsresnet-checkpoint-v1'
WEIGHTS_SUFFIX = '.safetensors'
STATE_SUFFIX = '.state.pt'


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, foreign, or made for another model."""


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: Optional[Dict] = None) -> Path:
    """Write a state_dict as safetensors, atomically; ``metadata`` (JSON-able) goes in the header."""
    path = Path(path)
    tensors = {k: v.detach().to('cpu').contiguous().clone() for k, v in state_dict.items()}
    meta = {'format': FORMAT, 'meta': json.dumps(metadata or {}, default=str)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_weights(path: str | Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a safetensors file -> (state_dict, metadata). A checkpoint stem or a run directory also works."""
    path = resolve_checkpoint_path(path, WEIGHTS_SUFFIX)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), 'pt') as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f'{path} is not a readable safetensors file ({err}); it may be truncated or not a weights file. '
            'Pass an intact .safetensors checkpoint.'
        ) from None
    try:
        meta = json.loads(header.get('meta', '{}'))
    except json.JSONDecodeError:
        meta = {}
    meta['_format'] = header.get('format')
    check_finite(tensors, path)
    return tensors, meta


def resolve_checkpoint_path(path: str | Path, suffix: str = WEIGHTS_SUFFIX) -> Path:
    """Accept a run directory (-> its ``last``), a stem (``runs/x/last``) or a full file name."""
    p = Path(path)
    if p.is_dir():
        p = p / 'last'
    name = p.name
    for s in (WEIGHTS_SUFFIX, STATE_SUFFIX):
        if name.endswith(s):
            p = p.with_name(name[: -len(s)])
            break
    p = p.with_name(p.name + suffix)
    if not p.is_file():
        raise CheckpointError(f'checkpoint file {p} does not exist: pass a run directory, a checkpoint stem or file.')
    return p


def save_checkpoint(stem: str | Path, model: nn.Module, state: Dict[str, Any], metadata: Dict[str, Any]) -> None:
    """Save ``<stem>.state.pt`` (``state`` with the weights of ``model`` and ``metadata``), then
    ``<stem>.safetensors`` (the weights), each atomically."""
    stem = Path(stem)
    weights = {k: v.detach().to('cpu').contiguous().clone() for k, v in model.state_dict().items()}
    state = {**state, 'format': FORMAT, 'model': weights, 'meta': metadata}
    atomic_write(stem.with_name(stem.name + STATE_SUFFIX), lambda tmp: torch.save(state, tmp))
    save_weights(stem.with_name(stem.name + WEIGHTS_SUFFIX), weights, metadata)


def load_checkpoint(path: str | Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """Load a training checkpoint -> (weights, training state, metadata) from its state file; refuse anything
    truncated, foreign or with non-finite weights."""
    try:
        state_path = resolve_checkpoint_path(path, STATE_SUFFIX)
    except CheckpointError:
        weights = Path(path)
        if weights.is_file() and weights.suffix == WEIGHTS_SUFFIX:
            raise CheckpointError(
                f'{weights} holds weights only, no training state: resume from the run folder (or its '
                'last.state.pt); to start a new run from these weights, fine-tune instead of resuming.'
            ) from None
        raise
    try:
        state = torch.load(state_path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many types for truncated/foreign pickles
        raise CheckpointError(
            f'{state_path} is not a readable training state ({type(err).__name__}: {str(err)[:200]}); it may be '
            'truncated or foreign. Resume from an intact checkpoint written by `hsresnet train`.'
        ) from None
    if not isinstance(state, dict) or state.get('format') != FORMAT or not isinstance(state.get('model'), dict):
        raise CheckpointError(f'{state_path} is not an hsresnet training checkpoint (format {FORMAT!r} expected).')
    weights, meta = state.pop('model'), dict(state.pop('meta', {}))
    check_finite(weights, state_path)
    meta['_format'] = FORMAT
    return weights, state, meta


def check_finite(weights: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights holding NaN or infinite values (a diverged run), naming the tensors."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f'{source} holds NaN or infinite values in {len(bad)} tensor(s) ({", ".join(bad[:3])}'
            f'{" ..." if len(bad) > 3 else ""}): the run that saved it diverged. Use an earlier checkpoint (e.g. '
            'model_best) or retrain with a lower --lr.'
        )


def check_compatible(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str, meta: Dict) -> None:
    """Raise ``CheckpointError`` naming the difference when ``weights`` do not fit ``model`` exactly."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f'{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}'
        for k, v in own.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        what = meta.get('model', 'an unknown model')
        details = '; '.join(
            part
            for part in (
                f'missing keys {missing[:5]}' if missing else '',
                f'unexpected keys {unexpected[:5]}' if unexpected else '',
                f'shape mismatches {shapes[:3]}' if shapes else '',
            )
            if part
        )
        raise CheckpointError(
            f'checkpoint {source} (made for {what}, num_classes={meta.get("num_classes")}) does not fit the model '
            f'being built: {details}. Use the same --model, --model-kwargs and class count as the run that saved it.'
        )


CHECKPOINT_HELP = 'a .safetensors file, a checkpoint stem, or a run directory (its model_best, else model, else last).'


def load_trained_model(
    path: str | Path, task: str, build: Callable[[Dict[str, Any], Dict[str, torch.Tensor]], nn.Module], command: str
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model a ``task`` checkpoint was trained as (``build(metadata, weights)``) and load its weights
    strictly -> (model in eval mode, metadata with ``checkpoint``: the file read). ``path``: a ``.safetensors`` file,
    a stem, or a run directory (its ``model_best``, else ``model``, else ``last``). ``command`` writes such files."""
    path = Path(path)
    if path.is_dir():  # its final weights, else its last checkpoint
        finals = [path / f'{name}{WEIGHTS_SUFFIX}' for name in ('model_best', 'model')]
        path = next((final for final in finals if final.is_file()), path)
    path = resolve_checkpoint_path(path)
    weights, meta = load_weights(path)
    if meta.get('task', 'classification') != task:
        raise ValueError(
            f'{path} is not a {task} checkpoint (task={meta.get("task")!r}): pass a run directory or .safetensors '
            f'file written by `{command}`.'
        )
    model = build(meta, weights)
    check_compatible(model, weights, str(path), meta)
    model.load_state_dict(weights)
    meta['checkpoint'] = str(path)
    return model.eval(), meta


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path, name: str) -> None:
    """Load a classification checkpoint of the timm model ``name`` (safetensors, timm keys) into ``backbone``, that
    model or its ``features_only`` form, strictly: only the classifier (``name``'s pretrained config ``classifier``,
    ``fc`` for ResNets) is left out on both sides; any other missing, unexpected or wrongly shaped key is a
    ``ValueError`` that lists them and says how to build a backbone that fits."""
    import timm

    classifier = getattr(timm.models.get_pretrained_cfg(name), 'classifier', None) or 'fc'
    skip = tuple(f'{c}.' for c in (classifier if isinstance(classifier, (list, tuple)) else [classifier]))
    hint = (
        f'Use a checkpoint of the same model and variant as --backbone {name} (the same --backbone-kwargs: w, s, down, '
        'stem) as the classification run that wrote it.'
    )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f'backbone checkpoint {path} does not exist; pass the .safetensors file written by `hsresnet train`.'
        )
    if path.suffix != '.safetensors':
        raise ValueError(
            f'backbone checkpoint {path}: expected a .safetensors file (the classification CLI writes model weights '
            'as safetensors).'
        )
    state, _ = load_weights(path)
    state = {k.removeprefix('module.'): v for k, v in state.items() if not k.startswith(skip)}
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:

        def head(keys: list) -> str:
            return ', '.join(keys[:5]) + (f' ... ({len(keys)} in all)' if len(keys) > 5 else '')

        raise ValueError(
            f'backbone checkpoint {path} does not match the backbone: missing keys [{head(missing)}], unexpected keys '
            f'[{head(unexpected)}], shape mismatches [{head(shapes)}]. {hint}'
        )
    backbone.load_state_dict(state, strict=False)  # strictness checked above; only the classifier is left out
