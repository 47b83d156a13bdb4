"""SBS presets: each builds the filter grouping of the SBS authors' reference code (group size,
thresholds per group or per layer) on the networks it is meant for; per-group thresholds;
activation grids; --preset on the command line."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mixedprec import sbs
from mixedprec.models import resnet20
from mixedprec.sbs.presets import PRESETS, preset_table
from mixedprec.sbs.pruning import FilterGroupGate

torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")

# The reference's rule: the inner conv of every residual block (and, in MobileNetV2, every
# expansion conv through its depthwise conv, and the convs not feeding an addition) is pruned
# in groups of B filters; the count per layer is its width / B.
RESNET20 = {f"layers.{i}.conv1": (16, 32, 64)[i // 3] // 4 for i in range(9)}
RESNET18 = {f"layer{stage}.{block}.conv1": width // 8
            for stage, width in zip((1, 2, 3, 4), (64, 128, 256, 512)) for block in (0, 1)}
# torchvision MobileNetV2: blocks 2..17 expand their input width c 6 times (the (t, c, n, s) table)
BLOCK_INPUTS = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160]
MOBILENET_V2 = {"features.0.0": 32 // 16,
                **{f"features.{i}.conv.0.0": 6 * c // 16 for i, c in enumerate(BLOCK_INPUTS, start=2)},
                "features.17.conv.2": 320 // 16, "features.18.0": 1280 // 16}


@pytest.mark.parametrize("preset, build, groups, per_group", [
    ("cifar-preresnet", lambda: resnet20(100), RESNET20, False),
    ("imagenet-resnet", torchvision.models.resnet18, RESNET18, True),
    ("mobilenet-v2", torchvision.models.mobilenet_v2, MOBILENET_V2, False),
])
def test_each_preset_builds_the_reference_grouping(preset, build, groups, per_group):
    expected = {name: (n, n if per_group else 1) for name, n in groups.items()}
    assert sbs.pruning_groups(build(), sbs.SBSPolicy.preset(preset)) == expected


@pytest.mark.parametrize("preset, build", [("cifar-preresnet", lambda: resnet20(100)),
                                           ("imagenet-resnet", torchvision.models.resnet18)])
def test_converted_gates_match_the_grouping(preset, build):
    model, policy = build(), sbs.SBSPolicy.preset(preset)
    net = sbs.convert(model, policy)
    gates = {name: (layer.prune_gate.n_groups, layer.prune_gate.n_thresholds)
             for name, layer in sbs.sbs_layers(net).items() if layer.prune_gate is not None}
    assert gates == sbs.pruning_groups(model, policy)


def test_the_default_policy_stays_one_threshold_per_layer_in_groups_of_4():
    policy = sbs.SBSPolicy()
    assert (policy.group_size, policy.per_group_thresholds, policy.act_grid) == (4, False, "signed")
    assert set(sbs.pruning_groups(resnet20(10)).values()) <= {(4, 1), (8, 1), (16, 1)}


def test_mobilenet_v2_preset_converts_with_the_asymmetric_grid():
    net = sbs.convert(torchvision.models.mobilenet_v2(), sbs.SBSPolicy.preset("mobilenet-v2"))
    assert net.features[2].conv[0][0].prune_gate.group_size == 16
    layers = sbs.sbs_layers(net)
    first = next(iter(layers.values()))
    assert first.a_quant.offset is None  # the model's input keeps the signed grid
    assert all(layer.a_quant.offset is not None for layer in list(layers.values())[1:] if layer.a_quant.enabled)


def test_asymmetric_grid_learns_an_offset_and_keeps_zero():
    """Inputs with negative values get the unsigned grid shifted by a learnable offset (started
    from the first batch's range); 0 maps to exactly 0; non-negative inputs stay unsigned."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    net = sbs.convert(model, sbs.SBSPolicy(act_grid="asymmetric", first_last_bits=None, prune=False))
    x = torch.randn(64, 4)
    net(x).square().sum().backward()
    quants = [net[i].a_quant for i in (0, 1, 3)]
    assert [q.signed for q in quants] == [True, False, False]
    assert [q.asymmetric for q in quants] == [False, True, False]
    q = quants[1]
    assert 0 < q.offset.item() < 1 and q.offset.grad is not None and q.clip.grad is not None
    assert quants[2].offset.grad is None  # ReLU output: the plain unsigned grid, offset unused
    hidden = net[0](x).detach()
    assert hidden.min() < 0 < hidden.max()
    probe = torch.cat([hidden.flatten(), torch.zeros(3)])
    y = q(probe)
    assert (y[-3:] == 0).all() and (y < 0).any()
    q.fix(4)
    net.eval()
    assert (q(probe)[-3:] == 0).all()
    state = net.state_dict()
    assert any(k.endswith("a_quant.offset") for k in state)
    again = sbs.convert(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
                        sbs.SBSPolicy(act_grid="asymmetric", first_last_bits=None, prune=False))
    again.load_state_dict(state)
    again[1].a_quant.fix(4)
    again.eval()
    assert again[1].a_quant.asymmetric and torch.equal(again[1].a_quant(probe), q(probe))


def test_unknown_preset_and_conflicting_settings_are_refused():
    with pytest.raises(ValueError, match="unknown preset 'vgg'"):
        sbs.SBSPolicy.preset("vgg")
    with pytest.raises(ValueError, match="act_grid must be one of"):
        sbs.SBSPolicy(act_grid="zero")
    with pytest.raises(ValueError, match="choose one"):
        sbs.SBSPolicy(act_signed=True, act_grid="unsigned")


def test_per_group_thresholds_prune_each_group_by_its_own_threshold():
    weight = torch.cat([torch.full((2, 3), v) for v in (1.0, 0.2, 0.5, 0.1)])  # group norms 1, .2, .5, .1
    gate = FilterGroupGate(8, 2, max_prune_ratio=0.75, per_group_thresholds=True)
    assert gate.threshold.shape == (4,)
    with torch.no_grad():
        gate.threshold.copy_(torch.tensor([0.0, 0.3, 0.3, 0.05]))
    mask = gate.channel_mask(weight)
    assert mask.tolist() == [1, 1, 0, 0, 1, 1, 1, 1]  # only group 1 is below its own threshold
    mask.sum().backward()
    assert gate.threshold.grad.shape == (4,) and torch.all(gate.threshold.grad != 0)
    with torch.no_grad():
        gate.threshold.fill_(0.9)
    gate.project_(weight)  # at most 3 of 4 groups pruned: every threshold capped at the 3rd weakest norm
    assert torch.allclose(gate.threshold, torch.full((4,), 0.5))


def test_unsigned_grid_clips_negative_inputs_and_the_first_layer_stays_signed():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    net = sbs.convert(model, sbs.SBSPolicy(act_grid="unsigned", first_last_bits=None, prune=False))
    net.eval()
    net(torch.randn(16, 4))  # every layer's input holds negative values
    assert [net[i].a_quant.signed for i in range(3)] == [True, False, False]
    x = torch.tensor([[-1.0, 0.5, 2.0, -3.0]])
    assert torch.all(net[1].a_quant(x) >= 0)


def test_docs_hold_the_preset_table():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "sbs.md").read_text()
    assert preset_table() in docs
    assert all(re.search(rf"\| {name} \|", docs) for name in PRESETS)
