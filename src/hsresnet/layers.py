"""The Hierarchical-Split block (Yuan et al., arXiv 2010.07621, Sec. 3) and its strided counterpart.

Both map ``s * width`` channels to ``s * width`` channels, so either replaces the 3x3 conv of a ResNet
bottleneck. The exact arithmetic, including what the paper leaves open, is specified in ``docs/architecture.md``.
"""

import inspect
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

__all__ = ['HSBlock', 'HSStridedBlock', 'hs_widths', 'check_hs_args', 'adapt_norm_layer', 'DOWN_MODES']

DOWN_MODES = ('pool_conv', 'conv')


def check_hs_args(width: int, s: int, down: str = 'pool_conv') -> None:
    """Refuse a configuration the spec does not define, naming the parameter, the value and what is allowed."""
    if isinstance(s, bool) or not isinstance(s, int) or s < 2:
        raise ValueError(f'HS block: s={s!r} is invalid; the split count s must be an integer >= 2 (paper uses 2-8).')
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(
            f'HS block: width={width!r} is invalid; each of the s groups needs an integer width >= 1 channel '
            '(in a network width = floor(planes * w / 64): raise w).'
        )
    if down not in DOWN_MODES:
        raise ValueError(f'HS block: down={down!r} is invalid; choose one of {DOWN_MODES}.')


