"""The HS block against the spec (docs/architecture.md), computed independently with functional ops."""

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d

from hsresnet import HSBlock, HSBottleneck, HSStridedBlock, hs_widths


def _randomize_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)


def _f(x, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight=None):
    """F_i = 3x3 conv + BN (eval) + ReLU, written out with functional ops."""
    w = conv.weight if weight is None else weight
    y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.relu(y)


def spec_cascade(block: HSBlock, x: torch.Tensor) -> torch.Tensor:
    """The spec's equations, term by term: y_1 = x_1; y_i = F_i(cat(x_i, y_{i-1,2})); out = cat(y_1, y_{i,1}.., y_s)."""
    w, s = block.width, block.s
    xs = [x[:, i * w : (i + 1) * w] for i in range(s)]
    out, carry = [xs[0]], None
    for i in range(1, s):
        conv, bn = block.convs[i - 1], block.bns[i - 1]
        y = _f(xs[i] if i == 1 else torch.cat([xs[i], carry], 1), conv, bn)
        c = y.shape[1]
        if i < s - 1:
            out.append(y[:, : math.ceil(c / 2)])
            carry = y[:, math.ceil(c / 2) :]
        else:
            out.append(y)
    return torch.cat(out, 1)


@pytest.mark.parametrize('width,s', [(4, 2), (4, 3), (5, 4), (7, 5), (3, 8), (9, 6), (1, 4)])
def test_widths_follow_the_recurrence(width, s):
    c = hs_widths(width, s)
    assert len(c) == s - 1 and c[0] == width
    for prev, cur in zip(c, c[1:]):
        assert cur == width + prev // 2
    block = HSBlock(width, s)
    assert [conv.in_channels for conv in block.convs] == c == [conv.out_channels for conv in block.convs]
    # output channels: identity + ceil halves of y_2..y_{s-1} + all of y_s = s * width for any parity
    assert width + sum(math.ceil(ci / 2) for ci in c[:-1]) + c[-1] == s * width


@pytest.mark.parametrize('width,s', [(4, 2), (5, 3), (6, 4), (7, 5), (3, 8)])
def test_cascade_matches_spec_equations(width, s):
    block = HSBlock(width, s).eval()
    _randomize_norms(block)
    x = torch.randn(2, s * width, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(block(x), spec_cascade(block, x), rtol=1e-5, atol=1e-5)


def test_identity_group_passes_through_and_params_follow_the_closed_form():
    width, s = 6, 5
    block = HSBlock(width, s).eval()
    x = torch.randn(1, s * width, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x)[:, :width], x[:, :width], rtol=0, atol=0)
    c = hs_widths(width, s)
    assert sum(p.numel() for p in block.parameters()) == sum(9 * ci * ci + 2 * ci for ci in c)
    # fewer weights than a dense 3x3 conv on s*width channels, more than Res2Net's (s-1) * 9 * width^2
    weights = sum(9 * ci * ci for ci in c)
    assert (s - 1) * 9 * width**2 < weights < 9 * (s * width) ** 2


def test_concat_order_is_group_order():
    """Zeroing the input of group i (and what it feeds) shows where each group's output lands."""
    width, s = 4, 4
    block = HSBlock(width, s).eval()
    with torch.no_grad():
        for conv, bn in zip(block.convs, block.bns):  # every F_i an exact pass-through, so outputs are traceable
            bn.eps = 0.0
            conv.weight.zero_()
            for k in range(conv.out_channels):
                conv.weight[k, k, 1, 1] = 1.0
    x = torch.rand(1, s * width, 5, 5) + 1.0
    with torch.no_grad():
        out = block(x)
    c = hs_widths(width, s)  # [4, 6, 7]
    # y_2 = x_2: first ceil(4/2)=2 channels out, last 2 forwarded; y_3 = cat(x_3, x_2[2:]) -> first 3 out
    expected = torch.cat([x[:, 0:4], x[:, 4:6], torch.cat([x[:, 8:12], x[:, 6:8]], 1)[:, :3]], 1)
    expected = torch.cat([expected, torch.cat([x[:, 12:16], torch.cat([x[:, 8:12], x[:, 6:8]], 1)[:, 3:]], 1)], 1)
    assert c == [4, 6, 7]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize('down', ['pool_conv', 'conv'])
