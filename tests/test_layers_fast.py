"""The production HS blocks (layers.py) against the plain reference written from the spec (reference.py)."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from hsresnet.layers import HSBlock, HSStridedBlock, _relu_concat_conv, _ReLUConcat, _ReLUConcatConv
from hsresnet.reference import ReferenceHSBlock, ReferenceHSStridedBlock, to_reference


def randomize_norms(module: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, so a wrong channel order cannot hide."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return module


def pair(width: int, s: int, **kwargs):
    fast = randomize_norms(HSBlock(width, s, **kwargs)).eval()
    ref = ReferenceHSBlock(width, s, **kwargs).eval()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize('width,s', [(4, 2), (5, 3), (7, 4), (6, 5), (3, 8)])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('channels_last', [False, True])
def test_block_inference_equals_reference(width, s, batch, channels_last):
    fast, ref = pair(width, s)
    x = torch.randn(batch, width * s, 9, 7)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.inference_mode():
        expected = ref(x)
        got = fast(xin)
    assert got.shape == expected.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_fast_paths_are_taken_and_equal_concat_path():
    fast, _ = pair(5, 4)
    x = torch.randn(2, 20, 8, 8)
    with torch.no_grad():
        assert fast._fast_path(x)
        torch.testing.assert_close(fast._forward_into_buffer(x), fast._forward_cat(x), rtol=0, atol=0)
    assert fast._fast_path(x)  # grad enabled: the ReLU-in-concat path, differentiable
    torch.testing.assert_close(fast(x), fast._forward_cat(x), rtol=0, atol=0)
    conv = nn.Conv2d(20, 6, 1)
    torch.testing.assert_close(fast.forward_into(x, conv), conv(fast._forward_cat(x)), rtol=0, atol=0)
    assert not HSBlock(5, 4, act_layer=nn.SiLU)._fast_path(x)  # only ReLU has the fused paths
    calls = []
    fast.act.register_forward_hook(lambda *args: calls.append(1))  # a hooked activation is called as a module
    assert not fast._fast_path(x)
    with torch.no_grad():
        fast(x)
    assert len(calls) == 3  # s - 1 cascade steps


def test_relu_concat_gradients_equal_autograd():
    """The hand-written backward of _ReLUConcat against torch's, with exact zeros and negative inputs."""
    head = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    tails = [torch.randn(2, c, 4, 4, dtype=torch.double).requires_grad_() for c in (2, 5)]
    assert torch.autograd.gradcheck(_ReLUConcat.apply, (head, *tails))
    with torch.no_grad():
        tails[0][0, 0, 0, :2] = 0.0  # relu'(0) = 0, as in torch.relu (a kink: not for gradcheck)
    out = _ReLUConcat.apply(head, *tails)
    ref = torch.cat([head, *(torch.relu(t) for t in tails)], dim=1)
    g = torch.randn_like(out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    got = torch.autograd.grad(out, [head, *tails], g)
    expected = torch.autograd.grad(ref, [head, *tails], g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def saved_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages that autograd keeps for the backward pass of ``block(x)``."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(storages.values())


def test_training_paths_store_each_activation_once():
    """Under autograd a block feeding the next conv (``forward_into``) keeps less for backward than
    split/ReLU/concat (same numbers)."""
    x = torch.randn(2, 90, 14, 14, requires_grad=True)
    conv3 = nn.Conv2d(90, 32, 1)  # the bottleneck's next conv, which saves the block's output
    block = HSBlock(18, 5).train()
    plain = saved_bytes(lambda t: conv3(block._forward_cat(t)), x)
    fused = saved_bytes(lambda t: block.forward_into(t, conv3), x)
    # split/ReLU/concat keeps the ReLU outputs (27+31+33+18 = 109 channels) besides the concat that conv3 keeps,
    # and each cascade conv's input concat with its copy of x_{i+1} (3 x 18 channels) besides x itself
    assert fused <= plain - (109 + 3 * 18) * 2 * 14 * 14 * 4, (fused, plain)
    strided = HSStridedBlock(18, 5, stride=2).train()
    conv_part = lambda t: strided.act(strided.bn(strided.conv(t[:, 18:])))  # noqa: E731
    plain = saved_bytes(lambda t: conv3(torch.cat([strided.pool(t[:, :18]), conv_part(t)], 1)), x)
    assert saved_bytes(lambda t: strided.forward_into(t, conv3), x) <= plain - 72 * 2 * 7 * 7 * 4


def backward_node_names(out: torch.Tensor) -> set:
    """Names of every node of ``out``'s autograd graph."""
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_training_paths_split_without_slice_backward():
    """The blocks split their input and each y_i with torch.split, whose backward is one concat: a channel slice's
    backward would zero-fill the whole tensor per slice and add the results (about 1 % of a training step)."""
    x = torch.randn(2, 90, 8, 8, requires_grad=True)
    for block in (HSBlock(18, 5), HSStridedBlock(18, 5, stride=2)):
        names = backward_node_names(block.train()(x))
        assert 'SplitWithSizesBackward0' in names and 'SliceBackward0' not in names, (block, names)
    assert 'SliceBackward0' in backward_node_names(HSBlock(18, 5)._forward_cat(x))  # what the check would catch


def assert_same_training_step(fast: nn.Module, ref: nn.Module, x_fast: torch.Tensor, x_ref: torch.Tensor) -> None:
    """One forward/backward in training mode: equal outputs, input and parameter gradients, BN running statistics."""
    x1, x2 = x_fast.detach().clone().requires_grad_(), x_ref.detach().clone().requires_grad_()
    y1, y2 = fast.train()(x1), ref.train()(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (name, p1), p2 in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=name)
    for b1, b2 in zip(fast.buffers(), ref.buffers()):  # running statistics updated identically
        torch.testing.assert_close(b1, b2)


@pytest.mark.parametrize('channels_last', [False, True])
def test_block_training_forward_and_gradients_equal_reference(channels_last):
    fast, ref = pair(5, 5)
    x = torch.randn(2, 25, 6, 6)
    assert_same_training_step(fast, ref, x.contiguous(memory_format=torch.channels_last) if channels_last else x, x)


@pytest.mark.parametrize('down', ['pool_conv', 'conv'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_strided_block_equals_reference(down, channels_last):
    fast = randomize_norms(HSStridedBlock(4, 4, stride=2, down=down)).eval()
    ref = ReferenceHSStridedBlock(4, 4, stride=2, down=down).eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 16, 9, 9)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.inference_mode():
        torch.testing.assert_close(fast(xin), ref(x), rtol=1e-5, atol=1e-5)
    assert_same_training_step(fast, ref, xin, x)


def test_to_reference_model_same_state_dict_and_outputs():
    model = randomize_norms(timm.create_model('hs_resnet26_small', num_classes=10)).eval()
    ref = to_reference(copy.deepcopy(model)).eval()
    kinds = {type(m).__name__ for m in ref.modules()}
    assert {'ReferenceHSBlock', 'ReferenceHSStridedBlock'} <= kinds
    assert not {'HSBlock', 'HSStridedBlock'} & kinds
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_static_forward_script_fx_export():
    fast, ref = pair(4, 4)
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        expected = ref(x)
        scripted = torch.jit.script(fast)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
        traced = torch.fx.symbolic_trace(fast)
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(fast, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bias,stride,dilation,groups', [(False, 1, 1, 1), (True, 2, 2, 1), (True, 1, 1, 2)])
def test_relu_concat_conv_gradients_equal_autograd(bias, stride, dilation, groups):
    """The hand-written backward of _ReLUConcatConv (it rebuilds the concat) against autograd of cat/relu/conv2d."""
    head = torch.randn(2, 4, 7, 6, dtype=torch.double, requires_grad=True)
    tail = torch.randn(2, 2, 7, 6, dtype=torch.double, requires_grad=True)
    weight = torch.randn(4, 8 // groups, 3, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True) if bias else None
    tail2 = torch.randn(2, 2, 7, 6, dtype=torch.double, requires_grad=True)
    conv_args = ((stride, stride), (dilation, dilation), (dilation, dilation), groups)
    inputs = (weight, b, head, tail, tail2)
    assert torch.autograd.gradcheck(lambda w, b, *t: _ReLUConcatConv.apply(w, b, *conv_args, *t), inputs)
    out = _ReLUConcatConv.apply(weight, b, *conv_args, head, tail, tail2)
    ref = nn.functional.conv2d(torch.cat([head, torch.relu(tail), torch.relu(tail2)], 1), weight, b, *conv_args)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_relu_concat_conv_under_bf16_autocast_and_hooks():
    """Under autocast the conv runs in bf16 and the gradients come back in the inputs' dtypes, equal to autograd's;
    a conv with a forward hook is called as a module (the hook fires), with the same numbers."""
    conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
    head, tail = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 2, 5, 5, requires_grad=True)
    g = torch.randn(2, 6, 5, 5)
    results = []
    for fused in (True, False):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            if fused:
                out = _relu_concat_conv(conv, head, tail)
            else:
                out = conv(torch.cat([head, torch.relu(tail)], 1))
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out, [head, tail, conv.weight], g.to(out.dtype))
        assert [t.dtype for t in grads] == [torch.float32] * 3
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda *args: calls.append(1))  # a global hook too
    try:
        _relu_concat_conv(conv, head, tail)
    finally:
        handle.remove()
    assert len(calls) == 1
    conv.register_forward_hook(lambda *args: calls.append(1))
    torch.testing.assert_close(_relu_concat_conv(conv, head, tail), conv(torch.cat([head, torch.relu(tail)], 1)))
    assert len(calls) == 3


@pytest.mark.parametrize('channels_last', [False, True])
def test_bottleneck_conv3_takes_block_pieces_in_training(channels_last):
    """In eager training HSBottleneck feeds the HS block's pieces to conv3 without storing their concat: the same
    outputs, gradients and BN statistics as block-then-conv3 (forced by a hook), and w channels fewer kept."""
    from hsresnet.models import HSBottleneck

    fused = randomize_norms(HSBottleneck(64, 16, base_width=24, s=4)).train()  # width 6, mid 24
    plain = copy.deepcopy(fused)
    plain.conv2.register_forward_hook(lambda *args: None)  # a hooked block is called as a module
    assert fused._fuse_conv2_conv3(torch.randn(2, 24, 8, 8)) and not plain._fuse_conv2_conv3(torch.randn(2, 24, 8, 8))
    x = torch.randn(2, 64, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same_training_step(fused, plain, x, x)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    assert saved_bytes(fused, x) <= saved_bytes(plain, x) - 6 * 2 * 8 * 8 * 4  # x_1: 6 channels
