"""The timm model contract (in the spirit of timm's own ``tests/test_models.py``) for every registered ``hs_*`` model.

Heavy checks (backward, drop rates, output stride, checkpointing) run on the depth-26 models at 32-64 px; the
101/152 models are built on the meta device, where a forward gives shapes without compute.
"""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_parameters

import hsresnet  # noqa: F401  (registers the models)
from hsresnet import HSBlock, HSStridedBlock

ALL = timm.list_models('hs_*')
EXPECTED = [
    *(f'hs_resnet{d}{v}' for d in (26, 50, 101, 152) for v in ('', 'd')),
    *(f'hs_resnet50_{p}' for p in ('18w_5s', '22w_4s', '16w_6s', '12w_8s', '28w_6s')),
    'hs_resnet26_small',
]


def _depth(name: str) -> int:
    return int(re.match(r'hs_resnet(\d+)', name).group(1))


LIGHT = [n for n in ALL if _depth(n) <= 50]  # real forwards at 32-64 px
DEPTH26 = [n for n in ALL if _depth(n) == 26]  # the heavy checks


def _px(name: str, px: int = 32) -> int:
    """Input size: 32 px for the heavy checks (64 px where asked); hs_resnet26_small always gets 32 px."""
    return 32 if name.endswith('_small') else px


def _reductions(name: str) -> list[int]:
    return [1, 1, 2, 4, 8] if name.endswith('_small') else [2, 4, 8, 16, 32]


def _x(name: str, batch: int = 1, chans: int = 3, px: int = 32) -> torch.Tensor:
    return torch.randn(batch, chans, _px(name, px), _px(name, px))


def _meta(name: str, **kwargs) -> nn.Module:
    """Build on the meta device (the context manager works on any timm; ``device='meta'`` needs timm >= 1.0.2x)."""
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def _cascade_widths(width: int, s: int) -> list[int]:
    """``c_2 = width``, ``c_i = width + floor(c_{i-1} / 2)`` (docs/architecture.md), written out independently."""
    widths = [width]
    while len(widths) < s - 1:
        widths.append(width + widths[-1] // 2)
    return widths


def test_registry_lists_the_whole_family():
    assert sorted(ALL) == sorted(EXPECTED)
    for name in ALL:
        assert timm.is_model(name)


@pytest.mark.parametrize('name', LIGHT)
def test_forward_eval_batch1(name):
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(_x(name, px=64))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', ALL)
def test_meta_build_and_default_cfg(name):
    """Build on the meta device; the cfg's pool_size, first_conv and classifier match the real model."""
    model = timm.create_model(name, device='meta')
    assert all(p.is_meta for p in model.parameters())
    cfg = model.pretrained_cfg
    c, h, w = cfg['input_size']
    feats = model.forward_features(torch.empty(1, c, h, w, device='meta'))
    assert feats.shape == (1, model.num_features, *cfg['pool_size'])
    assert model(torch.empty(2, c, h, w, device='meta')).shape == (2, cfg['num_classes'])
    state = model.state_dict()
    assert state[cfg['first_conv'] + '.weight'].shape[1] == c
    assert state[cfg['classifier'] + '.weight'].shape == (cfg['num_classes'], model.num_features)
    assert model.get_classifier() is model.get_submodule(cfg['classifier'])
    assert len(cfg['mean']) == len(cfg['std']) == c

    with torch.device('meta'):
        in_context = timm.create_model(name, in_chans=1, num_classes=0)
    assert all(p.is_meta for p in in_context.parameters())
    assert in_context.state_dict()[cfg['first_conv'] + '.weight'].shape[1] == 1


@pytest.mark.parametrize('name', DEPTH26)
def test_children_in_forward_order(name):
    """IntermediateLayerGetter and feature_info rely on the direct children being registered in the order used."""
    model = _meta(name)
    names = [n for n, _ in model.named_children()]
    assert names == ['conv1', 'bn1', 'act1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4', 'global_pool', 'fc']
    assert [info['module'] for info in model.feature_info] == ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    assert model.inplanes == model.num_features  # torchvision's ResNet attribute, read by _resnet_fpn_extractor


@pytest.mark.parametrize('name', DEPTH26)
def test_num_classes_in_chans_global_pool(name):
    x = _x(name)
    base = timm.create_model(name, num_classes=0).eval()
    nf = base.num_features
    assert nf == base.head_hidden_size == base.feature_info[-1]['num_chs']
    with torch.no_grad():
        feats = base.forward_features(x)
        assert base(x).shape == (1, nf)
        torch.testing.assert_close(base(x), feats.mean((2, 3)))
    for pool, expect in (('max', feats.amax((2, 3))), ('', feats)):
        model = timm.create_model(name, num_classes=0, global_pool=pool).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), expect)
    cat = timm.create_model(name, num_classes=7, global_pool='catavgmax').eval()
    assert cat.head_hidden_size == 2 * nf
    assert cat(x).shape == (1, 7)
    for chans in (1, 4):
        model = timm.create_model(name, in_chans=chans, num_classes=5).eval()
        with torch.no_grad():
            assert model(_x(name, chans=chans)).shape == (1, 5)