def test_strided_block_matches_spec(down):
    width, s = 5, 4
    block = HSStridedBlock(width, s, stride=2, down=down).eval()
    _randomize_norms(block)
    x = torch.randn(2, s * width, 10, 9)
    with torch.no_grad():
        out = block(x)
        if down == 'conv':
            expected = _f(x, block.conv, block.bn)
        else:  # x_1 -> AvgPool2d(3, 2, 1); x_i -> its own 3x3 conv width->width (one slice of the grouped conv)
            parts = [F.avg_pool2d(x[:, :width], 3, 2, 1)]
            for i in range(1, s):
                sl = slice((i - 1) * width, i * width)
                y = F.conv2d(x[:, i * width : (i + 1) * width], block.conv.weight[sl], None, 2, 1)
                bn = block.bn
                y = F.batch_norm(y, bn.running_mean[sl], bn.running_var[sl], bn.weight[sl], bn.bias[sl], False, 0, 1e-5)
                parts.append(F.relu(y))
            expected = torch.cat(parts, 1)
    assert out.shape == (2, s * width, 5, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    conv_chs = s * width if down == 'conv' else (s - 1) * width
    groups = 1 if down == 'conv' else s - 1
    assert sum(p.numel() for p in block.parameters()) == 9 * conv_chs * conv_chs // groups + 2 * conv_chs


def test_block_is_plug_and_play_in_place_of_a_3x3_conv():
    net = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), nn.ReLU(), HSBlock(5, 4), nn.Conv2d(20, 7, 1))
    y = net(torch.randn(2, 3, 16, 16))
    y.sum().backward()
    assert y.shape == (2, 7, 16, 16)
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize('block', [HSBlock(5, 4), HSStridedBlock(5, 4, stride=1)])
def test_block_output_may_be_modified_in_place_in_training(block):
    """A plug-and-play block works wherever a 3x3 conv does: followed by an in-place ReLU, or added to in place."""
    seq = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1), block, nn.ReLU(inplace=True), nn.Conv2d(20, 4, 1))
    seq(torch.randn(2, 3, 8, 8)).sum().backward()
    x = torch.randn(2, 20, 8, 8, requires_grad=True)
    out = block(x)
    out += x  # a residual added in place, as torchvision's Bottleneck does
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in seq.parameters())


def test_block_trains_inside_torchvision_bottleneck():
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    tv = Bottleneck(64, 16, base_width=80)  # width 20 = s * w
    tv.conv2, tv.bn2 = HSBlock(5, 4), nn.Identity()  # bn2 + relu are inside the HS block
    tv.relu = nn.ReLU(inplace=True)
    x = torch.randn(2, 64, 8, 8)
    tv(x).sum().backward()
    assert all(p.grad is not None for p in tv.parameters())


def test_dilation_keeps_size_and_reaches_further():
    block = HSBlock(4, 3, dilation=2)
    assert all(c.dilation == (2, 2) and c.padding == (2, 2) for c in block.convs)
    assert block(torch.randn(1, 12, 11, 13)).shape == (1, 12, 11, 13)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(width=4, s=1), 's=1'),
        (dict(width=4, s=2.0), 's=2.0'),
        (dict(width=0, s=4), 'width=0'),
        (dict(width=4, s=True), 's=True'),
    ],
)
def test_bad_block_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HSBlock(**kwargs)


def test_bad_down_mode():
    with pytest.raises(ValueError, match="down='avg'.*pool_conv"):
        HSStridedBlock(4, 4, down='avg')


def test_frozen_batch_norm_drops_in():
    block = HSBlock(4, 4, norm_layer=FrozenBatchNorm2d)
    assert all(isinstance(bn, FrozenBatchNorm2d) for bn in block.bns)
    assert block(torch.randn(1, 16, 6, 6)).shape == (1, 16, 6, 6)


def test_bottleneck_width_rule_and_block_choice():
    b = HSBottleneck(256, 128, stride=2, downsample=nn.Identity(), base_width=18, s=5)
    assert isinstance(b.conv2, HSStridedBlock) and b.conv1.out_channels == 5 * (128 * 18 // 64)
    assert isinstance(HSBottleneck(512, 128, base_width=18, s=5).conv2, HSBlock)
    # dilated first block of a stage: stride 1 but the nominal downsampling position keeps the strided block
    dilated = HSBottleneck(512, 256, stride=1, dilation=2, first_dilation=1, base_width=18, s=5)
    assert isinstance(dilated.conv2, HSStridedBlock) and dilated.conv2.conv.stride == (1, 1)


@pytest.mark.parametrize('output_stride', [8, 16])
def test_dense_prediction_models_share_classification_state_dict(output_stride):
    ref = timm.create_model('hs_resnet26', num_classes=0)
    dil = timm.create_model('hs_resnet26', num_classes=0, output_stride=output_stride)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in dil.state_dict().items()}
    dil.load_state_dict(ref.state_dict())
    feats = dil.forward_features(torch.randn(1, 3, 64, 64))
    assert feats.shape[-1] == 64 // output_stride
