"""The steps the demo and ``mixedprec compress`` chain: float training, SBS, OPQ, a uniform
baseline, then deployment (pack, save, reload, evaluate) with a JSON record beside the file.

Each step is a handful of library calls (``mixedprec.sbs``, ``mixedprec.opq``, ``mixedprec.pack``/
``save``/``load``); this module only times them and collects what they report. Given a ``Run``
(``mixedprec compress``), the training steps checkpoint every epoch and the compressed model is
kept before it is packed; a resumed run takes every finished stage from its checkpoint.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from mixedprec import checkpoint, distributed, opq, sbs
from mixedprec.cli.common import UsageError, say
from mixedprec.cli.inputs import Data
from mixedprec.cli.runs import Run
from mixedprec.metrics.latency import model_latency
from mixedprec.reporting import MethodResult, Reference, model_report, write_json
from mixedprec.training import evaluate, fit, make_loader, seed_everything

RECORD_FORMAT = "mixedprec.record/1"
LATENCY_BUDGET_S = 0.5  # per deployed model: timing adds little to a run


@dataclass
class Compressed:
    """A finetuned compressed model (fake-quant layers), before packing."""
    method: str
    model: nn.Module
    seconds: float
    details: dict = field(default_factory=dict)


def eval_loader(data: Data, batch_size: int = 256) -> DataLoader:
    return make_loader(data.test, batch_size, shuffle=False)


def train_float(model: nn.Module, data: Data, *, epochs: int, lr: float, batch_size: int, seed: int,
                device: torch.device, quiet: bool, run: Run | None = None) -> nn.Module:
    seed_everything(seed)
    return fit(model, data.train, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
               checkpoint=_checkpoint(run, "float"), phase="float training", quiet=quiet)


def compress_sbs(model: nn.Module, data: Data, *, policy: sbs.SBSPolicy, search_epochs: int, finetune_epochs: int,
                 bops_weight: float, lr: float, batch_size: int, seed: int, device: torch.device, quiet: bool,
                 method: str = "SBS", run: Run | None = None) -> Compressed:
    """convert, search (skipped when every layer has one candidate), finetune, export."""
    start = time.perf_counter()
    model = sbs.convert(copy.deepcopy(model), policy).to(device)
    history = _kept(run, model, quiet)
    if history is None:
        searched = len(policy.weight_bits) > 1 or len(policy.act_bits) > 1 or policy.prune
        history = []
        if searched and search_epochs > 0:
            history += sbs.search(model, data.train, epochs=search_epochs, bops_weight=bops_weight, lr=lr,
                                  batch_size=batch_size, seed=seed, device=device,
                                  checkpoint=_checkpoint(run, "search"), quiet=quiet)
        history += sbs.finetune(model, data.train, epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=seed,
                                device=device, checkpoint=_checkpoint(run, "finetune"), quiet=quiet)
        _keep(run, model, history, quiet)
    exported = sbs.export(model)
    layers = {name: report.to_dict() for name, report in exported.layers.items()}
    return Compressed(method, exported.model, time.perf_counter() - start,
                      {"policy": policy.to_dict(), "bops_weight": bops_weight, "layers": layers, "history": history})


def compress_opq(model: nn.Module, data: Data, *, rate: float, cost: str, levels: str, finetune_epochs: int,
                 lr: float, batch_size: int, seed: int, device: torch.device, quiet: bool,
                 rate_option: str = "--rate", run: Run | None = None,
                 bits: Sequence[int] = opq.BIT_CHOICES) -> Compressed:
    """allocate (analytically, from the weights), convert, finetune with masks and codebooks frozen."""
    start = time.perf_counter()
    try:
        plan = opq.allocate(model, rate, bits=bits, cost=cost, levels=levels, quiet=quiet)
    except ValueError as exc:  # e.g. a rate beyond what the layers' fixed overheads allow
        raise UsageError(f"{rate_option} {rate:g}: {exc}") from None
    compressed = opq.convert(model, plan).to(device)
    if _kept(run, compressed, quiet) is None:
        opq.finetune(compressed, data.train, epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=seed,
                     device=device, checkpoint=_checkpoint(run, "finetune"), quiet=quiet)
        _keep(run, compressed, [], quiet)
    return Compressed("OPQ", compressed, time.perf_counter() - start,
                      {"plan": plan.to_dict(), "plan_real_rate": plan.real_rate, "plan_paper_rate": plan.paper_rate})


def _checkpoint(run: Run | None, stage: str) -> Path | None:
    return None if run is None else run.path(stage)


def _kept(run: Run | None, model: nn.Module, quiet: bool) -> list | None:
    """The training history of the compressed model kept by an earlier attempt of this run (its
    state loaded into ``model``), or None when it must be trained."""
    path = _checkpoint(run, "compressed")
    if path is None or not path.is_file():
        return None
    history = checkpoint.load_model(path, model)["history"]
    say(quiet, f"the finetuned model comes from {path}: no training")
    return history


def _keep(run: Run | None, model: nn.Module, history: list, quiet: bool) -> None:
    """Keeps the finetuned, unpacked model before anything is packed (rank 0 under torchrun)."""
    path = _checkpoint(run, "compressed")
    if path is not None and distributed.is_main():
        checkpoint.save_model(path, model, {"history": history})
        say(quiet, f"finetuned model kept in {path}")


def check_opq_rate(model: nn.Module, rate: float, *, cost: str, levels: str, option: str,
                   bits: Sequence[int] = opq.BIT_CHOICES) -> None:
    """Whether ``rate`` is reachable depends on the layer shapes only: checked on an untrained
    model, before any training time is spent."""
    try:
        opq.allocate(model, rate, bits=bits, cost=cost, levels=levels, quiet=True)
    except ValueError as exc:
        raise UsageError(f"{option} {rate:g}: {exc}") from None


def deploy(compressed: Compressed, path: Path, data: Data, *, device: torch.device, reference: Reference | None,
           record: dict, pack: bool = True, factory: str | None = None, factory_kwargs: dict | None = None,
           skeleton: nn.Module | None = None) -> MethodResult:
    """pack -> save -> load -> evaluate -> time at batch 1; writes ``<path>.json`` beside the
    model file. ``factory`` (with its kwargs) is recorded in the file; ``skeleton`` is a freshly
    built float model to load the file into (needed when the model is not made of torch.nn and mixedprec modules only)."""
    import mixedprec

    start = time.perf_counter()
    loader = eval_loader(data)
    before = evaluate(compressed.model, loader, device) if pack else None
    deployed = mixedprec.pack(compressed.model) if pack else compressed.model
    mixedprec.save(deployed, path, factory=factory, factory_kwargs=factory_kwargs)
    reloaded = mixedprec.load(path, model=skeleton, map_location=device)
    top1 = evaluate(reloaded, loader, device)
    report = model_report(reloaded, data.input_shape, reference)
    seconds = compressed.seconds + time.perf_counter() - start
    latency_ms = model_latency(reloaded, data.input_shape, budget_s=LATENCY_BUDGET_S).median_ms
    result = MethodResult(compressed.method, top1, report.bops, report.packed_bytes, path.stat().st_size, seconds,
                          before, str(path), report, compressed.details, latency_ms)
    write_json(record_path(path), {"format": RECORD_FORMAT, **record, "method": compressed.method,
                                   "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                                   "top1": top1, "top1_before_packing": before, "file_bytes": result.file_bytes,
                                   "latency_ms_batch1": latency_ms,
                                   "reference": None if reference is None else reference.__dict__,
                                   "report": report.to_dict(), "details": compressed.details})
    return result


def record_path(model_path: Path) -> Path:
    """The JSON record written beside a model file: model.safetensors -> model.json."""
    return model_path.with_suffix(".json")
