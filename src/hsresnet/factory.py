"""``create_model``: timm's factory with the one error that names an unknown model and suggests close names; and
``freeze_stages``, the one stage freezer of the detection and segmentation backbones."""

from __future__ import annotations

import difflib
from typing import Sequence

import timm
import torch.nn as nn


def check_model_name(name: str, what: str = 'model') -> None:
    """Refuse a name timm does not know with one ``ValueError`` that suggests close names (``what``: 'model',
    'backbone', ...)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f' Did you mean {", ".join(close)}?' if close else ''
        raise ValueError(
            f'Unknown {what} {name!r}.{hint} HS-ResNets: {", ".join(timm.list_models("hs_*"))}; any timm model name '
            'also works (timm.list_models() lists them).'
        )


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` for any timm or HS-ResNet model; an unknown name is a ``ValueError``.

    >>> create_model('hs_resnet50', num_classes=10, w=13, s=7, down='conv')  # doctest: +SKIP
    """
    check_model_name(name)
    return timm.create_model(name, **kwargs)


def freeze_stages(model: nn.Module, stages: Sequence[str], trainable_layers: int) -> None:
    """Stop gradients to all but the last ``trainable_layers`` of ``stages`` (direct children of ``model``), counted
    from the deepest, as torchvision's detection builders do: one more than ``len(stages)`` also trains the stem, every
    child before the first stage."""
    if not 0 <= trainable_layers <= len(stages) + 1:
        raise ValueError(
            f'trainable_layers={trainable_layers} is invalid: choose 0-{len(stages) + 1} (as torchvision; '
            f'{len(stages) + 1} trains the whole backbone, stem included).'
        )
    children = [name for name, _ in model.named_children()]
    stem = children[: children.index(stages[0])]
    trained = list(reversed(stages))[:trainable_layers] + (stem if trainable_layers > len(stages) else [])
    for name, param in model.named_parameters():
        if name.split('.')[0] not in trained:
            param.requires_grad_(False)
