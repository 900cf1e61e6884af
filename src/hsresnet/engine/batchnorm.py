"""Training-mode batch norm for narrow channels_last tensors on the CPU, where PyTorch's own kernel is slow.

PyTorch's CPU batch-norm kernel vectorizes a channels_last (NHWC) tensor along its channels, so on a few channels (the
4- and 6-channel cascade groups of the Fashion-MNIST model) it runs 5-10x slower than on the same tensor in NCHW
(``benchmarks/scripts/narrow_batchnorm.py``). The memory of an NHWC tensor is an ``(N*H*W, C)`` matrix, which can be
read as an ``(N*H*W / k, k*C)`` matrix of ``k*C >= 64`` columns: its per-column statistics, folded over the ``k`` copies
of each channel, are the channel statistics, and the normalization and its gradient are passes over that wide view,
which PyTorch's kernels vectorize well. Measured (forward + backward, bf16, the script above): 2.5-5x faster at 4, 6 and
12 channels, 1.25x at 8, slower at 16 channels and at HS-ResNet-50's 33, where PyTorch's kernel does better, so only
fewer than 16 channels take it. The training engine switches every ``nn.BatchNorm2d`` of a channels_last CPU run to it
(``use_wide_batchnorm``); everything else (eval mode, NCHW, 16 channels or more, compiled or traced code) takes
``nn.BatchNorm2d``'s own path. The state (parameters, running statistics) is the module's own.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

NARROW_CHANNELS = 16  # inputs with fewer channels take the wide view
WIDE_COLUMNS = 64  # the wide view's columns: at least this many


def wide_view(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """An NHWC tensor's memory as an ``(N*H*W / k, k*C)`` matrix, ``k`` the smallest power of two with
    ``k*C >= WIDE_COLUMNS`` that divides ``N*H*W`` (a view, no copy)."""
    n, c, h, w = x.shape
    rows, k = n * h * w, 1
    while k * c < WIDE_COLUMNS and rows % (2 * k) == 0:
        k *= 2
    return x.permute(0, 2, 3, 1).reshape(rows // k, k * c), k


class _WideBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a channels_last ``x`` computed on its wide view; the batch mean and (biased)
    variance come back through ``stats`` for the running averages. Outputs and gradients are channels_last."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, stats: List[torch.Tensor]):
        c = weight.numel()
        xw, k = wide_view(x)
        _, mean_kc, invstd_kc = torch.native_batch_norm(xw, None, None, None, None, True, 0.0, eps)
        mean_kc, var_kc = mean_kc.float().view(k, c), invstd_kc.float().view(k, c).pow(-2) - eps
        mean = mean_kc.mean(0)
        var = (var_kc + mean_kc.square()).mean(0) - mean.square()  # the k groups hold equally many rows
        stats.extend((mean, var))
        ctx.save_for_backward(x, weight, mean, var)
        ctx.k, ctx.eps = k, eps
        scale = weight.float() * (var + eps).rsqrt()
        shift = bias.float() - mean * scale
        out = torch.empty_like(x, memory_format=torch.channels_last)
        torch.addcmul(shift.repeat(k).to(x.dtype), xw, scale.repeat(k).to(x.dtype), out=wide_view(out)[0])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, var = ctx.saved_tensors
        k, eps, c = ctx.k, ctx.eps, weight.numel()
        xw = wide_view(x)[0]
        grad = grad.contiguous(memory_format=torch.channels_last)
        mean_k, var_k = mean.repeat(k), var.repeat(k)
        # eval-mode backward on the wide view: grad * weight * invstd, and per column sum(grad * x_hat) and sum(grad)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            wide_view(grad)[0], xw, weight.float().repeat(k), mean_k, var_k, None, None, False, eps, [True, True, True]
        )
        grad_w, grad_b = grad_w.view(k, c).sum(0), grad_b.view(k, c).sum(0)
        rows = xw.shape[0] * k
        invstd = (var + eps).rsqrt()
        scale = -weight.float() * invstd.square() * grad_w.float() / rows  # training mode adds scale * x + shift
        shift = -weight.float() * invstd * grad_b.float() / rows - scale * mean
        unit = (torch.zeros_like(mean_k), torch.full_like(var_k, 1 - eps))  # batch_norm(x) = x * weight + bias
        correction = F.batch_norm(xw, *unit, scale.repeat(k), shift.repeat(k), False, 0.0, eps)
        out = torch.empty_like(x, memory_format=torch.channels_last)
        torch.add(grad_x, correction, out=wide_view(out)[0])
        return out, grad_w.to(weight.dtype), grad_b.to(weight.dtype), None, None


class WideBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that trains a narrow channels_last CPU input through its wide view (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._takes_wide_path(x):
            return super().forward(x)
        stats: List[torch.Tensor] = []
        out = _WideBatchNorm.apply(x, self.weight, self.bias, self.eps, stats)
        mean, var = stats
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            rows = x.numel() // x.shape[1]
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var * rows / (rows - 1)).to(self.running_var.dtype), momentum)  # unbiased
        return out

    def _takes_wide_path(self, x: torch.Tensor) -> bool:
        return (
            self.training
            and self.affine
            and self.track_running_stats
            and x.device.type == 'cpu'
            and x.dim() == 4
            and 0 < x.shape[1] < NARROW_CHANNELS
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
            and type(x) is torch.Tensor
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )


def use_wide_batchnorm(model: nn.Module) -> int:
    """Switch every plain ``nn.BatchNorm2d`` of ``model`` to :class:`WideBatchNorm2d`, in place (same parameters and
    buffers, so optimizers, EMA and checkpoints are unaffected). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = WideBatchNorm2d
            switched += 1
    return switched
