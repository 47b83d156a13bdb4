"""metrics.latency (medians within a time budget, eval and inference mode, the training flag
restored) and nn.float_twin (the float architecture a packed model's speed is compared with).
Timings are never asserted against each other: only that they are measured as promised."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import mixedprec
from mixedprec import opq
from mixedprec.cli.report import latency, latency_line
from mixedprec.metrics.latency import model_latency, time_calls
from mixedprec.models import digits_cnn
from mixedprec.nn import PackedConv2d, PackedLinear
from mixedprec.nn.float_twin import float_twin

SHAPE = (1, 8, 8)


class Probe(nn.Module):
    """Records the mode and batch of every forward."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_inference_mode_enabled(), x.shape[0]))
        return self.linear(x)


def test_time_calls_gives_a_positive_median_of_the_timed_calls():
    calls = []
    timed = time_calls(lambda: calls.append(1), repeats=7, warmup=3)
    assert timed.median_ms > 0 and timed.runs == 7 and len(calls) == 10


def test_time_calls_stops_at_its_budget_but_times_one_call():
    start = time.perf_counter()
    timed = time_calls(lambda: time.sleep(0.05), repeats=100, warmup=1, budget_s=0.2)
    assert 1 <= timed.runs < 10 and time.perf_counter() - start < 1.0
    assert timed.median_ms >= 50
    assert time_calls(lambda: time.sleep(0.02), repeats=5, budget_s=1e-9).runs == 1
    calls = []
    timed = time_calls(lambda: (calls.append(1), time.sleep(0.01)), repeats=100, warmup=1000, budget_s=0.4)
    assert len(calls) - timed.runs <= 12 and timed.runs >= 15  # warm-up: a quarter of the budget
    with pytest.raises(ValueError, match="budget_s > 0"):
        time_calls(lambda: None, budget_s=0)


@pytest.mark.parametrize("training", [True, False])
def test_model_latency_runs_in_eval_and_inference_mode_and_restores_the_flag(training):
    model = Probe().train(training)
    timed = model_latency(model, (4,), batch=3, repeats=4, warmup=1)
    assert timed.median_ms > 0 and timed.runs == 4
    assert model.seen == [(False, True, 3)] * 5
    assert model.training is training


def test_model_latency_repeats_example_tensors_to_the_batch():
    model = Probe()
    model_latency(model, torch.randn(2, 4), batch=5, repeats=1, warmup=0)
    assert model.seen == [(False, True, 5)]


@pytest.fixture(scope="module")
def packed():
    torch.manual_seed(0)
    model = digits_cnn(width=4).eval()
    return mixedprec.pack(opq.convert(model, opq.allocate(model, 8, quiet=True))).eval()


def test_the_float_twin_has_plain_layers_of_the_same_geometry(packed):
    twin = float_twin(packed)
    pairs = [(a, b) for a, b in zip(packed.modules(), twin.modules()) if isinstance(a, (PackedConv2d, PackedLinear))]
    assert len(pairs) == 5
    for layer, plain in pairs:
        assert type(plain) in (nn.Conv2d, nn.Linear)
        assert plain.weight.shape == layer.weight_shape and (plain.bias is None) == (layer.bias is None)
    assert twin(torch.zeros(2, *SHAPE)).shape == packed(torch.zeros(2, *SHAPE)).shape
    assert any(isinstance(m, PackedConv2d) for m in packed.modules())  # the model itself is untouched


def test_the_float_twin_gives_pruned_channels_back():
    """What sbs.export leaves: narrowed layers and BatchNorm remembering their original widths."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1))
    model[0].pruned_from, model[1].pruned_from, model[2].pruned_from = (
        {"out_channels": 8}, {"num_features": 8}, {"in_channels": 8})
    twin = float_twin(model)
    assert twin[0].weight.shape == (8, 1, 3, 3) and twin[2].weight.shape == (2, 8, 1, 1)
    assert twin[1].num_features == 8 and twin[1].running_var.shape == (8,) and not hasattr(twin[1], "pruned_from")
    assert twin(torch.zeros(1, 1, 5, 5)).shape == (1, 2, 3, 3)


def test_without_a_float_twin_the_report_says_why_in_one_line(packed):
    timed = latency(packed, SHAPE, "cpu")
    assert timed["model_ms"] > 0 and timed["float_ms"] > 0 and timed["speedup"] > 0
    odd = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    odd[1].pruned_from = {"normalized_shape": (8,), "eps": 1e-5}  # two widths: not restorable
    timed = latency(odd, (4,), "cpu")
    assert timed["float_ms"] is None and "normalized_shape" in timed["float_unavailable"]
    line = latency_line(timed)
    assert "float model not timed" in line and "\n" not in line


def test_models_are_timed_in_rounds_each_in_its_own_mode_and_flag_restored():
    """models_latency calls the models in turn, one call each per round (warm-up too), with the
    same example, and restores each model's training flag."""
    calls = []

    class Named(Probe):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return super().forward(x)

    models = [Named("a").train(), Named("b").eval()]
    timed = mixedprec.metrics.models_latency(models, (4,), batch=2, repeats=3, warmup=1)
    assert [t.runs for t in timed] == [3, 3] and all(t.median_ms > 0 for t in timed)
    assert calls == ["a", "b"] * 4
    assert all(m.seen == [(False, True, 2)] * 4 for m in models)
    assert [m.training for m in models] == [True, False]
