"""``create_model``: timm's factory with the one error that names an unknown model and suggests close names."""

from __future__ import annotations

import difflib

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
