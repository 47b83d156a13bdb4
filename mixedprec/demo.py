"""The end-to-end demo on scikit-learn's digits (embedded, no downloads): ``mixedprec demo``.

1. float baseline: digits_cnn trained from scratch;
2. uniform 4-bit: every layer at 4-bit weights and activations (first and last at 8), QAT;
3. SBS: bitwidths and filter-group pruning searched under the BOPs penalty, then finetuned;
4. OPQ: pruning and codebooks allocated from the float weights for a real-bytes rate, finetuned;
each compressed model packed (``mixedprec.pack``), saved, reloaded and evaluated from the file.
Writes ``results.txt`` (the comparison and every model's per-layer table), ``results.json``
(everything), ``tradeoff.png`` (accuracy vs BOPs and vs bytes on disk) and one ``.safetensors``
model with its ``.json`` record per method.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import mixedprec
from mixedprec import distributed, sbs
from mixedprec.cli import pipeline
from mixedprec.cli.common import (UsageError, add_run_options, make_out_dir, non_negative_float, non_negative_int,
                                  positive_float, positive_int, resolve_device, say)
from mixedprec.cli.inputs import load_data
from mixedprec.metrics import models_latency
from mixedprec.models import digits_cnn
from mixedprec.reporting import Reference, plot_tradeoff, results_table, write_json

DEMO_FORMAT = "mixedprec.demo/1"
STAGES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_options(parser, out="out/demo")
    g = parser.add_argument_group("training (defaults finish in a few minutes on 2 CPU cores)")
    g.add_argument("--width", type=positive_int, default=32,
                   help="channels of digits_cnn's first conv (the others are 2x and 4x; default: 32)")
    g.add_argument("--float-epochs", type=positive_int, default=20, help="float training epochs (default: 20)")
    g.add_argument("--search-epochs", type=non_negative_int, default=10,
                   help="SBS search epochs: bits and pruning learned under the BOPs penalty (default: 10)")
    g.add_argument("--finetune-epochs", type=non_negative_int, default=10,
                   help="finetuning epochs of every compressed model: SBS, OPQ and the uniform baseline (default: 10)")
    g.add_argument("--bops-weight", type=non_negative_float, default=0.1,
                   help="SBS: lambda in CE + lambda * log(BOPs); larger gives fewer BOPs (default: 0.1)")
    g.add_argument("--opq-rate", type=positive_float, default=20.0,
                   help="OPQ: target compression of the weights in real packed bytes (default: 20)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="training batch size (default: 64)")
    g.add_argument("--preset", choices=sbs.SBSPolicy.PRESET_NAMES, default=None,
                   help="SBS: the settings of a preset (docs/sbs.md) instead of the default policy")


def run(args: argparse.Namespace) -> dict:
    """Runs the demo; returns the JSON record it wrote."""
    if distributed.launched_by_torchrun():  # it writes files between its trainings: one process
        raise UsageError("the demo runs in a single process; under torchrun use `mixedprec compress`")
    device, out, quiet = resolve_device(args.device), make_out_dir(args.out), args.quiet
    start = time.perf_counter()
    data = load_data("digits", None, image_size=8, seed=args.seed)
    say(quiet, f"digits: {len(data.train)} training and {len(data.test)} test images of {data.input_shape}, "
               f"{data.num_classes} classes; writing to {out}/")
    common = dict(lr=0.01, batch_size=args.batch_size, seed=args.seed, device=device, quiet=quiet)
    record = {"model": f"digits_cnn(width={args.width})", "data": "digits"}

    say(quiet, f"[1/{STAGES}] float baseline: {args.float_epochs} epochs")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = digits_cnn(data.num_classes, width=args.width)
    pipeline.check_opq_rate(model, args.opq_rate, cost="packed", levels="lloyd", option="--opq-rate")
    model = pipeline.train_float(model, data, epochs=args.float_epochs, lr=0.05, batch_size=args.batch_size,
                                 seed=args.seed, device=device, quiet=quiet)
    float_result = pipeline.deploy(pipeline.Compressed("float", model, time.perf_counter() - t0), out / "float.safetensors",
                                   data, device=device, reference=None, record=record, pack=False)
    reference = Reference.of(float_result.report)

    say(quiet, f"[2/{STAGES}] uniform 4-bit baseline (W4A4, first/last layer 8-bit): {args.finetune_epochs} epochs of QAT")
    uniform = pipeline.compress_sbs(model, data, policy=sbs.SBSPolicy(weight_bits=(4,), act_bits=(4,), prune=False),
                                    search_epochs=0, finetune_epochs=args.finetune_epochs, bops_weight=0.0,
                                    method="uniform 4-bit", **common)
    uniform_result = pipeline.deploy(uniform, out / "uniform4.safetensors", data, device=device, reference=reference,
                                     record=record)

    say(quiet, f"[3/{STAGES}] SBS: {args.search_epochs} search epochs (lambda={args.bops_weight:g}), "
               f"{args.finetune_epochs} finetune epochs, export, pack")
    policy = sbs.SBSPolicy() if args.preset is None else sbs.SBSPolicy.preset(args.preset)
    searched = pipeline.compress_sbs(model, data, policy=policy, search_epochs=args.search_epochs,
                                     finetune_epochs=args.finetune_epochs, bops_weight=args.bops_weight, **common)
    sbs_result = pipeline.deploy(searched, out / "sbs.safetensors", data, device=device, reference=reference, record=record)

    say(quiet, f"[4/{STAGES}] OPQ: allocation for {args.opq_rate:g}x real bytes, {args.finetune_epochs} finetune "
               f"epochs, pack")
    allocated = pipeline.compress_opq(model, data, rate=args.opq_rate, cost="packed", levels="lloyd",
                                      finetune_epochs=args.finetune_epochs, rate_option="--opq-rate", **common)
    opq_result = pipeline.deploy(allocated, out / "opq.safetensors", data, device=device, reference=reference,
                                 record=record)

    results = [float_result, uniform_result, sbs_result, opq_result]
    time_in_alternation(results, data.input_shape, device)
    table = results_table(results, float_result)
    total = time.perf_counter() - start
    paths = {"table": out / "results.txt", "json": out / "results.json", "plot": out / "tradeoff.png"}
    write_text(paths["table"], table, results, total)
    plot_tradeoff(results, paths["plot"], title=f"digits_cnn (width {args.width}) on digits: float, uniform 4-bit, "
                                                f"SBS and OPQ (packed, reloaded)")
    demo_record = {"format": DEMO_FORMAT, "config": {k: v for k, v in vars(args).items() if k != "func"},
                   "environment": environment(device), "data": {"name": data.name, "train": len(data.train),
                                                                  "test": len(data.test),
                                                                  "input_shape": list(data.input_shape)},
                   "methods": [r.to_dict() for r in results], "table": table, "total_seconds": total}
    write_json(paths["json"], demo_record)
    print(table)
    print(f"total wall time {total:.1f} s")
    for what, path in paths.items():
        print(f"{what}: {path}")
    print(f"models: {', '.join(str(Path(r.path)) for r in results)} "
          f"(per-layer details: mixedprec report {sbs_result.path})")
    return demo_record


def time_in_alternation(results, input_shape, device: torch.device) -> None:
    """Each result's batch-1 latency, its file reloaded and timed in rounds with the others'
    (metrics.models_latency): timed one after another as each was deployed, the float model and
    the packed ones moved 1.6x between runs on a busy 2-core machine, and so did their ratios."""
    models = [mixedprec.load(r.path, map_location=device) for r in results]
    for result, timed in zip(results, models_latency(models, input_shape, repeats=100,
                                                     budget_s=pipeline.LATENCY_BUDGET_S)):
        result.latency_ms = timed.median_ms


def write_text(path: Path, table: str, results, total: float) -> None:
    parts = [f"mixedprec demo: digits_cnn on scikit-learn digits (wall time {total:.1f} s)", "", table, "",
             "top-1 %: the packed model saved, reloaded from its file and evaluated; 'before pack': the finetuned "
             "fake-quant model. BOPs per image; file bytes: the .safetensors file (everything: packed weights, biases, "
             "BatchNorm, module tree); weights real x: float32 weight bytes over packed bytes (codes, bitmaps, "
             "codebooks, scales, headers); paper x: 32 bits per weight over the bits of kept codes only."]
    for r in results:
        parts += ["", f"== {r.method}: {r.path}", r.report.table()]
    path.write_text("\n".join(parts) + "\n")


def environment(device: torch.device) -> dict:
    return {"mixedprec": mixedprec.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(), "device": str(device),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
