"""Export paths of the HS-ResNet family: TorchScript, torch.fx (plain and timm's feature extractor), torch.compile,
ONNX (dynamo) with onnxruntime parity. Depth-26 models at 32-64 px."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import set_layer_config, set_scriptable
from timm.models import create_feature_extractor

import hsresnet  # noqa: F401  (registers the models)

CASES = [
    ('hs_resnet26', {}),
    ('hs_resnet26d', {}),
    ('hs_resnet26_small', {}),
    ('hs_resnet26', {'down': 'conv', 'output_stride': 8}),
]


def _build(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, num_classes=10, zero_init_last=False, **kwargs).eval()


def _x(name: str, batch: int = 2) -> torch.Tensor:
    px = 32 if name.endswith('_small') else 64
    return torch.randn(batch, 3, px, px)


@pytest.mark.parametrize('name, kwargs', CASES)
def test_torchscript_matches_eager(name, kwargs):
    with set_layer_config(scriptable=True), set_scriptable(True):
        model = _build(name, **kwargs)
        scripted = torch.jit.script(model)
    x = _x(name)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x))


@pytest.mark.parametrize('name, kwargs', CASES)
def test_fx_trace_matches_eager(name, kwargs):
    model = _build(name, **kwargs)
    traced = torch.fx.symbolic_trace(model)
    x = _x(name)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    # the input-channel check stays a leaf call in the graph, so the traced model refuses bad input too
    with pytest.raises(ValueError, match='in_chans=3'):
        traced(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize('name', ['hs_resnet26d', 'hs_resnet26_small'])
def test_timm_fx_feature_extractor(name):
    x = _x(name)
    nets = {}
    for cls in ('fx', 'hook'):  # same seed, same init: the two extractors hold the same weights
        torch.manual_seed(0)
        nets[cls] = timm.create_model(name, features_only=True, feature_cls=cls).eval()
    graph_net, by_hooks = nets['fx'], nets['hook']
    assert type(graph_net).__name__ == 'FeatureGraphNet'
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    nodes = create_feature_extractor(model, return_nodes={'layer2': 'c3', 'layer4': 'c5'})
    with torch.no_grad():
        graph_maps, hook_maps = graph_net(x), by_hooks(x)
        picked = nodes(x)
    assert graph_net.feature_info.reduction() == by_hooks.feature_info.reduction()
    for a, b in zip(graph_maps, hook_maps):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(picked['c3'], hook_maps[2])
    torch.testing.assert_close(picked['c5'], hook_maps[4])


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """Inductor on the CPU: about 1-3 min cold on the shared 2-core machine."""
    model = _build('hs_resnet26_small')
    compiled = torch.compile(model)
    x = _x('hs_resnet26_small')
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_onnx_dynamo_export_onnxruntime_parity(tmp_path):
    """``torch.onnx.export(dynamo=True)`` with a dynamic batch; onnxruntime agrees with torch (about 30 s here)."""
    ort = pytest.importorskip('onnxruntime')
    model = _build('hs_resnet26d')
    path = tmp_path / 'hs_resnet26d.onnx'
    batch = torch.export.Dim('batch')
    torch.onnx.export(model, (_x('hs_resnet26d'),), str(path), dynamo=True, dynamic_shapes={'x': {0: batch}})
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = _x('hs_resnet26d', batch=3)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)