def hs_widths(width: int, s: int) -> List[int]:
    """Channel counts ``c_2 .. c_s`` of the cascade: ``c_2 = width``, ``c_i = width + floor(c_{i-1} / 2)``."""
    check_hs_args(width, s)
    widths = [width]
    for _ in range(s - 2):
        widths.append(width + widths[-1] // 2)
    return widths


def adapt_norm_layer(norm_layer: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Let a norm layer that only takes ``C`` (torchvision's ``FrozenBatchNorm2d``) accept timm's device/dtype."""
    try:
        params = inspect.signature(norm_layer).parameters
    except (TypeError, ValueError):  # builtins without a signature: assume the full torch.nn contract
        return norm_layer
    if 'device' in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return norm_layer

    def norm_without_factory_kwargs(num_features: int, device=None, dtype=None, **kwargs) -> nn.Module:
        return norm_layer(num_features, **kwargs).to(device=device, dtype=dtype)

    norm_without_factory_kwargs.__name__ = getattr(norm_layer, '__name__', 'norm_layer')
    return norm_without_factory_kwargs


def has_hooks(module: nn.Module) -> bool:
    """True when forward (pre-)hooks would run on ``module``'s call, its own or global ones: the hand-written paths,
    which skip some module calls, then call the modules instead."""
    own = module._forward_hooks or module._forward_pre_hooks
    glob = nn.modules.module
    return bool(own or glob._global_forward_hooks or glob._global_forward_pre_hooks)


def _eager_relu(x: torch.Tensor, act: nn.Module) -> bool:
    """True for a ReLU block run eagerly: nothing traces (fx proxies, fake tensors, jit.trace), compiles or exports
    the forward, so the block may use its hand-written paths (``_ReLUConcatConv`` under autograd, ``out=`` writes into
    preallocated buffers without it; the same numbers, less memory and fewer copies). Everything else sees the plain
    split/concat formulation, which compilers and exporters fuse themselves; so does an activation with hooks (the
    hand-written paths apply the ReLU without calling the module)."""
    return (
        type(act) is nn.ReLU
        and not has_hooks(act)
        and type(x) is torch.Tensor
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


class _ReLUConcat(torch.autograd.Function):
    """``cat([head, relu(t_1), relu(t_2), ...], dim=1)`` that keeps only its output for the backward pass.

    The ReLU masks are read back from the output (``relu(t) > 0`` exactly where ``t > 0``), so in training each
    activation of the cascade is stored once, in the tensor the next conv saves anyway, instead of once by its ReLU
    and again by the concat. Gradients are those of ``torch.cat`` and ``torch.relu`` (first order only). Each ReLU
    and each ReLU gradient runs on its own whole tensor, not on a channel slice of the concat: strided elementwise
    ops on slices made a channels_last bf16 training step about 10 % slower.
    """

    @staticmethod
    def forward(ctx, head: torch.Tensor, *tails: torch.Tensor) -> torch.Tensor:
        out = torch.cat([head, *(torch.relu(t) for t in tails)], dim=1)
        ctx.save_for_backward(out)
        ctx.sizes = [head.shape[1]] + [t.shape[1] for t in tails]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        grads, outs = torch.split(grad, ctx.sizes, dim=1), torch.split(out, ctx.sizes, dim=1)
        tails = (torch.ops.aten.threshold_backward(g, o, 0) for g, o in zip(grads[1:], outs[1:]))
        return (grads[0], *tails)


class _ReLUConcatConv(torch.autograd.Function):
    """``conv2d(cat([head, relu(t_1), relu(t_2), ...], dim=1), weight, bias, ...)`` that keeps ``head`` and the
    ``relu(t_k)``, not their concat, for the backward pass.

    In the HS block ``head`` is a channel slice of the block's input, which autograd keeps anyway (``x_{i+1}`` before
    each cascade conv, ``x_1`` before the bottleneck's conv3); saving the concat would store those channels a second
    time. The backward pass rebuilds the concat instead (one copy). Casts follow autocast: the conv runs in the dtype
    of its output and the gradients return in the dtypes of the inputs. First order only.
    """

    @staticmethod
    def forward(ctx, weight, bias, stride, padding, dilation, groups, head, *tails):
        kept = [torch.relu(t) for t in tails]
        out = nn.functional.conv2d(torch.cat([head, *kept], dim=1), weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(weight, head, *kept)
        ctx.conv_args = (list(stride), list(padding), list(dilation), groups, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        weight, head, *kept = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv_args
        inp = torch.cat([t.to(grad.dtype) for t in (head, *kept)], dim=1)
        grad_inp, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, inp, weight.to(grad.dtype), None, stride, padding, dilation, False, [0, 0], groups,
            [True, True, has_bias],
        )  # fmt: skip
        del inp
        grad_head, *grad_kept = torch.split(grad_inp, [t.shape[1] for t in (head, *kept)], dim=1)
        grad_tails = [
            torch.ops.aten.threshold_backward(g, k.to(g.dtype), 0).to(k.dtype) for g, k in zip(grad_kept, kept)
        ]
        grad_bias = grad_bias.to(weight.dtype) if has_bias else None
        # weight, bias, stride, padding, dilation, groups, head, *tails
        return (grad_weight.to(weight.dtype), grad_bias, None, None, None, None, grad_head.to(head.dtype), *grad_tails)


def _relu_concat_conv(conv: nn.Module, head: torch.Tensor, *tails: torch.Tensor) -> torch.Tensor:
    """``conv(cat([head, relu(t_1), ...]))`` under autograd, keeping each activation once: through
    ``_ReLUConcatConv`` for a plain ``nn.Conv2d`` without hooks, else through ``_ReLUConcat`` and the module."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != 'zeros' or has_hooks(conv):
        return conv(_ReLUConcat.apply(head, *tails))
    args = (conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return _ReLUConcatConv.apply(*args, head, *tails)


class HSBlock(nn.Module):
    """The stride-1 Hierarchical-Split cascade (paper Sec. 3.1, Fig. 2).

    The input is split into ``s`` groups ``x_1 .. x_s`` of ``width`` channels. ``y_1 = x_1`` (identity),
    ``y_2 = F_2(x_2)``, ``y_i = F_i(cat(x_i, y_{i-1,2}))``; each ``y_i`` (``i < s``) is split into its first
    ``ceil(c_i / 2)`` channels ``y_{i,1}``, which go to the output, and the rest ``y_{i,2}``, which is
    forwarded. ``out = cat(y_1, y_{2,1}, ..., y_{s-1,1}, y_s)`` has ``s * width`` channels for any parity.
    ``F_i`` is a 3x3 conv ``c_i -> c_i`` + norm + activation.

    Args:
        width: channels per group (``w`` in the paper, after the bottleneck's ``planes * w / 64`` scaling).
        s: number of groups, >= 2.
        dilation: dilation (and padding) of every 3x3 conv.
        norm_layer: called as ``norm_layer(C)``; ``FrozenBatchNorm2d`` works.
        act_layer: activation class, built with ``inplace=True``.

    The output may be modified in place (an in-place ReLU, ``out += shortcut``), as a 3x3 conv's may. A network
    whose next layer is a conv stores less in training through :meth:`forward_into`, as ``HSBottleneck`` does.
    """

    def __init__(
        self,
        width: int,
        s: int,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.widths = hs_widths(width, s)
        self.width = width
        self.s = s
        self.channels = s * width
        # channels of each y_i that go to the output (ceil half; the last group gives all of it)
        self.out_widths = [c - c // 2 for c in self.widths[:-1]] + [self.widths[-1]]
        norm_layer = adapt_norm_layer(norm_layer)
        dd = {'device': device, 'dtype': dtype}
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, 3, padding=dilation, dilation=dilation, bias=False, **dd) for c in self.widths
        )
        self.bns = nn.ModuleList(norm_layer(c, **dd) for c in self.widths)
        self.act = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not self._fast_path(x):
            return self._forward_cat(x)
        if torch.is_grad_enabled():
            head, tails = self._cascade(x)
            return torch.cat([head, *(torch.relu(t) for t in tails)], dim=1)
        return self._forward_into_buffer(x)

    @torch.jit.unused
    def forward_into(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        """``conv(self(x))``; in eager training without the output concat being stored: ``conv`` (a bottleneck's
        1x1 conv3) takes the block's pieces through ``_ReLUConcatConv``, so ``x_1`` is kept once, inside ``x``."""
        if not (torch.is_grad_enabled() and self._fast_path(x)):
            return conv(self(x))
        head, tails = self._cascade(x)
        return _relu_concat_conv(conv, head, *tails)

    @torch.jit.unused
    def _fast_path(self, x: torch.Tensor) -> bool:
        return _eager_relu(x, self.act)

    def _forward_cat(self, x: torch.Tensor) -> torch.Tensor:
        """The cascade with split/concat: differentiable, and what compilers and exporters see (they fuse it)."""
        groups = torch.split(x, self.width, dim=1)
        outs = [groups[0]]
        forwarded = groups[0]  # placeholder of the right type for TorchScript; replaced before first use
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = groups[i + 1] if i == 0 else torch.cat([groups[i + 1], forwarded], dim=1)
            y = self.act(bn(conv(y)))
            keep = self.out_widths[i]
            outs.append(y[:, :keep])
            forwarded = y[:, keep:]
        return torch.cat(outs, dim=1)

    @torch.jit.unused
    def _cascade(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Eager training up to the output concat -> (``x_1``, [``y_{2,1}``, ..., ``y_s``] before their ReLU). Every
        ReLU inside the cascade runs in the conv that consumes it (``_ReLUConcatConv``): autograd keeps each
        activation once and never a copy of ``x``."""
        groups = torch.split(x, self.width, dim=1)
        tails = []
        y = self.bns[0](self.convs[0](groups[1]))  # before the ReLU
        for i in range(len(self.convs) - 1):
            # split, not two slices: its backward is one concat, where each slice's backward would zero-fill y's
            # shape and the two results would then be added
            head, forwarded = torch.split(y, [self.out_widths[i], self.widths[i] - self.out_widths[i]], dim=1)
            tails.append(head)
            y = self.bns[i + 1](_relu_concat_conv(self.convs[i + 1], groups[i + 2], forwarded))
        tails.append(y)
        return groups[0], tails

    @torch.jit.unused
    def _forward_into_buffer(self, x: torch.Tensor) -> torch.Tensor:
        """Eager inference without concat: the ReLU writes ``y_{i,1}`` straight into the preallocated output and
        ``y_{i,2}`` straight behind ``x_{i+1}`` in the next conv's input, so each activation is written once."""
        w, last = self.width, len(self.convs) - 1
        out = torch.empty_like(x)  # keeps x's memory format (contiguous or channels_last)
        out[:, :w] = x[:, :w]  # y_1 = x_1
        inp, start = x[:, w : 2 * w], w
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = bn(conv(inp))
            keep = self.out_widths[i]
            if i == last:
                torch.clamp_min(y, 0.0, out=out[:, start:])
            else:
                inp = torch.empty_like(x[:, : self.widths[i + 1]])  # cat(x_{i+1}, y_{i,2}), filled in place
                inp[:, :w] = x[:, (i + 2) * w : (i + 3) * w]
                torch.clamp_min(y[:, :keep], 0.0, out=out[:, start : start + keep])
                torch.clamp_min(y[:, keep:], 0.0, out=inp[:, w:])
            start += keep
        return out

    def extra_repr(self) -> str:
        return f'width={self.width}, s={self.s}, widths={self.widths}'


class HSStridedBlock(nn.Module):
    """The block at a downsampling position (first block of stages 2-4): no cascade, as the authors describe.

    ``down='pool_conv'``: ``x_1`` goes through ``AvgPool2d(3, stride, padding=1)`` and every other group through
    its own 3x3 conv ``width -> width`` + norm + activation, all with the stride; the per-group convs are one
    grouped conv (``groups = s - 1``), which is the same arithmetic. ``down='conv'``: one dense 3x3 conv
    ``s * width -> s * width`` + norm + activation. The structure depends on the nominal position only: with a
    dilated backbone (``output_stride`` 8/16) ``stride`` is 1, the conv dilates and the state_dict is unchanged.
    The ``pool_conv`` output may be modified in place, as :class:`HSBlock`'s; the ``conv`` output is that of a
    conv + norm + ReLU, which autograd keeps for the ReLU's backward, as it does for any such module.
    """

    def __init__(
        self,
        width: int,
        s: int,
        stride: int = 2,
        dilation: int = 1,
        down: str = 'pool_conv',
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_hs_args(width, s, down)
        self.width = width
        self.s = s
        self.down = down
        self.channels = s * width
        norm_layer = adapt_norm_layer(norm_layer)
        dd = {'device': device, 'dtype': dtype}
        conv_chs = self.channels if down == 'conv' else self.channels - width
        groups = 1 if down == 'conv' else s - 1
        self.pool: Optional[nn.Module] = None if down == 'conv' else nn.AvgPool2d(3, stride, padding=1)
        self.conv = nn.Conv2d(
            conv_chs, conv_chs, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False, **dd
        )
        self.bn = norm_layer(conv_chs, **dd)
        self.act = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return self.act(self.bn(self.conv(x)))
        identity, rest = torch.split(x, [self.width, self.channels - self.width], dim=1)  # one concat in backward
        if torch.jit.is_scripting() or torch.is_grad_enabled() or not self._fast_path(x):
            return torch.cat([self.pool(identity), self.act(self.bn(self.conv(rest)))], dim=1)
        return self._forward_into_buffer(identity, rest)

    @torch.jit.unused
    def forward_into(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        """``conv(self(x))``; in eager training without the output concat being stored (see
        :meth:`HSBlock.forward_into`): the pooled ``x_1`` and the ReLU's output are kept once each."""
        if self.pool is None or not (torch.is_grad_enabled() and self._fast_path(x)):
            return conv(self(x))
        identity, rest = torch.split(x, [self.width, self.channels - self.width], dim=1)
        return _relu_concat_conv(conv, self.pool(identity), self.bn(self.conv(rest)))

    @torch.jit.unused
    def _fast_path(self, x: torch.Tensor) -> bool:
        return _eager_relu(x, self.act)

    @torch.jit.unused
    def _forward_into_buffer(self, identity: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """Eager inference without concat: the ReLU writes the conv groups straight into the output buffer."""
        y = self.bn(self.conv(rest))
        n, _, h, w = y.shape
        nhwc = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        out = torch.empty((n, self.channels, h, w), dtype=y.dtype, device=y.device, memory_format=fmt)
        out[:, : self.width] = self.pool(identity)
        torch.clamp_min(y, 0.0, out=out[:, self.width :])
        return out

    def extra_repr(self) -> str:
        return f'width={self.width}, s={self.s}, down={self.down!r}'
