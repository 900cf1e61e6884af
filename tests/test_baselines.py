"""Same-skeleton baselines: each operator on hs_resnet26_small's skeleton, and the width solver that budget-matches
them."""

from __future__ import annotations

import pytest
import timm
import torch

from hsresnet.baselines import OPERATORS
from hsresnet.benchmark import model_spec
from hsresnet.complexity import count_timm_model, match_width

SKELETON = dict(in_chans=1, num_classes=10, channels=[8, 16, 32, 64])


@pytest.mark.parametrize('op', sorted(OPERATORS))
def test_small_baselines_share_the_hs_skeleton(op):
    model = timm.create_model(f'{op}26_small', **SKELETON).eval()
    hs = timm.create_model('hs_resnet26_small', w=16, s=2, **SKELETON)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity) and isinstance(hs.maxpool, torch.nn.Identity)
    assert [f['reduction'] for f in model.feature_info] == [f['reduction'] for f in hs.feature_info] == [1, 1, 2, 4, 8]
    assert [len(getattr(model, f'layer{i}')) for i in range(1, 5)] == [2, 2, 2, 2]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    block = type(model.layer1[0]).__name__
    assert block == {'resnet': 'Bottleneck', 'seresnet': 'Bottleneck', 'res2net': 'Bottle2neck',
                     'resnest': 'ResNestBottleneck', 'skresnet': 'SelectiveKernelBottleneck'}[op]  # fmt: skip


def test_res2net26_is_timms_resnet26_skeleton_with_res2net_blocks():
    model, plain = timm.create_model('res2net26'), timm.create_model('resnet26')
    assert model.conv1.kernel_size == plain.conv1.kernel_size == (7, 7)
    assert type(model.layer3[1]).__name__ == 'Bottle2neck' and model.layer3[1].scale == 4
    assert [f['reduction'] for f in model.feature_info] == [f['reduction'] for f in plain.feature_info]


def test_baselines_refuse_an_unknown_operator_or_block():
    from hsresnet.baselines import SkeletonResNet

    with pytest.raises(ValueError, match='unknown operator'):
        SkeletonResNet('conv3', layers=(2, 2, 2, 2))
    with pytest.raises(ValueError, match='build their own blocks'):
        timm.create_model('resnet26_small', block=object)


def test_match_width_lands_within_tolerance_and_skips_refused_widths():
    budget = count_timm_model('resnet26_small', 28, **SKELETON)
    w, c = match_width('hs_resnet26_small', budget, 'w', 28, 0.05, s=3, **SKELETON)
    assert abs(c.params / budget.params - 1) <= 0.05 and abs(c.macs / budget.macs - 1) <= 0.05
    assert c == count_timm_model('hs_resnet26_small', 28, w=w, s=3, **SKELETON)
    # ResNeSt's split attention needs even widths: odd ones are skipped, not fatal
    value, _ = match_width('resnest26_small', budget, 'base_width', 28, 0.15, **SKELETON)
    assert (8 * value // 64) % 2 == 0
    with pytest.raises(ValueError, match=r'closest base_width=\d+ gives .* off the budget'):
        match_width('seresnet26_small', budget, 'base_width', 28, 0.001, **SKELETON)


def test_benchmark_model_spec_syntax():
    assert model_spec('resnet50') == {'model': 'resnet50', 'kwargs': {}}
    spec = model_spec('hs_resnet26_small{w: 19, s: 5, channels: [16, 32, 64, 128]}')
    assert spec == {'model': 'hs_resnet26_small', 'kwargs': {'w': 19, 's': 5, 'channels': [16, 32, 64, 128]}}
    with pytest.raises(SystemExit, match='NAME or NAME'):
        model_spec('hs_resnet26_small{[1, 2]}')