@pytest.mark.parametrize('name', DEPTH26)
def test_forward_features_head_classifier(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = _x(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
        torch.testing.assert_close(model.forward_head(feats), out)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        torch.testing.assert_close(model.get_classifier()(pre), out)
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.get_classifier(name_only=True) == 'fc'

    model.reset_classifier(42)
    assert model(x).shape == (1, 42) and model.num_classes == 42
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (1, model.num_features)
    model.reset_classifier(0, '')
    assert model(x).shape == feats.shape


@pytest.mark.parametrize(
    'name, down', [(n, 'pool_conv') for n in DEPTH26] + [('hs_resnet26', 'conv'), ('hs_resnet26d', 'conv')]
)
def test_output_stride_keeps_structure(name, down):
    """Output stride 8/16/32: the maps shrink as promised, and the state_dict (keys and shapes) never changes."""
    x = _x(name)
    shapes = {}
    for os_ in (32, 16, 8):
        model = timm.create_model(name, output_stride=os_, down=down, num_classes=0, global_pool='').eval()
        shapes[os_] = {k: v.shape for k, v in model.state_dict().items()}
        if os_ == 32:
            state = model.state_dict()
        model.load_state_dict(state)  # classification weights load into the dilated model
        with torch.no_grad():
            maps = model.forward_intermediates(x, intermediates_only=True)
        real = [_px(name) // m.shape[-1] for m in maps]
        assert real == [info['reduction'] for info in model.feature_info]
        nominal = [min(r, os_) for r in (2, 4, 8, 16, 32)]
        if not name.endswith('_small'):  # the small stem has no stride: reductions are 4x smaller
            assert real == nominal
        for stage in ('layer2', 'layer3', 'layer4'):  # the block type follows the nominal position
            assert isinstance(model.get_submodule(stage)[0].conv2, HSStridedBlock)
            assert isinstance(model.get_submodule(stage)[1].conv2, HSBlock)
    assert shapes[32] == shapes[16] == shapes[8]


@pytest.mark.parametrize('name', DEPTH26)
@pytest.mark.parametrize('rate', ['drop_rate', 'drop_path_rate', 'drop_block_rate'])
def test_drop_rates_change_train_outputs(name, rate):
    """Each regularizer takes effect in train mode (and only there): same weights, different train outputs."""
    x = _x(name, batch=2)
    plain = timm.create_model(name, num_classes=10, zero_init_last=False)
    dropped = timm.create_model(name, num_classes=10, zero_init_last=False, **{rate: 0.5})
    dropped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
        train_plain = plain.train()(x)
        train_dropped = dropped.train()(x)
    assert not torch.allclose(train_plain, train_dropped)
    if rate == 'drop_path_rate':  # linear per block: 0 for the first block, the full rate for the last
        probs = [getattr(b.drop_path, 'drop_prob', 0.0) for b in dropped.modules() if hasattr(b, 'drop_path')]
        assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.5) and probs == sorted(probs)


@pytest.mark.parametrize('name', LIGHT)
def test_features_only(name):
    """Real 64 px maps for the depth-26 models, meta-device shapes for the rest."""
    device = 'cpu' if name in DEPTH26 else 'meta'
    with torch.device(device):
        model = timm.create_model(name, features_only=True).eval()
    reductions = _reductions(name)
    assert model.feature_info.reduction() == reductions
    with torch.no_grad():
        maps = model(_x(name, px=64).to(device))
    assert len(maps) == 5
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
    assert [_px(name, 64) // m.shape[-1] for m in maps] == reductions
    assert all(m.is_meta or torch.isfinite(m).all() for m in maps)

    picked = _meta(name, features_only=True, out_indices=(2, 4))
    assert picked.feature_info.reduction() == reductions[2::2]
    maps = picked(torch.empty(1, 3, 64, 64, device='meta'))
    assert [m.shape[1] for m in maps] == picked.feature_info.channels()


@pytest.mark.parametrize('name', DEPTH26)
def test_forward_intermediates_and_prune(name):
    model = timm.create_model(name).eval()
    x = _x(name)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [m.shape[1] for m in maps] == [info['num_chs'] for info in model.feature_info]
        some = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
        features = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
        features.load_state_dict(model.state_dict(), strict=False)
        via_features = features(x)
    for a, b, c in zip(some, early, via_features):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    kept = model.prune_intermediate_layers(indices=[1, 2])
    assert kept == [1, 2] and len(model.layer4) == 0
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    for a, b in zip(some, pruned):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', DEPTH26)
def test_grad_checkpointing_same_output_and_grads(name):
    x = _x(name, batch=2)
    base = timm.create_model(name, num_classes=10, zero_init_last=False)
    grads = []
    for enable in (False, True):
        model = copy.deepcopy(base)  # a train forward moves the BN running stats: start each run from the same state
        model.set_grad_checkpointing(enable)
        with torch.no_grad():
            out_eval = model.eval()(x)
        out = model.train()(x)
        out.sum().backward()
        grads.append((out_eval, out.detach(), [p.grad for p in model.parameters()]))
    (e0, t0, g0), (e1, t1, g1) = grads
    torch.testing.assert_close(e0, e1)
    torch.testing.assert_close(t0, t1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', [*DEPTH26, 'hs_resnet50'])
def test_backward_42_classes(name):
    """As timm: train mode, a 42-class head, every parameter gets a finite gradient."""
    model = timm.create_model(name, num_classes=42).train()
    out = model(_x(name, batch=2))
    assert out.shape == (2, 42)
    F.cross_entropy(out, torch.tensor([0, 41])).backward()
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in params.values())


@pytest.mark.parametrize('name', DEPTH26)
def test_group_matcher_covers_every_parameter(name):
    model = _meta(name)
    names = [n for n, _ in model.named_parameters()]
    for coarse, expect in ((False, 1 + sum(len(model.get_submodule(f'layer{i}')) for i in range(1, 5)) + 1), (True, 6)):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = [n for g in groups.values() for n in g]
        assert sorted(grouped) == sorted(names)
        assert len(groups) == expect
        stem = groups[min(groups)]
        assert any(n.startswith('conv1') for n in stem) and 'bn1.weight' in stem


@pytest.mark.parametrize('name', ALL)
def test_entry_point_takes_w_s_down(name):
    model = _meta(name, w=13, s=7, down='conv')
    assert (model.w, model.s, model.down) == (13, 7, 'conv')
    block = model.layer2[0]
    width = 128 * 13 // 64 if not name.endswith('_small') else 64 * 13 // 64
    assert block.conv1.out_channels == 7 * width
    assert isinstance(block.conv2, HSStridedBlock) and block.conv2.down == 'conv'


def test_hs_resnet50_13w_7s_conv_is_exactly_that():
    """``timm.create_model('hs_resnet50', w=13, s=7, down='conv')``: every block, checked against the spec."""
    model = _meta('hs_resnet50', w=13, s=7, down='conv')
    assert [len(model.get_submodule(f'layer{i}')) for i in range(1, 5)] == [3, 4, 6, 3]
    for stage, planes in enumerate((64, 128, 256, 512)):
        width = planes * 13 // 64
        for idx, block in enumerate(model.get_submodule(f'layer{stage + 1}')):
            assert block.conv1.out_channels == 7 * width
            assert block.conv3.in_channels == 7 * width and block.conv3.out_channels == 4 * planes
            if stage > 0 and idx == 0:  # strided 'conv': one dense 3x3 conv on all s * width channels
                assert isinstance(block.conv2, HSStridedBlock) and block.conv2.pool is None
                conv = block.conv2.conv
                assert (conv.in_channels, conv.out_channels) == (7 * width, 7 * width)
                assert conv.groups == 1 and conv.stride == (2, 2)
            else:
                assert isinstance(block.conv2, HSBlock)
                assert [c.out_channels for c in block.conv2.convs] == _cascade_widths(width, 7)
    default = _meta('hs_resnet50')
    preset = _meta('hs_resnet50_18w_5s')
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in preset.state_dict().items()}
    sibling = _meta('hs_resnet50_22w_4s')
    assert (preset.w, preset.s, sibling.w, sibling.s) == (18, 5, 22, 4)
    assert _meta('hs_resnet50_22w_4s', s=3).s == 3  # the user's kwargs win


@pytest.mark.parametrize('name', ALL)
@pytest.mark.parametrize(
    'kwargs, words',
    [
        (dict(s=1), ['s=1', '>= 2']),
        (dict(s='a'), ["s='a'", '>= 2']),
        (dict(w=0), ['w=0', '>= 1']),
        (dict(w=2.5), ['w=2.5', 'integer']),
        (dict(down='x'), ["down='x'", 'pool_conv', 'conv']),
        (dict(output_stride=12), ['output_stride=12', '8, 16 or 32']),
    ],
)
def test_bad_arguments_name_the_problem(name, kwargs, words):
    with pytest.raises(ValueError) as err:
        _meta(name, **kwargs)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    'kwargs', [dict(cardinality=2), dict(block_reduce_first=2), dict(aa_layer=nn.AvgPool2d), dict(block_args={})]
)
def test_resnet_arguments_the_block_cannot_honour_are_refused(kwargs):
    """A block must use every argument it accepts, or refuse it (timm's Res2Net lesson)."""
    with pytest.raises(ValueError, match='HS'):
        _meta('hs_resnet26', **kwargs)


def test_width_that_rounds_to_zero_is_refused():
    for name, kwargs in (('hs_resnet26_small', dict(w=1)), ('hs_resnet26', dict(w=3, channels=(16, 32, 64, 128)))):
        with pytest.raises(ValueError, match=r'w=\d+ gives width floor\(.*\) = 0.*use w >= \d+'):
            _meta(name, **kwargs)


@pytest.mark.parametrize('name', DEPTH26)
def test_wrong_input_channels_is_a_clear_error(name):
    model = timm.create_model(name, in_chans=4).eval()
    with pytest.raises(ValueError, match=r'in_chans=4.*\(N, 4, H, W\)'):
        model(_x(name, chans=3))
