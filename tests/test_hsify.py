"""``hsify`` on real torchvision and timm networks: structure, equality with the native hs_resnet, carried weights."""

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from hsresnet import HSBlock, HSStridedBlock
from hsresnet.hsify import hsify

tvm = torchvision.models


def _randomize(model: nn.Module) -> None:
    """Non-trivial norm parameters and statistics (zero-init bn3 would hide every HS branch)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.uniform_(0.2, 0.6)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)


def _blocks(model: nn.Module):
    """(path of the bottleneck, its HS block) for every converted block, in order."""
    hs = (HSBlock, HSStridedBlock)
    return [(p.rpartition('.')[0], m) for p, m in model.named_modules() if isinstance(m, hs)]


def _hs_conv(block: nn.Module) -> nn.Conv2d:
    return block.conv if isinstance(block, HSStridedBlock) else block.convs[0]


OS16 = dict(output_stride=16)
TV_OS8 = dict(replace_stride_with_dilation=[False, True, True])

# name: (builder, dilation of the 3x3 convs in each stage after its first block, down)
CONVERSIONS = {
    'tv_resnet50': (lambda: tvm.resnet50(num_classes=10), (1, 1, 1, 1), 'pool_conv'),
    'tv_resnext50_32x4d': (lambda: tvm.resnext50_32x4d(num_classes=10), (1, 1, 1, 1), 'pool_conv'),
    'tv_wide_resnet50_2': (lambda: tvm.wide_resnet50_2(num_classes=10), (1, 1, 1, 1), 'conv'),
    'tv_resnet50_os8': (lambda: tvm.resnet50(num_classes=10, **TV_OS8), (1, 1, 2, 4), 'conv'),
    'timm_resnet50': (lambda: timm.create_model('resnet50', num_classes=10), (1, 1, 1, 1), 'pool_conv'),
    'timm_resnet50d': (lambda: timm.create_model('resnet50d', num_classes=10), (1, 1, 1, 1), 'conv'),
    'timm_resnext50_32x4d': (lambda: timm.create_model('resnext50_32x4d', num_classes=10), (1, 1, 1, 1), 'pool_conv'),
    'timm_wide_resnet50_2': (lambda: timm.create_model('wide_resnet50_2', num_classes=10), (1, 1, 1, 1), 'pool_conv'),
    'timm_resnet26': (lambda: timm.create_model('resnet26', num_classes=10), (1, 1, 1, 1), 'pool_conv'),
    'timm_resnet26t_os16': (lambda: timm.create_model('resnet26t', num_classes=10, **OS16), (1, 1, 1, 2), 'conv'),
}  # fmt: skip


def _check_structure(model: nn.Module, w: int, s: int, down: str, dilations) -> None:
    """Every bottleneck: widths from w and s, bn2 gone, the strided block exactly at the nominal positions."""
    stages = {}
    for path, block in _blocks(model):
        stages.setdefault(path.split('.')[-2], []).append((path, block))
    assert len(stages) == 4
    for k, blocks in enumerate(stages.values()):
        for i, (path, block) in enumerate(blocks):
            parent = model.get_submodule(path)
            width = (parent.conv3.out_channels // 4) * w // 64
            assert block.width == width and block.s == s, path
            assert parent.conv1.out_channels == s * width == parent.conv3.in_channels, path
            assert isinstance(parent.bn2, nn.Identity)
            # nominal position: the first block of stages 2-4 is strided, even where dilation replaced the stride
            assert isinstance(block, HSStridedBlock) == (i == 0 and k > 0), path
            conv = _hs_conv(block)
            if i > 0 or k == 0:
                assert conv.dilation[0] == dilations[k] and conv.stride[0] == 1, path
            else:
                assert block.down == down and conv.dilation[0] == dilations[k - 1], path
                assert conv.stride[0] == (2 if dilations[k] == dilations[k - 1] else 1), path


@pytest.mark.parametrize('name', list(CONVERSIONS))
def test_conversion_structure_forward_backward(name):
    build, dilations, down = CONVERSIONS[name]
    model = build()
    assert hsify(model, w=13, s=4, down=down) is model
    _check_structure(model, 13, 4, down, dilations)
    model.train()
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    out.square().mean().backward()  # torchvision + down='conv' also checks the in-place ReLU after conv2
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize('build,layout', [(tvm.resnet101, [3, 4, 23, 3]), (tvm.resnet152, [3, 8, 36, 3])])
def test_deep_resnets_structure(build, layout):
    model = hsify(build(), w=28, s=6)
    _check_structure(model, 28, 6, 'pool_conv', (1, 1, 1, 1))
    assert [len(model.get_submodule(f'layer{i}')) for i in range(1, 5)] == layout


def _state_and_check(converted: nn.Module, native: nn.Module) -> None:
    """Same keys and shapes, strict load, same parameter count, same outputs."""
    _randomize(converted)
    a, b = converted.state_dict(), native.state_dict()
    assert list(a) == list(b)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in native.parameters())
    native.load_state_dict(a, strict=True)
    converted.eval(), native.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = converted(x)
        assert y.abs().max() > 1e-3  # the HS branches contribute
        torch.testing.assert_close(y, native(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    'source,native,kwargs',
    [
        (lambda: timm.create_model('resnet50'), 'hs_resnet50', {}),
        (lambda: timm.create_model('resnet50', output_stride=16), 'hs_resnet50', dict(w=13, s=7, down='conv', **OS16)),
        (lambda: timm.create_model('resnet50d'), 'hs_resnet50d', dict(w=22, s=4)),
        (lambda: timm.create_model('resnet26'), 'hs_resnet26', dict(w=12, s=8)),
        (lambda: tvm.resnet50(**TV_OS8), 'hs_resnet50', dict(output_stride=8)),
        (lambda: tvm.resnext50_32x4d(), 'hs_resnet50', dict(w=32, s=4, down='conv')),
    ],
)  # fmt: skip
def test_converted_equals_native(source, native, kwargs):
    hs_args = {k: kwargs[k] for k in ('w', 's', 'down') if k in kwargs}
    converted = hsify(source(), **hs_args)
    _state_and_check(converted, timm.create_model(native, **kwargs))


def test_timm_resnet50_param_count_is_hs_resnet50():
    converted = hsify(timm.create_model('resnet50'))
    count = sum(p.numel() for p in converted.parameters())
    assert count == sum(p.numel() for p in timm.create_model('hs_resnet50').parameters())
    assert 25.0e6 < count < 25.8e6  # the spec's 25.4 M


@pytest.mark.parametrize('w,s,reused', [(18, 5, False), (16, 4, True)])
def test_carried_weights_are_bitwise_equal(w, s, reused):
    model = tvm.resnet50(num_classes=10)
    _randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hsify(model, w=w, s=s)
    after = model.state_dict()
    carried = [k for k in before if k.startswith(('conv1.', 'bn1.', 'fc.')) or '.downsample.' in k]
    assert len(carried) == 6 + 2 + 4 * 6  # stem conv + bn (with num_batches_tracked), fc, 4 shortcuts
    for k in carried:
        assert torch.equal(before[k], after[k]), k
    # with w=16, s=4, mid = 4 * planes * 16 / 64 = planes: the 1x1 convs keep their shape and their weights
    inner = [
        k
        for k in before
        if k.startswith('layer')
        and ('.conv1.' in k or '.bn1.' in k or '.conv3.' in k or '.bn3.' in k)
        and not k.endswith('num_batches_tracked')
    ]
    for k in inner:
        same = before[k].shape == after[k].shape and torch.equal(before[k], after[k])
        assert same == reused, k
    if not reused:  # rebuilt bn3 starts at zero gamma (timm's zero_init_last), rebuilt convs are kaiming-normal
        assert all(after[f'layer{i}.0.bn3.weight'].eq(0).all() for i in range(1, 5))
        std = after['layer1.0.conv1.weight'].std().item()
        assert 0.5 < std / (2 / after['layer1.0.conv1.weight'].shape[0]) ** 0.5 < 1.5
    assert not any(k.endswith(('bn2.weight', 'bn2.running_mean')) for k in after)


def test_keeps_mode_dtype_requires_grad_and_memory_format():
    model = tvm.resnet50().eval().double().to(memory_format=torch.channels_last)
    model.layer1.requires_grad_(False)
    hsify(model, down='conv')
    assert not any(m.training for m in model.modules())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    conv = model.layer2[1].conv2.convs[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64

    with torch.device('meta'):
        meta = timm.create_model('resnet50')
    hsify(meta)
    assert all(p.is_meta for p in meta.parameters())
    assert meta(torch.empty(1, 3, 64, 64, device='meta')).shape == (1, 1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_keeps_cuda_device():
    model = timm.create_model('resnet26').cuda()
    hsify(model)
    assert all(p.is_cuda for p in model.parameters())
    assert model(torch.randn(1, 3, 64, 64, device='cuda')).is_cuda


def test_detection_backbone_with_frozen_batch_norm():
    backbone = resnet_fpn_backbone(
        backbone_name='resnet50', weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    stem_before = backbone.body.conv1.weight.clone()
    hsify(backbone, w=16, s=6)
    block = backbone.body.layer2[0]
    assert isinstance(block.conv2, HSStridedBlock) and type(block.conv2.bn) is FrozenBatchNorm2d
    assert all(type(bn) is FrozenBatchNorm2d for bn in backbone.body.layer3[1].conv2.bns)
    assert not any(p.requires_grad for p in backbone.body.layer1.parameters())  # frozen stays frozen
    assert torch.equal(backbone.body.conv1.weight, stem_before)
    small = dict(rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=64)
    small.update(rpn_post_nms_top_n_test=32, box_batch_size_per_image=32, rpn_batch_size_per_image=32)
    model = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64, **small)
    target = {'boxes': torch.tensor([[4.0, 6.0, 40.0, 50.0]]), 'labels': torch.tensor([1])}
    losses = model([torch.rand(3, 64, 64)], [target])
    sum(losses.values()).backward()
    assert backbone.body.layer3[1].conv2.convs[-1].weight.grad is not None
    assert backbone.body.layer1[0].conv2.convs[0].weight.grad is None
    model.eval()
    with torch.no_grad():
        assert len(model([torch.rand(3, 64, 64)])) == 1


def test_deeplabv3_keeps_dilation():
    model = tvm.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
    hsify(model)
    layer3, layer4 = model.backbone['layer3'], model.backbone['layer4']
    assert isinstance(layer3[0].conv2, HSStridedBlock) and layer3[0].conv2.conv.stride == (1, 1)
    assert layer3[0].conv2.conv.dilation == (1, 1) and layer4[0].conv2.conv.dilation == (2, 2)
    assert layer3[1].conv2.convs[0].dilation == (2, 2) and layer4[1].conv2.convs[0].dilation == (4, 4)
    out = model.eval()(torch.randn(1, 3, 64, 64))['out']
    assert out.shape == (1, 3, 64, 64)


def test_onnx_export_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    model = hsify(timm.create_model('resnet26', num_classes=10), w=13, s=5)
    _randomize(model)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / 'hsify.onnx'
    torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    'build,match',
    [
        (lambda: tvm.resnet18(), r"BasicBlocks \(first: 'layer1.0'"),
        (lambda: timm.create_model('test_vit'), 'nothing to convert in VisionTransformer'),
        (lambda: timm.create_model('seresnet50'), r"'layer1.0.se'.*SEModule"),
        (lambda: timm.create_model('resnetaa50'), r"'layer2.0.aa'.*anti-aliasing"),
        (lambda: hsify(timm.create_model('resnet26')), r"'layer1.0.conv2'.*HSBlock"),
        (lambda: tvm.resnet50(norm_layer=lambda c: nn.GroupNorm(32, c)), r"'layer1.0.bn1'.*GroupNorm"),
        (lambda: torchvision.models.quantization.resnet50(), r"'layer1.0'.*QuantizableBottleneck"),
    ],
)
def test_unconvertible_models_name_the_module(build, match):
    with pytest.raises(ValueError, match=match):
        hsify(build())


def test_error_leaves_the_model_untouched():
    model = timm.create_model('resnet26')
    model.layer4[1].se = nn.Identity()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'layer4.1.se'"):
        hsify(model)
    assert isinstance(model.layer1[0].conv2, nn.Conv2d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(w=0), 'w=0'),
        (dict(w=1.5), 'w=1.5'),
        (dict(w=True), 'w=True'),
        (dict(s=1), 's=1'),
        (dict(down='max'), "down='max'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hsify(tvm.resnet50(), **kwargs)


def test_width_rounding_to_zero_names_the_block():
    model = timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1], channels=(8, 16, 32, 64))
    with pytest.raises(ValueError, match=r"w=4 gives width floor\(8 \* 4 / 64\) = 0 at 'layer1.0'.*w >= 8"):
        hsify(model, w=4)


@pytest.mark.parametrize('zero_init_last', [True, False])
def test_zero_init_last(zero_init_last):
    model = hsify(timm.create_model('resnet26', zero_init_last=False), zero_init_last=zero_init_last)
    gammas = torch.cat([m.bn3.weight for m in model.modules() if isinstance(m, timm.models.resnet.Bottleneck)])
    assert torch.all(gammas == (0.0 if zero_init_last else 1.0))
