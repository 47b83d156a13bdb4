"""OPQConv2d / OPQLinear, convert and finetune: the forward pass is the layer on the quantized
weight, pruned weights get no gradient and stay zero, and finetuning leaves masks, codebooks
and scales as they were while the weights move."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from mixedprec.backends import reference
from mixedprec.metrics import compression_report
from mixedprec.opq import OPQConv2d, OPQLinear, allocate, convert, finetune


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, groups=2, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


@pytest.fixture
def converted():
    model = small_model()
    plan = allocate(model, 10)
    return model, plan, convert(model, plan)


def test_convert_replaces_the_planned_layers_and_keeps_the_float_model(converted):
    model, plan, opq = converted
    assert isinstance(opq[0], OPQConv2d) and isinstance(opq[3], OPQConv2d) and isinstance(opq[7], OPQLinear)
    assert type(model[0]) is nn.Conv2d  # not in place by default
    assert opq[3].groups == 2 and opq[3].bias is None and opq[0].padding == (1, 1)
    for name, module in (("0", opq[0]), ("3", opq[3]), ("7", opq[7])):
        layer = plan.layer(name)
        assert module.bits == layer.bits and int(module.keep_mask.sum()) == layer.kept
        assert module.codebook.tolist() == layer.codebook


def test_forward_is_the_float_layer_on_the_quantized_weight(converted):
    _, _, opq = converted
    x = torch.randn(4, 1, 8, 8)
    conv = opq[0]
    expected_weight = reference.codebook_quant(conv.weight, conv.codebook, conv.channel_scale, conv.keep_mask)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected_weight, conv.bias, padding=1), rtol=0, atol=0)
    h = torch.randn(3, 128)
    linear = opq[7]
    expected_weight = reference.codebook_quant(linear.weight, linear.codebook, linear.channel_scale, linear.keep_mask)
    torch.testing.assert_close(linear(h), F.linear(h, expected_weight, linear.bias), rtol=0, atol=0)


def test_converted_model_reports_the_plans_compression(converted):
    _, plan, opq = converted
    report = compression_report(opq)
    assert report.packed_bytes == plan.report.packed_bytes and report.paper_bits == plan.report.paper_bits
    assert report.other_float_bytes == sum(t.numel() * 4 for t in (opq[0].bias, opq[7].bias, opq[1].weight,
                                                                    opq[1].bias, opq[1].running_mean, opq[1].running_var))


def test_pruned_weights_get_zero_gradient_and_start_at_zero(converted):
    _, _, opq = converted
    opq(torch.randn(4, 1, 8, 8)).square().sum().backward()
    assert sum(int((~m.keep_mask).sum()) for m in (opq[0], opq[3], opq[7])) > 1000  # something to check
    for module in (opq[0], opq[3], opq[7]):
        pruned = ~module.keep_mask
        assert torch.all(module.weight[pruned] == 0) and torch.all(module.weight.grad[pruned] == 0)
        assert module.weight.grad[module.keep_mask].abs().sum() > 0


def test_finetuning_keeps_masks_codebooks_and_scales_fixed(converted):
    _, _, opq = converted
    frozen = {k: v.clone() for k, v in opq.state_dict().items() if k.endswith(("keep_mask", "codebook", "channel_scale"))}
    latent_before = opq[3].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    finetune(opq, data, epochs=2, lr=0.05, quiet=True)
    state = opq.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert not torch.equal(opq[3].weight, latent_before)  # the weights did train
    for module in (opq[0], opq[3], opq[7]):
        assert torch.all(module.weight[~module.keep_mask] == 0)
        quantized = module.quantized_weight().detach()
        levels = quantized / module.channel_scale.reshape(-1, *[1] * (quantized.dim() - 1))
        on_grid = (levels.unsqueeze(-1) - module.codebook).abs().min(-1).values < 1e-5
        assert torch.all(on_grid[module.keep_mask]) and torch.all(quantized[~module.keep_mask] == 0)


def test_state_dict_round_trip_into_a_fresh_conversion(converted):
    model, plan, opq = converted
    with torch.no_grad():
        opq[0].weight.mul_(1.01)
    again = convert(model, plan)
    again.load_state_dict(opq.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again.eval()(x), opq.eval()(x))


def test_convert_refuses_a_plan_of_other_weights(converted):
    _, plan, opq = converted
    with pytest.raises(ValueError, match="other weights"):
        convert(small_model(seed=1), plan)
    with pytest.raises(ValueError, match="already an OPQ layer"):
        convert(opq, plan)
    with pytest.raises(ValueError, match="no module"):
        convert(nn.Module(), plan)
    with pytest.raises(ValueError, match="Linear with weight"):
        convert(nn.Sequential(nn.Linear(2, 2)), plan)


def test_layers_refuse_bad_compression_settings():
    with pytest.raises(ValueError, match="bits"):
        OPQLinear(4, 4, bits=0)
    with pytest.raises(ValueError, match="scale_dtype"):
        OPQConv2d(1, 2, 3, bits=2, scale_dtype=torch.bfloat16)


def test_finetune_refuses_a_model_without_opq_layers():
    with pytest.raises(ValueError, match="no OPQ layer"):
        finetune(small_model(), TensorDataset(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)), epochs=1)
