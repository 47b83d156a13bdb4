"""fold_batchnorm: BatchNorms after packed convs folded into the convs' scales and biases, the
outputs unchanged up to float32 rounding; the BatchNorms it must leave alone; folded models
through save and load."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import mixedprec
from mixedprec import opq, sbs
from mixedprec.nn import FoldedBatchNorm, PackedConv2d
from mixedprec.nn.float_twin import float_twin


def _with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the identity a fresh BatchNorm has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(0.2 + 2 * torch.rand(n, generator=g))
            if m.affine:
                m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _opq_packed(model: nn.Module, rate: float = 6.0) -> nn.Module:
    return mixedprec.pack(opq.convert(model, opq.allocate(model, rate, quiet=True))).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.BatchNorm2d(16, affine=False), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)))


def test_folds_resnet_batchnorms_with_the_same_outputs():
    """ResNet-18: every BatchNorm follows a packed conv (downsample branches included) and folds;
    the scales become float32 and the outputs move by float32 rounding only."""
    torch.manual_seed(0)
    packed = _opq_packed(_with_statistics(torchvision.models.resnet18(num_classes=10)))
    folded = copy.deepcopy(packed)
    names = mixedprec.fold_batchnorm(folded)
    assert len(names) == 20 and "layer2.0.downsample.1" in names
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(m.channel_scale.dtype == torch.float32 for m in folded.modules() if isinstance(m, PackedConv2d))
    assert folded.bn1.folded_into == "conv1"
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        want = packed(x)
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_folds_sbs_models_with_input_quantizers():
    """An exported SBS CNN (channels removed, activations quantized at each conv's input)."""
    model = sbs.convert(_cnn(), sbs.SBSPolicy(group_size=4))
    x = torch.randn(3, 3, 11, 10)
    model(x)  # activation clips from a first batch
    packed = mixedprec.pack(sbs.export(model.eval()).model).eval()
    folded = copy.deepcopy(packed)
    assert mixedprec.fold_batchnorm(folded) == ["1", "4", "7"]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), packed(x), rtol=1e-4, atol=1e-4)


def test_leaves_the_batchnorms_it_cannot_fold():
    """A factor gamma / sqrt(var + eps) <= 0 (the format's scales are positive), a conv output
    also used elsewhere, a float conv, a BatchNorm called twice: all stay, and outputs too."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.packed = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.reused = nn.Conv2d(4, 4, 1)
            self.bn_reused = nn.BatchNorm2d(4)
            self.negative = nn.Conv2d(4, 4, 1)
            self.bn_negative = nn.BatchNorm2d(4)
            self.twice = nn.Conv2d(4, 4, 1)
            self.bn_twice = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.reused(self.bn(self.packed(x)))
            y = self.bn_reused(y) + y  # the conv's output read twice
            y = self.bn_twice(self.twice(y))
            y = self.bn_twice(y)
            return self.bn_negative(self.negative(y))

    torch.manual_seed(0)
    model = _with_statistics(Shared())
    model.bn_negative.weight.data[2] = -0.5
    packed = _opq_packed(model, 1.5)  # layers this small: BatchNorm parameters weigh as much
    assert all(isinstance(getattr(packed, n), PackedConv2d) for n in ("packed", "reused", "negative", "twice"))
    folded = copy.deepcopy(packed)
    assert mixedprec.fold_batchnorm(folded) == ["bn"]
    assert all(isinstance(getattr(folded, n), nn.BatchNorm2d) for n in ("bn_reused", "bn_twice", "bn_negative"))
    x = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), packed(x), rtol=1e-4, atol=1e-4)


def test_refuses_training_mode_and_warns_on_untraceable_models():
    packed = _opq_packed(_cnn())
    with pytest.raises(ValueError, match=r"BatchNorm '1' is in training mode.*model\.eval\(\)"):
        mixedprec.fold_batchnorm(copy.deepcopy(packed).train())

    class Branchy(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)  # data-dependent: fx cannot trace it

    model = Branchy(packed)
    with pytest.warns(UserWarning, match="torch.fx cannot trace Branchy"):
        assert mixedprec.fold_batchnorm(model) == []
    assert isinstance(packed[1], nn.BatchNorm2d)


def test_folded_models_save_and_load(tmp_path):
    """A folded model's file loads on its own and into a freshly built float model, whose
    BatchNorms the file's FoldedBatchNorms replace: the same outputs bit for bit."""
    folded = _opq_packed(_cnn())
    mixedprec.fold_batchnorm(folded)
    path = tmp_path / "folded.safetensors"
    mixedprec.save(folded, path)
    x = torch.randn(2, 3, 9, 9)
    skeleton = _cnn()
    with torch.no_grad():
        want = folded(x)
        assert torch.equal(mixedprec.load(path)(x), want)
        assert torch.equal(mixedprec.load(path, model=skeleton)(x), want)
    assert isinstance(skeleton[1], FoldedBatchNorm) and isinstance(skeleton[0], PackedConv2d)


def test_the_float_twin_runs_the_batchnorms_folded_away():
    """What ``mixedprec report`` times a folded model against: the float original, BatchNorms
    (at their widths before SBS pruned them) and bias-free convs as they were."""
    model = sbs.convert(_cnn(), sbs.SBSPolicy(group_size=4))
    model(torch.randn(3, 3, 11, 10))
    for layer in sbs.sbs_layers(model).values():
        if layer.prune_gate is not None:
            layer.prune_gate.keep[0] = False  # one filter group of each prunable layer
    exported = sbs.export(model.eval()).model
    assert exported[1].num_features < 16  # SBS removed channels
    folded = mixedprec.pack(exported).eval()
    mixedprec.fold_batchnorm(folded)
    twin = float_twin(folded)
    assert [type(twin[i]) for i in (1, 4, 7)] == [nn.BatchNorm2d] * 3
    assert twin[1].num_features == 16 and twin[0].bias is None and twin[3].bias is not None
