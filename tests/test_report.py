"""The one report model: every reduction against a float reference, refused without one; the
layers describe themselves (float, SBS before and after export, OPQ, packed); OPQ's BOPs are
labelled with what they count."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mixedprec
from mixedprec import opq, sbs
from mixedprec.metrics import NoReference, Reference, count_bops, model_report
from mixedprec.models import digits_cnn
from mixedprec.reporting import MethodResult, results_table

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = digits_cnn(width=8).eval()
    net = sbs.convert(model, sbs.SBSPolicy(group_size=2))
    net.train()
    for _ in range(2):
        net(torch.randn(8, *SHAPE))
    with torch.no_grad():  # prune: the gates of the producers close on their weakest groups
        for layer in sbs.sbs_layers(net).values():
            if layer.prune_gate is not None:
                layer.prune_gate.threshold.fill_(1.0)
                layer.prune_gate.project_(layer.weight)
    net(torch.randn(8, *SHAPE))
    sbs.fix_configuration(net)
    exported = sbs.export(net).model.eval()
    return model, net.eval(), exported, opq.convert(model, opq.allocate(model, 8, quiet=True))


def test_reductions_are_against_the_float_model_not_the_pruned_shapes(models):
    model, net, exported, _ = models
    reference = Reference.of(model_report(model, SHAPE))
    assert reference.bops == count_bops(model, SHAPE)
    given = model_report(exported, SHAPE, reference)
    assert given.float_bytes < reference.weight_bytes  # channels were pruned
    assert given.bops == count_bops(net, SHAPE) and given.bops_reduction == reference.bops / given.bops
    # the exported SBS layers state their float size themselves: the same reference without one given
    stated = model_report(exported, SHAPE)
    assert stated.reference.bops == reference.bops and stated.reference.weight_bytes == reference.weight_bytes
    assert stated.bops_reduction == pytest.approx(given.bops_reduction)
    # measured against the pruned shapes instead, the reduction would be smaller: the old understatement
    assert stated.real_rate > stated.float_bytes / stated.packed_bytes


def test_a_report_without_a_reference_refuses_a_reduction(models):
    model, _, exported, _ = models
    packed = mixedprec.pack(exported)
    report = model_report(packed, SHAPE)
    assert report.reference is None  # packed layers cannot know their float size
    for attr in ("bops_reduction", "real_rate", "paper_rate", "baseline_bops", "baseline_bytes"):
        with pytest.raises(NoReference, match="no float reference"):
            getattr(report, attr)
    text = report.table()
    assert "reduction not shown: no float reference" in text and "rates not shown: no float reference" in text
    assert "fewer than" not in text
    d = report.to_dict()
    assert d["bops_reduction"] is None and d["real_rate"] is None and d["reference"] is None
    reference = Reference.of(model_report(model, SHAPE))
    assert model_report(packed, SHAPE, reference).bops_reduction == pytest.approx(
        model_report(exported, SHAPE, reference).bops_reduction)


def test_a_reference_must_come_from_a_float_model(models):
    with pytest.raises(ValueError, match="float model's report"):
        Reference.of(model_report(models[1], SHAPE))


def test_opq_bops_are_labelled_with_what_they_count(models):
    model, _, exported, opq_model = models
    reference = Reference.of(model_report(model, SHAPE))
    opq_report = model_report(opq_model, SHAPE, reference)
    sbs_report = model_report(exported, SHAPE, reference)
    assert opq_report.bops_flags == ("a32", "sparse") and sbs_report.bops_flags == ()
    assert "float activations (32 bits)" in opq_report.table() and "sparsity credited" in opq_report.table()
    assert "dense" in sbs_report.bops_counts
    results = [MethodResult(name, 90.0, r.bops, r.packed_bytes, 1000, 1.0, report=r, latency_ms=0.25)
               for name, r in (("float", model_report(model, SHAPE)), ("SBS", sbs_report), ("OPQ", opq_report))]
    table = results_table(results, results[0])
    assert "BOPs count" in table and "b1 ms" in table
    opq_line = next(line for line in table.splitlines() if line.startswith("OPQ"))
    assert "a32, sparse" in opq_line and "float activations" in table.splitlines()[-1]


def test_without_an_example_no_bops_are_counted(models):
    *_, opq_model = models
    report = model_report(opq_model)
    assert report.bops is None and report.real_rate > 1
    with pytest.raises(NoReference, match="one example"):
        report.bops_reduction
