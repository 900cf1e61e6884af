"""``hsresnet.optimize(model)``: a fast inference path for HS-ResNets (and any conv net).

Folds every eval-mode BatchNorm into the conv that feeds it, lays the weights out ``channels_last``, runs in
bfloat16 where the hardware has fast bf16 matrix units (CPU: AMX or AVX512-BF16; GPU: bf16 tensor cores), and
optionally compiles. The result is an inference-only module: it returns float32 logits, its state_dict no longer
has norm layers, and it must not be trained. Measured speed and accuracy: ``docs/performance.md``.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ['optimize', 'fold_batchnorm', 'fast_bf16_available', 'OptimizedModel']


@functools.cache
def fast_bf16_available(device: Union[str, torch.device] = 'cpu') -> bool:
    """True where bf16 convolutions are faster than fp32: CUDA with bf16 tensor cores (compute capability >= 8),
    or a CPU whose oneDNN has native bf16 kernels (AMX or AVX512-BF16; emulated bf16 would be slower)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != 'cpu' or not torch.backends.mkldnn.is_available():
        return False
    try:
        flags = open('/proc/cpuinfo').read()
    except OSError:  # not Linux: trust oneDNN's own check only when it is there
        flags = ''
    native = 'amx_bf16' in flags or 'avx512_bf16' in flags
    return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold, in place, every ``BatchNorm2d`` whose input is exactly one ``Conv2d``'s output into that conv.

    The pairs are found on an ``torch.fx`` trace of the model (so the folding follows the real data flow, not module
    order); the modules are then replaced by name in the original model, which keeps its class and methods: the
    conv gets the folded weight and a bias, the norm becomes ``nn.Identity``. The model must be in eval mode: a
    folded BN uses its running statistics, which is exact in eval (up to float rounding).
    """
    if model.training:
        raise ValueError(
            'fold_batchnorm: the model is in training mode; call model.eval() first (BN folding uses the '
            'running statistics, which only eval mode uses).'
        )
    try:
        graph = _LeafConvTracer().trace(model)
    except Exception as e:  # data-dependent control flow and the like
        raise ValueError(
            f'fold_batchnorm: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); call '
            'optimize(model, fold_bn=False) to skip BN folding.'
        ) from e
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != 'call_module' or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == 'call_module'
            and isinstance(modules.get(src.target), nn.Conv2d)
            and len(src.users) == 1
            and modules[node.target].track_running_stats
        ):
            pairs.append((src.target, node.target))
    for conv_name, bn_name in pairs:
        _set_module(model, conv_name, fuse_conv_bn_eval(modules[conv_name], modules[bn_name]))
        _set_module(model, bn_name, nn.Identity())
    return model


class _LeafConvTracer(torch.fx.Tracer):
    """An fx tracer that keeps every conv and norm (subclasses included, e.g. the stem's channel-checked conv)
    as one module call, so conv -> BN pairs are visible in the graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, module_qualified_name)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, module)


class OptimizedModel(nn.Module):
    """The inference wrapper :func:`optimize` returns: converts the input to the model's memory format and dtype,
    and returns float32 outputs. ``.model`` is the folded (and possibly compiled) network."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=self.dtype, memory_format=self.memory_format)
        return self.model(x).float()


def optimize(
    model: nn.Module,
    *,
    fold_bn: bool = True,
    channels_last: bool = True,
    bf16: Optional[bool] = None,
    compile: Union[bool, str] = False,
    inplace: bool = False,
) -> OptimizedModel:
    """Return a fast inference version of ``model``: BN folded into convs, channels_last, bf16 and torch.compile.

    Args:
        model: any image model (an ``hs_resnet*``, a timm or torchvision CNN) on its target device.
        fold_bn: fold eval-mode BatchNorm2d layers into the convs before them (:func:`fold_batchnorm`).
        channels_last: lay weights and inputs out NHWC (oneDNN's and cuDNN's fastest conv layout).
        bf16: run weights and activations in bfloat16; ``None`` picks it where :func:`fast_bf16_available` says
            the device has native bf16 units. Outputs are cast back to float32.
        compile: ``True`` compiles the folded model with inductor's ``freezing`` (weights as constants, prepacked),
            a string compiles with that ``torch.compile`` mode (``'max-autotune'`` ...).
        inplace: modify ``model`` itself instead of a deep copy.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f'optimize: expected a torch.nn.Module, got {type(model).__name__}.')
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    if fold_bn:
        fold_batchnorm(model)
    if bf16 is None:
        bf16 = fast_bf16_available(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model.to(dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    if compile is True:  # freezing: weights become constants, so inductor prepacks them for oneDNN/cuDNN
        model = torch.compile(model, options={'freezing': True})
    elif compile:
        model = torch.compile(model, mode=compile)
    return OptimizedModel(model, dtype, channels_last).eval()
