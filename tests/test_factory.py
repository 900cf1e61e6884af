import pytest
import timm

import hsresnet


def test_import_registers_the_family():
    names = set(timm.list_models('hs_*'))
    expected = {f'hs_resnet{d}{v}' for d in (26, 50, 101, 152) for v in ('', 'd')}
    expected |= {f'hs_resnet50_{p}' for p in ('18w_5s', '22w_4s', '16w_6s', '12w_8s', '28w_6s')}
    assert expected | {'hs_resnet26_small'} <= names


def test_create_model_builds_hs_and_timm_models():
    m = hsresnet.create_model('hs_resnet26', num_classes=3, w=13, s=7, down='conv')
    assert (m.w, m.s, m.down, m.num_classes) == (13, 7, 'conv', 3)
    assert hsresnet.create_model('resnet18', num_classes=3).fc.out_features == 3


def test_unknown_model_name_is_a_value_error_with_suggestions():
    with pytest.raises(ValueError, match=r"Unknown model 'hs_resnet5'.*Did you mean.*hs_resnet50"):
        hsresnet.create_model('hs_resnet5')


def test_one_stage_freezer_counts_stages_from_the_deepest_as_torchvision():
    from hsresnet.factory import freeze_stages

    stages = ('layer1', 'layer2', 'layer3', 'layer4')
    for trainable, trained in [(0, set()), (2, {'layer3', 'layer4'}), (5, {'conv1', 'bn1', *stages})]:
        model = hsresnet.create_model('hs_resnet26', num_classes=0)
        freeze_stages(model, stages, trainable)
        assert {n.split('.')[0] for n, p in model.named_parameters() if p.requires_grad} == trained
    with pytest.raises(ValueError, match=r'trainable_layers=6 is invalid: choose 0-5'):
        freeze_stages(model, stages, 6)
