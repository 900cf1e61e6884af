"""The training engine's batch norm for narrow channels_last CPU tensors: the same numbers as nn.BatchNorm2d."""

import copy

import pytest
import timm
import torch
import torch.nn as nn

from hsresnet.engine.batchnorm import WideBatchNorm2d, use_wide_batchnorm


def run_both(shape, momentum=0.1, dtype=torch.float32, steps=2):
    """Train a plain and a wide batch norm on the same channels_last inputs; their outputs, gradients and states."""
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(shape[1], momentum=momentum)
    nn.init.uniform_(plain.weight, 0.5, 1.5)
    nn.init.normal_(plain.bias)
    wide = copy.deepcopy(plain)
    assert use_wide_batchnorm(wide) == 1 and type(wide) is WideBatchNorm2d
    results = []
    for bn in (plain, wide):
        torch.manual_seed(1)
        outs = []
        for _ in range(steps):
            x = (torch.randn(shape) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            grad = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
            assert bn is plain or bn._takes_wide_path(x)
            with torch.autocast('cpu', torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = torch.relu_(bn(x))  # an in-place op after it, as in the HS bottleneck
            out.backward(grad)
            outs += [out.detach(), x.grad]
        results.append((outs, bn))
    return results


@pytest.mark.parametrize('shape', [(8, 4, 6, 6), (4, 6, 7, 5), (3, 12, 8, 8), (2, 15, 4, 4), (5, 3, 3, 3)])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_wide_batchnorm_trains_like_batchnorm2d(shape, momentum):
    (plain_outs, plain), (wide_outs, wide) = run_both(shape, momentum)
    for a, b in zip(plain_outs, wide_outs):
        assert b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for name in ('weight', 'bias'):
        torch.testing.assert_close(getattr(wide, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-4)
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        torch.testing.assert_close(getattr(wide, name), getattr(plain, name), rtol=1e-5, atol=1e-5)


def test_wide_batchnorm_in_bf16_autocast_is_as_close_as_the_plain_kernel():
    """Against the fp32 result, the wide path's bf16 error is of the order of PyTorch's own bf16 kernel's."""
    (plain_outs, plain), (wide_outs, wide) = run_both((16, 6, 8, 8), dtype=torch.bfloat16)
    reference, fp32 = run_both((16, 6, 8, 8), dtype=torch.float32)[0]
    pairs = list(zip(plain_outs, wide_outs, reference))
    pairs += [(getattr(plain, k), getattr(wide, k), getattr(fp32, k)) for k in ('running_mean', 'running_var')]
    pairs += [(getattr(plain, k).grad, getattr(wide, k).grad, getattr(fp32, k).grad) for k in ('weight', 'bias')]
    for plain_value, wide_value, ref in pairs:
        plain_error = (plain_value.float() - ref).abs().max().item()
        wide_error = (wide_value.float() - ref).abs().max().item()
        assert wide_error <= 3 * plain_error + 1e-3 * ref.abs().max().item(), (wide_error, plain_error)


@pytest.mark.parametrize('case', ['eval', 'nchw', 'wide channels'])
def test_wide_batchnorm_leaves_other_inputs_to_batchnorm2d(case):
    channels = 16 if case == 'wide channels' else 6
    plain = nn.BatchNorm2d(channels)
    wide = copy.deepcopy(plain)
    use_wide_batchnorm(wide)
    x = torch.randn(2, channels, 4, 4)
    if case != 'nchw':
        x = x.contiguous(memory_format=torch.channels_last)
    for bn in (plain, wide):
        bn.train(case != 'eval')
    assert not wide._takes_wide_path(x)
    torch.testing.assert_close(wide(x), plain(x), rtol=0, atol=0)


def test_use_wide_batchnorm_switches_only_plain_batchnorm2d_and_keeps_the_state():
    model = timm.create_model('hs_resnet26_small', num_classes=10, in_chans=1, channels=[16, 32, 64, 128], w=16, s=3)
    model.layer1[0].add_module('extra', nn.SyncBatchNorm(4))  # a subclass: left alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    assert use_wide_batchnorm(model) == count > 0
    assert isinstance(model.layer1[0].extra, nn.SyncBatchNorm)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
