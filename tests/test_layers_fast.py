"""The production HS blocks (layers.py) against the plain reference written from the spec (reference.py)."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from hsresnet.layers import HSBlock, HSStridedBlock
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


def test_fast_path_is_taken_and_equals_concat_path():
    fast, _ = pair(5, 4)
    x = torch.randn(2, 20, 8, 8)
    with torch.no_grad():
        assert fast._fast_path(x)
        torch.testing.assert_close(fast._forward_into_buffer(x), fast._forward_cat(x), rtol=0, atol=0)
    assert not fast._fast_path(x)  # grad enabled: the differentiable path
    assert not HSBlock(5, 4, act_layer=nn.SiLU)._fast_path(x)  # only ReLU has the fused out= write


def test_block_dilation_and_other_norm_act():
    for kwargs in ({'dilation': 2}, {'norm_layer': FrozenBatchNorm2d}, {'act_layer': nn.SiLU}):
        fast, ref = pair(6, 4, **kwargs)
        x = torch.randn(2, 24, 10, 10)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_block_training_forward_and_gradients_equal_reference():
    fast, ref = pair(5, 5)
    fast.train()
    ref.train()
    x = torch.randn(2, 25, 6, 6)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 25, 6, 6)
    y1, y2 = fast(x1), ref(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (name, p1), p2 in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=name)
    for b1, b2 in zip(fast.buffers(), ref.buffers()):  # running statistics updated identically
        torch.testing.assert_close(b1, b2)


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
    fast.train()
    ref.train()
    torch.testing.assert_close(fast(xin), ref(x), rtol=1e-5, atol=1e-5)


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
