"""convert / unconvert / export on the package's models and torchvision's."""
import pytest
import torch
from torch import nn

from mixedprec.metrics import count_bops
from mixedprec.models import digits_cnn, resnet20
from mixedprec.sbs import SBSPolicy, convert, export, sbs_layers, unconvert

torchvision = pytest.importorskip("torchvision")


def _roles(model):
    layers = sbs_layers(model)
    producers = {n for n, m in layers.items() if m.prune_gate is not None}
    consumers = {n: next(p for p in layers if layers[p] is m.input_source.layer)
                 for n, m in layers.items() if m.input_source is not None}
    members = {n for n, m in layers.items() if m.channel_source is not None}
    return producers, consumers, members


def test_resnet20_prunes_inner_convs_only_and_keeps_ends_at_8_bits():
    model = convert(resnet20())
    producers, consumers, members = _roles(model)
    assert producers == {f"layers.{i}.conv1" for i in range(9)}  # never a block output feeding an addition
    assert consumers == {f"layers.{i}.conv2": f"layers.{i}.conv1" for i in range(9)}
    assert not members
    layers = sbs_layers(model)
    assert layers["conv1"].w_quant.bits == (8,) and layers["fc"].a_quant.bits == (8,)
    assert layers["layers.4.conv2"].w_quant.bits == (2, 4, 8)


def test_mobilenet_v2_prunes_through_depthwise_convs():
    model = convert(torchvision.models.mobilenet_v2())
    producers, consumers, members = _roles(model)
    assert "features.2.conv.0.0" in producers  # expansion conv ...
    assert "features.2.conv.1.0" in members     # ... its channels go through the depthwise conv ...
    assert consumers["features.2.conv.2"] == "features.2.conv.0.0"  # ... to the projection
    assert "features.3.conv.2" not in producers  # a residual block's output feeds an addition
    assert consumers["classifier.1"] == "features.18.0"  # global pool + flatten + dropout + linear


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.mobilenet_v2])
def test_torchvision_models_run_forward_and_backward(factory):
    torch.manual_seed(0)
    model = convert(factory(num_classes=10), inplace=True)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, layer in sbs_layers(model).items():
        assert layer.weight.grad is not None and layer.a_quant.clip.grad is not None, name


def test_unconvert_restores_the_float_model():
    torch.manual_seed(0)
    model = resnet20()
    sbs = convert(model)
    assert set(model.state_dict()) <= set(sbs.state_dict())
    back = unconvert(sbs)
    assert not sbs_layers(back)
    assert back.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)
    model.eval(), back.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), model(x))


def test_convert_in_place_shares_parameters_and_leaves_original_by_default():
    model = digits_cnn()
    copy = convert(model)
    assert isinstance(model[0], nn.Conv2d) and copy[0].weight is not model[0].weight
    same = convert(model, inplace=True)
    assert same is model and sbs_layers(model)


def test_untraceable_model_converts_without_pruning():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) if h.sum() > 0 else self.b(-h)  # data-dependent: fx cannot trace it

    with pytest.warns(UserWarning, match="no layer will be pruned"):
        model = convert(Branchy())
    assert all(m.prune_gate is None for m in sbs_layers(model).values())
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_policy_switches():
    quant_only = convert(digits_cnn(), SBSPolicy(prune=False))
    assert all(m.prune_gate is None for m in sbs_layers(quant_only).values())
    prune_only = convert(digits_cnn(), SBSPolicy(quantize=False))
    assert all(m.bits() == (32, 32) for m in sbs_layers(prune_only).values())
    assert any(m.prune_gate is not None for m in sbs_layers(prune_only).values())
    excluded = convert(digits_cnn(), SBSPolicy(exclude=("3",)))
    assert type(excluded[3]) is nn.Conv2d and excluded[0].prune_gate is None  # no consumer to mask its output
    with pytest.raises(ValueError, match="exclude"):
        convert(digits_cnn(), SBSPolicy(exclude=("nope",)))
    with pytest.raises(ValueError, match="policy"):
        convert(digits_cnn(), {"prune": False})


def _prune_some(model, x):
    """Raise every pruning threshold to its cap and lower some bits, then fix the choice."""
    model.train()
    model(x)
    for layer in sbs_layers(model).values():
        if layer.prune_gate is not None:
            with torch.no_grad():
                layer.prune_gate.threshold.fill_(1.0)
            layer.prune_gate.project_(layer.weight)
        if len(layer.w_quant.bits) > 1:
            with torch.no_grad():
                layer.w_quant.thresholds.copy_(torch.tensor([0.0, 1.0]))
    model(x)
    model.eval()


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "mobilenet_v2", "mlp"])
def test_export_removes_pruned_channels_with_identical_outputs(name):
    torch.manual_seed(0)
    model, shape = {
        "digits_cnn": (digits_cnn(), (1, 8, 8)),
        "resnet20": (resnet20(), (3, 16, 16)),
        "mobilenet_v2": (torchvision.models.mobilenet_v2(  # its blocks, fewer of them: float64 convs are slow
            num_classes=10, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2]]), (3, 16, 16)),
        "mlp": (nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                              nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)), (12,)),
    }[name]
    sbs = convert(model.double())
    x = torch.randn(6, *shape, dtype=torch.float64)
    _prune_some(sbs, x)
    exported = export(sbs)
    assert exported.model(x).shape == sbs(x).shape
    torch.testing.assert_close(exported.model.eval()(x), sbs(x), rtol=1e-9, atol=1e-12)
    assert count_bops(exported.model, shape) == count_bops(sbs, shape) < count_bops(model, shape)

    pruned = {n: r for n, r in exported.layers.items() if r.kept_out_channels is not None
              and len(r.kept_out_channels) < r.out_channels}
    assert pruned, "the test should prune something"
    layers = sbs_layers(exported.model)
    for n, report in pruned.items():
        assert layers[n].weight.shape[0] == len(report.kept_out_channels)
        assert layers[n].prune_gate is None and layers[n].w_quant.fixed_bits == report.weight_bits
        original = dict(model.named_modules())[n].weight
        kept_in = report.kept_in_channels or slice(None)
        torch.testing.assert_close(layers[n].weight, original[report.kept_out_channels][:, kept_in])
