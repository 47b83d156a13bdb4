"""BOPs counting against hand-computed values."""
import pytest
import torch
from torch import nn

from mixedprec.metrics import bops_table, count_bops, differentiable_bops, format_bops_table, output_positions
from mixedprec.sbs import SBSPolicy, convert, sbs_layers


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),                         # 8x8 out
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),              # 4x4 out
        nn.Conv2d(16, 16, 3, padding=1, groups=4),                        # 4x4 out, grouped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


# k^2 * C_in/groups * C_out * H_out * W_out per layer
MACS = [9 * 3 * 8 * 64, 9 * 8 * 16 * 16, 9 * 4 * 16 * 16, 16 * 5]


def test_float_layers_count_at_32_bits():
    assert count_bops(_net(), (3, 8, 8)) == sum(MACS) * 32 * 32 == 42_549_248


def test_linear_on_sequences_counts_every_position():
    assert count_bops(nn.Sequential(nn.Linear(6, 4)), (5, 6)) == 6 * 4 * 5 * 32 * 32


def test_sbs_layers_count_at_hard_bits_and_kept_channels():
    model = convert(_net(), SBSPolicy(group_size=4))
    layers = sbs_layers(model)
    assert layers["0"].prune_gate is not None  # conv 0 feeds conv 2 through a ReLU
    assert layers["2"].prune_gate is None      # its consumer is a grouped conv: not prunable
    model(torch.rand(2, 3, 8, 8))
    with torch.no_grad():
        layers["0"].prune_gate.keep[:4] = False
    layers["0"].prune_gate.fix()
    layers["2"].fix(2, 4)
    layers["4"].fix(4, 8)
    expected = (9 * 3 * 4 * 64 * 8 * 8          # first layer: 8/8 bits, 4 of 8 filters kept
                + 9 * 4 * 16 * 16 * 2 * 4       # 4 of its 8 input channels kept
                + 9 * 4 * 16 * 16 * 4 * 8
                + 16 * 5 * 8 * 8)               # last layer: 8/8 bits
    assert count_bops(model, (3, 8, 8)) == expected == 816_128
    excluded = convert(_net(), SBSPolicy(exclude=("4",)))
    excluded(torch.rand(2, 3, 8, 8))
    assert count_bops(excluded, (3, 8, 8)) == (MACS[0] + MACS[3]) * 64 + MACS[1] * 64 + MACS[2] * 1024


def test_differentiable_bops_equals_the_hard_count_and_carries_gradients():
    model = convert(_net(), SBSPolicy(group_size=4))
    layers = sbs_layers(model)
    with torch.no_grad():
        layers["2"].w_quant.thresholds.copy_(torch.tensor([0.0, 10.0]))  # 4-bit weights
        layers["0"].prune_gate.threshold.fill_(0.5)
    model.train()
    model(torch.rand(4, 3, 8, 8))
    positions = output_positions(model, (3, 8, 8))
    assert positions == {"0": 64, "2": 16, "4": 16, "7": 1}
    total = differentiable_bops(model, positions)
    assert total.item() == count_bops(model, (3, 8, 8))
    total.backward()
    assert layers["2"].w_quant.thresholds.grad[0] < 0  # raising a threshold lowers BOPs
    assert layers["2"].a_quant.thresholds.grad[0] < 0
    assert layers["0"].prune_gate.threshold.grad < 0

    model.zero_grad()
    model(torch.rand(4, 3, 8, 8))
    differentiable_bops(model, positions, weights=False).backward()
    assert layers["2"].w_quant.thresholds.grad is None or not layers["2"].w_quant.thresholds.grad.any()
    assert layers["2"].a_quant.thresholds.grad.any()


def test_table_rows_and_text():
    model = convert(_net())
    model(torch.rand(2, 3, 8, 8))
    rows = bops_table(model, (3, 8, 8))
    assert [r.name for r in rows] == ["0", "2", "4", "7"]
    assert sum(r.bops for r in rows) == count_bops(model, (3, 8, 8))
    assert sum(r.share for r in rows) == pytest.approx(1.0)
    assert rows[2].shape == "conv 3x3 16->16 /1 g4" and rows[3].shape == "linear 16->5"
    text = format_bops_table(rows)
    assert "conv 3x3 8->16 /2" in text and text.splitlines()[-1].startswith("total")


def test_input_shape_must_be_one_example():
    with pytest.raises(ValueError, match="input_shape"):
        count_bops(_net(), (0, 8, 8))
