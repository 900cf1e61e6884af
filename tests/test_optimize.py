"""hsresnet.optimize: BN folding is exact in eval, the optimized model matches eager, bad input is refused."""

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from hsresnet.optimize import OptimizedModel, fast_bf16_available, fold_batchnorm, optimize
from test_layers_fast import randomize_norms


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return randomize_norms(timm.create_model('hs_resnet26_small', num_classes=10)).eval()


@pytest.fixture(scope='module')
def fashion_images():
    """16 real Fashion-MNIST test images, 32 px, normalized like the classification task (grey -> 3 channels)."""
    from hsresnet.classification.data import FASHION_MNIST_FILES, _find_idx, find_fashion_mnist, read_idx

    try:
        root = find_fashion_mnist()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    images = read_idx(_find_idx(root, FASHION_MNIST_FILES['test'][0]))[:16]
    x = torch.from_numpy(np.array(images)).float().div(255).sub(0.286).div(0.353)
    x = nn.functional.pad(x, (2, 2, 2, 2), value=float(x.min()))[:, None].expand(-1, 3, -1, -1)
    return x.contiguous()


def test_fold_batchnorm_is_exact_in_eval(model, fashion_images):
    folded = fold_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert type(folded) is type(model)  # structure and methods kept: forward_features still works
    with torch.inference_mode():
        expected = model(fashion_images)
        torch.testing.assert_close(folded(fashion_images), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            folded.forward_features(fashion_images), model.forward_features(fashion_images), rtol=1e-4, atol=1e-4
        )


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError, match='eval'):
        fold_batchnorm(timm.create_model('hs_resnet26_small', num_classes=10).train())


def test_optimize_fp32_matches_eager(model, fashion_images):
    fast = optimize(model, bf16=False)
    assert isinstance(fast, OptimizedModel)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert fast.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = fast(fashion_images)
        expected = model(fashion_images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_optimize_bf16_close_to_eager(model, fashion_images):
    fast = optimize(model, bf16=True)
    assert fast.model.fc.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        out = fast(fashion_images)
        expected = model(fashion_images)
    assert out.dtype == torch.float32
    cos = nn.functional.cosine_similarity(out, expected, dim=1)
    assert cos.min() > 0.99, cos.min()


@pytest.mark.parametrize(
    'kwargs',
    [
        {'w': 13, 's': 2},
        {'w': 8, 's': 5, 'down': 'conv'},
        {'w': 6, 's': 8},
        {'w': 12, 's': 3, 'output_stride': 16},  # a dilated stage 4: stride-1 HS blocks with dilation 2
        {'w': 10, 's': 4, 'down': 'conv', 'output_stride': 8},
    ],
)
def test_optimize_matches_eager_across_the_family(kwargs):
    """The deployment form (BN folded, channels_last; fp32 and bf16) computes what the eager model does for every
    (w, s), both downsampling modes and a dilated network."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model('hs_resnet26', num_classes=10, **kwargs)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(optimize(model, bf16=False)(x), expected, rtol=1e-4, atol=1e-4)
        cos = nn.functional.cosine_similarity(optimize(model, bf16=True)(x), expected, dim=1)
    assert cos.min() > 0.99, cos.min()


def test_optimize_refuses_non_module():
    with pytest.raises(ValueError, match='nn.Module'):
        optimize(lambda x: x)


def test_fast_bf16_available_is_a_bool():
    assert isinstance(fast_bf16_available('cpu'), bool)
    assert fast_bf16_available('meta') is False
