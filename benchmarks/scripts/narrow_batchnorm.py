"""Batch norm on the narrow channels_last tensors of the default Fashion-MNIST model, and a faster form tried and
dropped (docs/classification.md).

PyTorch's CPU batch-norm kernel is slow on channels_last tensors with few channels (the cascade of the main job's
model normalizes 4 and 6 channels at 28x28 in stage 1). The same statistics can be computed on a wide view of the
same memory: an NHWC tensor is an (N*H*W, C) matrix, which can be read as an (N*H*W / k, k*C) matrix with k*C >= 64;
its per-column statistics, folded over the k copies of each channel, are the channel statistics, and the output and
gradients are eval-mode batch-norm passes over that view. Timed here, forward + backward in training mode, for each
narrow shape: NCHW, channels_last (PyTorch's kernel) and channels_last through the wide view; then the main job's
bf16 channels_last training step with every narrow batch norm (fewer than 64 channels) through the wide view against
the plain one, interleaved rounds.

    python benchmarks/scripts/narrow_batchnorm.py [--threads 2] [--repeats 11]
"""

import copy
import statistics
from functools import partial
from typing import List, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import interleaved_times, make_parser, start

SHAPES = ((128, 4, 28, 28), (128, 6, 28, 28), (128, 12, 28, 28), (128, 8, 14, 14), (128, 24, 28, 28))
PLAIN_FORWARD = nn.BatchNorm2d.forward


def wide_view(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """An NHWC tensor as an (N*H*W / k, k*C) matrix, k the smallest power of two with k*C >= 64 that divides N*H*W."""
    n, c, h, w = x.shape
    rows, k = n * h * w, 1
    while k * c < 64 and rows % (2 * k) == 0:
        k *= 2
    return x.permute(0, 2, 3, 1).reshape(rows // k, k * c), k


class WideBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of the wide view ``xw`` (k copies of C channels per row); the batch statistics come
    back through ``stats`` (for the running averages)."""

    @staticmethod
    def forward(ctx, xw, k: int, weight, bias, eps: float, stats: List[torch.Tensor]):
        c = weight.numel()
        _, mean_kc, invstd_kc = torch.native_batch_norm(xw, None, None, None, None, True, 0.0, eps)
        mean_kc, var_kc = mean_kc.float().view(k, c), invstd_kc.float().view(k, c).pow(-2) - eps
        mean = mean_kc.mean(0)
        var = (var_kc + mean_kc.square()).mean(0) - mean.square()
        stats.extend((mean, var))
        ctx.save_for_backward(xw, weight, mean, var)
        ctx.k, ctx.eps = k, eps
        return F.batch_norm(xw, mean.repeat(k), var.repeat(k), weight.repeat(k), bias.repeat(k), False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        xw, weight, mean, var = ctx.saved_tensors
        k, eps, c = ctx.k, ctx.eps, weight.numel()
        tiled = (mean.repeat(k), var.repeat(k))
        # eval-mode backward: grad * weight * invstd, and per column sum(grad * x_hat) and sum(grad)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), xw, weight.repeat(k), *tiled, None, None, False, eps, [True, True, True]
        )
        grad_w, grad_b = grad_w.view(k, c).sum(0), grad_b.view(k, c).sum(0)
        rows = xw.numel() // c
        invstd = (var + eps).rsqrt()
        scale = -weight * invstd.square() * grad_w / rows  # the training-mode terms: scale * x + shift
        shift = -weight * invstd * grad_b / rows - scale * mean
        zero_mean, unit_var = torch.zeros_like(tiled[0]), torch.full_like(tiled[1], 1 - eps)
        grad_x = grad_x + F.batch_norm(xw, zero_mean, unit_var, scale.repeat(k), shift.repeat(k), False, 0.0, eps)
        return grad_x, None, grad_w, grad_b, None, None


def wide_forward(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``nn.BatchNorm2d.forward`` through the wide view for a narrow channels_last input in training."""
    narrow = x.dim() == 4 and x.shape[1] < 64 and x.is_contiguous(memory_format=torch.channels_last)
    if not (self.training and self.affine and self.track_running_stats and narrow and not x.is_contiguous()):
        return PLAIN_FORWARD(self, x)
    n, c, h, w = x.shape
    xw, k = wide_view(x)
    stats: List[torch.Tensor] = []
    out = WideBatchNorm.apply(xw, k, self.weight, self.bias, self.eps, stats)
    with torch.no_grad():
        mean, var = stats
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        rows = x.numel() // c
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(var * rows / max(rows - 1, 1), momentum)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def bn_step(forward, bn: nn.BatchNorm2d, x: torch.Tensor, grad: torch.Tensor) -> None:
    forward(bn, x).backward(grad)


def check(shape: Tuple[int, ...]) -> None:
    """The wide form against PyTorch's kernel in fp32: output, gradients and running statistics."""
    plain, wide = nn.BatchNorm2d(shape[1]), nn.BatchNorm2d(shape[1])
    x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    outs = []
    for bn, forward in ((plain, PLAIN_FORWARD), (wide, wide_forward)):
        xi = x.clone().requires_grad_()
        out = forward(bn, xi)
        out.backward(grad)
        outs.append((out, xi.grad, bn.weight.grad, bn.running_var))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def main() -> None:
    args = start(make_parser(__doc__, repeats=11))
    for shape in SHAPES:
        check(shape)
        bn = nn.BatchNorm2d(shape[1])
        variants = {}
        for name, fmt, forward in (
            ('NCHW', torch.contiguous_format, PLAIN_FORWARD),
            ('channels_last', torch.channels_last, PLAIN_FORWARD),
            ('channels_last, wide view', torch.channels_last, wide_forward),
        ):
            x = torch.randn(shape).bfloat16().contiguous(memory_format=fmt).requires_grad_()
            grad = torch.randn(shape).bfloat16().contiguous(memory_format=fmt)
            variants[name] = partial(bn_step, forward, bn, x, grad)
        times = interleaved_times(variants, args.repeats * 3)
        cells = ', '.join(f'{name} {statistics.median(t) * 1e3:.2f} ms' for name, t in times.items())
        print(f'bf16 batch norm forward + backward {list(shape)}: {cells}', flush=True)
    model = timm.create_model('hs_resnet26_small', num_classes=10, in_chans=1, channels=[16, 32, 64, 128], w=16, s=3)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    steps = {}
    for name in ('plain', 'wide view'):
        net = copy.deepcopy(model).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

        def train_step(net=net, optimizer=optimizer, forward=wide_forward if name == 'wide view' else PLAIN_FORWARD):
            nn.BatchNorm2d.forward = forward
            with torch.autocast('cpu', dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            nn.BatchNorm2d.forward = PLAIN_FORWARD

        steps[name] = train_step
    times = interleaved_times(steps, args.repeats)
    ratio = statistics.median(p / w for p, w in zip(times['plain'], times['wide view']))
    rates = ', '.join(f'{name} {128 / statistics.median(t):.0f} images/s' for name, t in times.items())
    print(f'main job training step, bf16 channels_last: {rates}; wide view / plain speed {ratio:.3f} (paired median)')


if __name__ == '__main__':
    main()
