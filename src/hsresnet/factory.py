"""``create_model``: timm's factory with an error that names an unknown model and suggests close names."""

from __future__ import annotations

import difflib

import timm
import torch.nn as nn


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` for any timm or HS-ResNet model; an unknown name is a ``ValueError``.

    >>> create_model('hs_resnet50', num_classes=10, w=13, s=7, down='conv')  # doctest: +SKIP
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f' Did you mean {", ".join(close)}?' if close else ''
        raise ValueError(
            f'Unknown model {name!r}.{hint} HS-ResNets: {", ".join(timm.list_models("hs_*"))}; any timm model name '
            'also works (timm.list_models() lists them).'
        )
    return timm.create_model(name, **kwargs)
