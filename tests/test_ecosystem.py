"""HS-ResNet plugs into torchvision detection/segmentation, smp and mmpretrain-style timm usage without glue
(the contracts in docs/architecture.md). Depth-26 models on 64 px images."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.segmentation import DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import FrozenBatchNorm2d

import hsresnet  # noqa: F401  (registers the models)
from hsresnet.layers import adapt_norm_layer

STAGES = {'layer1': '0', 'layer2': '1', 'layer3': '2', 'layer4': '3'}


def _targets(with_masks: bool) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 18.0, 60.0, 58.0]])
    target = {'boxes': boxes, 'labels': torch.tensor([1, 2])}
    if with_masks:
        masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        target['masks'] = masks
    return [target]


@pytest.mark.parametrize('detector', [FasterRCNN, MaskRCNN])
def test_detector_on_backbone_with_fpn(detector):
    body = timm.create_model('hs_resnet26', norm_layer=FrozenBatchNorm2d)
    channels = [info['num_chs'] for info in body.feature_info[1:]]
    backbone = BackboneWithFPN(body, STAGES, channels, 256)
    cfg = body.pretrained_cfg
    model = detector(
        backbone, num_classes=3, min_size=64, max_size=64, image_mean=list(cfg['mean']), image_std=list(cfg['std'])
    )
    images = [torch.rand(3, 64, 64)]
    with_masks = detector is MaskRCNN

    losses = model.train()(images, _targets(with_masks))
    expected = {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert set(losses) == expected | ({'loss_mask'} if with_masks else set())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert body.layer4[0].conv2.conv.weight.grad is not None

    with torch.no_grad():
        (out,) = model.eval()(images)
    assert {'boxes', 'labels', 'scores'} <= set(out)
    assert out['boxes'].shape[1:] == (4,)
    if with_masks:
        assert out['masks'].shape[1:] == (1, 64, 64)


@pytest.mark.parametrize('name', ['hs_resnet26', 'hs_resnet26_small'])
def test_torchvision_resnet_fpn_extractor(name):
    """torchvision's own extractor reads ``inplanes`` and freezes by the names conv1/bn1/layer1..4."""
    body = timm.create_model(name)
    backbone = _resnet_fpn_extractor(body, trainable_layers=3)
    in_channels = [block.in_channels for block in backbone.fpn.inner_blocks.modules() if isinstance(block, nn.Conv2d)]
    assert in_channels == [info['num_chs'] for info in body.feature_info[1:]]
    for param_name, param in body.named_parameters():
        assert param.requires_grad == param_name.startswith(('layer2', 'layer3', 'layer4')), param_name
    px = 64
    with torch.no_grad():
        maps = backbone.eval()(torch.rand(1, 3, px, px))
    assert list(maps) == ['0', '1', '2', '3', 'pool']
    reductions = [info['reduction'] for info in body.feature_info[1:]]
    assert [m.shape for m in list(maps.values())[:4]] == [(1, 256, px // r, px // r) for r in reductions]


def test_deeplabv3_intermediate_layer_getter_output_stride_8():
    body = timm.create_model('hs_resnet26', output_stride=8)
    backbone = IntermediateLayerGetter(body, {'layer4': 'out', 'layer3': 'aux'})
    model = DeepLabV3(backbone, DeepLabHead(2048, 3), FCNHead(1024, 3))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = backbone.eval()(x)
        assert maps['out'].shape == (2, 2048, 8, 8) and maps['aux'].shape == (2, 1024, 8, 8)
        out = model.eval()(x)
    assert out['out'].shape == out['aux'].shape == (2, 3, 64, 64)
    out = model.train()(x)
    loss = nn.functional.cross_entropy(out['out'], torch.randint(0, 3, (2, 64, 64))) + out['aux'].mean()
    loss.backward()
    assert body.layer4[0].conv2.conv.weight.grad is not None


@pytest.mark.parametrize('output_stride', [16, 8])
@pytest.mark.parametrize('in_chans', [1, 4])
def test_smp_deeplabv3plus(output_stride, in_chans):
    smp = pytest.importorskip('segmentation_models_pytorch')
    model = smp.DeepLabV3Plus(
        encoder_name='tu-hs_resnet26',
        encoder_weights=None,
        encoder_output_stride=output_stride,
        in_channels=in_chans,
        classes=2,
    )
    x = torch.rand(2, in_chans, 64, 64)
    with torch.no_grad():
        maps = model.encoder.eval()(x)
        out = model.eval()(x)
    assert maps[-1].shape[-1] == 64 // output_stride
    assert out.shape == (2, 2, 64, 64)
    model.train()(x).mean().backward()


def test_smp_deeplabv3plus_hs_resnet50_encoder():
    """The encoder name of the issue; its encoder is checked on the meta device (shapes only)."""
    smp = pytest.importorskip('segmentation_models_pytorch')
    model = smp.DeepLabV3Plus(encoder_name='tu-hs_resnet50', encoder_weights=None, encoder_output_stride=16)
    assert model.encoder.out_channels == [3, 64, 256, 512, 1024, 2048]
    encoder = model.encoder.to('meta')
    maps = encoder(torch.empty(1, 3, 64, 64, device='meta'))
    assert [m.shape[-1] for m in maps] == [64, 32, 16, 8, 4, 4]


def test_frozen_batchnorm_as_norm_layer():
    plain = timm.create_model('hs_resnet26')
    frozen = timm.create_model('hs_resnet26', norm_layer=FrozenBatchNorm2d)
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == n_norms
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in frozen.modules())
    owners = {type(m) for m in frozen.modules() if any(True for _ in m.parameters(recurse=False))}
    assert all(issubclass(owner, (nn.Conv2d, nn.Linear)) for owner in owners), owners  # no trainable norm left
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(frozen.train()(x), frozen.eval()(x))  # frozen: train mode changes nothing

    eps = timm.create_model('hs_resnet26', norm_layer=partial(FrozenBatchNorm2d, eps=1e-3), device='meta')
    norms = [m for m in eps.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == n_norms and all(m.eps == 1e-3 and m.weight.is_meta for m in norms)
    half = timm.create_model('hs_resnet26', norm_layer=FrozenBatchNorm2d, dtype=torch.bfloat16, device='meta')
    assert {m.running_var.dtype for m in half.modules() if isinstance(m, FrozenBatchNorm2d)} == {torch.bfloat16}


def test_adapt_norm_layer():
    """timm 1.0.31 calls ``norm_layer(C, device=..., dtype=...)``; the adapter lets a ``norm_layer(C)`` take that."""
    assert adapt_norm_layer(nn.BatchNorm2d) is nn.BatchNorm2d
    adapted = adapt_norm_layer(FrozenBatchNorm2d)
    norm = adapted(8, device='meta', dtype=torch.float16)
    assert isinstance(norm, FrozenBatchNorm2d) and norm.weight.shape == (8,)
    assert norm.weight.is_meta and norm.weight.dtype == torch.float16
    with pytest.raises(TypeError):
        FrozenBatchNorm2d(8, device='cpu')  # the problem the adapter solves


def test_timm_freeze_batch_norm_2d_alternative():
    from timm.layers import freeze_batch_norm_2d

    model = freeze_batch_norm_2d(timm.create_model('hs_resnet26_small'))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x))


def test_mmpretrain_style_features_only():
    """What ``mmpretrain.TIMMBackbone(model_name=..., features_only=True)`` does: create_model, tuple of maps."""
    kwargs = dict(features_only=True, pretrained=False, checkpoint_path='', in_chans=3, out_indices=(1, 2, 3, 4))
    backbone = timm.create_model(model_name='hs_resnet26', **kwargs).eval()
    with torch.no_grad():
        maps = tuple(backbone(torch.rand(1, 3, 64, 64)))
    assert [m.shape[1] for m in maps] == backbone.feature_info.channels() == [256, 512, 1024, 2048]
    assert [64 // m.shape[-1] for m in maps] == backbone.feature_info.reduction() == [4, 8, 16, 32]
    with torch.device('meta'):
        big = timm.create_model(model_name='hs_resnet50', **kwargs)
    assert big.feature_info.channels() == [256, 512, 1024, 2048]
