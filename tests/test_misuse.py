"""Misuse of the public API, as one table: each row a call, the exception it must raise and a
pattern its message must match, naming the problem (the argument, the layer, the file).

Areas: ops, layers, convert, allocate, pack/save/load, CLI (in process; tests/test_cli.py drives
33 more bad command lines in subprocesses), and the C++ kernel ops' own checks (TORCH_CHECK),
which run in a subprocess so that a crash there fails only those rows and says which call died.
Every row is a small tensor or file: a row that hung would be a bug, not a slow case. Failed
saves must leave the previous file untouched and no partial one (test_failed_save_*).

Run as a script, this file makes the kernel-op calls of KERNEL_ROWS and prints their outcomes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import mixedprec
from mixedprec import _extension, formats, opq, ops, sbs
from mixedprec.cli import main as cli_main
from mixedprec.formats import PackedWeight, pack_weight
from mixedprec.metrics import count_bops
from mixedprec.nn import PackedConv2d, PackedLinear

ROOT = Path(__file__).resolve().parents[1]


class Row(NamedTuple):
    call: Callable  # of the Workspace (table rows) or of nothing (kernel rows)
    error: type[BaseException]
    match: str      # re.search'ed in the message
    needs: str | None = None  # a compiled backend the row runs on


def packed(shape=(4, 6), bits=3, sparse=False, seed=0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.3 if sparse else None
    return pack_weight(torch.randint(0, 1 << bits, shape, generator=g), torch.linspace(-1, 1, 1 << bits),
                       torch.rand(shape[0], generator=g) + 0.5, bits, mask)


class Custom(nn.Module):  # a class from neither torch.nn nor mixedprec: no file may name it
    pass


def mlp(hidden: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class CommandFailed(Exception):
    """A command line that exited non-zero; the message is 'exit N: <stderr>'."""


def cli(*argv: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli_main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    if code:
        raise CommandFailed(f"exit {code}: {err.getvalue().strip()}")


@dataclass
class Workspace:
    dir: Path
    linear: PackedWeight
    conv: PackedWeight
    plan: opq.Plan
    saved: Path  # a valid packed model: PackedConv2d, ReLU, Flatten, PackedLinear
    files: dict[str, Path]  # broken variants of it, of a plan, of an SBS configuration


def _broken_files(folder: Path, saved: Path, plan: opq.Plan) -> dict[str, Path]:
    from safetensors.torch import save_file

    files = {name: folder / f"{name}.safetensors" for name in
             ("truncated", "empty", "flipped", "newer", "foreign", "inconsistent_conv", "foreign_class")}
    data = saved.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    flipped = bytearray(data)
    flipped[8 + int.from_bytes(data[:8], "little") + 1] ^= 0xFF  # a byte of the first tensor's data
    files["flipped"].write_bytes(bytes(flipped))
    tensors, content = formats.load_file(saved)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(formats.files, "FORMAT_VERSION", formats.FORMAT_VERSION + 1)
        formats.save_file(files["newer"], tensors, content)
    save_file({"weight": torch.zeros(2)}, str(files["foreign"]))
    short_codes = dict(tensors, **{"0.codes": tensors["0.codes"][:-1]})  # checksums recomputed: only the layer is wrong
    formats.save_file(files["inconsistent_conv"], short_codes, content)
    tree = json.loads(json.dumps(content))
    tree["tree"]["children"]["1"]["class"] = "os.system"
    formats.save_file(files["foreign_class"], tensors, tree)

    plan_dict = plan.to_dict()
    files["plan_newer"] = folder / "plan_newer.json"
    files["plan_newer"].write_text(json.dumps({**plan_dict, "version": 99}))
    files["plan_malformed"] = folder / "plan_malformed.json"
    files["plan_malformed"].write_text(json.dumps({**plan_dict, "layers": [{"name": "0"}]}))
    files["config_truncated"] = folder / "config.json"
    files["config_truncated"].write_text('{"format": "mixedprec.sbs.config", "layers": {')
    return files


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    folder = tmp_path_factory.mktemp("misuse")
    linear, conv = packed((10, 32), 3, sparse=True), packed((2, 3, 3, 3), 2, sparse=True, seed=1)
    model = nn.Sequential(PackedConv2d(conv, padding=1), nn.ReLU(), nn.Flatten(), PackedLinear(linear))
    saved = folder / "model.safetensors"
    mixedprec.save(model, saved)
    plan = opq.allocate(mlp(), 8, quiet=True)
    return Workspace(folder, linear, conv, plan, saved, _broken_files(folder, saved, plan))


X4 = torch.randn(1, 3, 4, 4)
CLIP, THRESHOLDS, BOOLS = torch.tensor(1.0), torch.zeros(2), torch.ones(3, 4, dtype=torch.bool)


def nan_layer(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


def sbs_linear_with_clip(value: float) -> sbs.SBSLinear:
    layer = sbs.SBSLinear(3, 4)
    with torch.no_grad():
        layer.w_quant.clip.fill_(value)
    return layer


ROWS: dict[str, Row] = {
    # ------------------------------------------------------------------ ops
    "ops: bit_sharing_quant, x of an integer dtype": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3, dtype=torch.int32), CLIP, THRESHOLDS), ValueError,
        r"x must be a floating-point tensor, got torch.int32"),
    "ops: bit_sharing_quant, x not a tensor": Row(
        lambda w: ops.bit_sharing_quant([1.0, 2.0], CLIP, THRESHOLDS), ValueError, r"x must be a torch.Tensor, got list"),
    "ops: bit_sharing_quant, NaN clip": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), torch.tensor(float("nan")), THRESHOLDS), ValueError,
        r"clip must be finite and > 0 .*got nan"),
    "ops: bit_sharing_quant, negative clip": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), torch.tensor(-1.0), THRESHOLDS), ValueError,
        r"clip must be finite and > 0 .*got -1.0"),
    "ops: bit_sharing_quant, clip of rank 1": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), torch.ones(2), THRESHOLDS), ValueError,
        r"clip must be a 0-dim tensor, got shape \(2,\)"),
    "ops: bit_sharing_quant, bits out of range": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), CLIP, THRESHOLDS, bits=(0, 4, 8)), ValueError,
        r"every entry of bits must be an int in 1\.\.16, got \(0, 4, 8\)"),
    "ops: bit_sharing_quant, bits descending": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), CLIP, THRESHOLDS, bits=(8, 4, 2)), ValueError,
        r"bits must be strictly ascending"),
    "ops: bit_sharing_quant, thresholds of the wrong shape": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), CLIP, torch.zeros(3)), ValueError,
        r"thresholds must have shape \(2,\) for bits=\(2, 4, 8\), got \(3,\)"),
    "ops: bit_sharing_quant, NaN threshold": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), CLIP, torch.tensor([float("nan"), 0.0])), ValueError,
        r"thresholds must be finite"),
    "ops: bit_sharing_quant, signed not a bool": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), CLIP, THRESHOLDS, signed="yes"), ValueError,
        r"signed must be a bool, got 'yes'"),
    "ops: bit_sharing_quant, unknown backend": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), CLIP, THRESHOLDS, backend="tpu"), ValueError,
        r"backend must be one of .* got 'tpu'"),
    "ops: bit_sharing_quant, CUDA backend for a CPU tensor": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3), CLIP, THRESHOLDS, backend="cuda"), RuntimeError,
        r"backend 'cuda' runs on CUDA tensors, got a tensor on cpu"),
    "ops: bit_sharing_quant, CPU backend for a meta tensor": Row(
        lambda w: ops.bit_sharing_quant(*(t.to("meta") for t in (torch.ones(3), CLIP, THRESHOLDS)), backend="cpu"),
        RuntimeError, r"backend 'cpu' runs on CPU tensors, got a tensor on meta"),
    "ops: bit_sharing_quant, float64 on a kernel backend": Row(
        lambda w: ops.bit_sharing_quant(torch.ones(3, dtype=torch.float64), CLIP, THRESHOLDS, backend="cpu"),
        ValueError, r"supports x of dtype float32, float16 or bfloat16, got torch.float64; use backend='reference'",
        needs="cpu"),
    "ops: codebook_quant, 257 levels": Row(
        lambda w: ops.codebook_quant(torch.randn(3, 4), torch.linspace(0, 1, 257), torch.ones(3), BOOLS), ValueError,
        r"codebook must be 1-D with 1 to 256 levels, got shape \(257,\)"),
    "ops: codebook_quant, codebook not ascending": Row(
        lambda w: ops.codebook_quant(torch.randn(3, 4), torch.tensor([1.0, 0.0]), torch.ones(3), BOOLS), ValueError,
        r"codebook must be strictly ascending, but codebook\[0\] = 1.0"),
    "ops: codebook_quant, NaN level": Row(
        lambda w: ops.codebook_quant(torch.randn(3, 4), torch.tensor([0.0, float("nan")]), torch.ones(3), BOOLS),
        ValueError, r"codebook must be finite"),
    "ops: codebook_quant, zero channel scale": Row(
        lambda w: ops.codebook_quant(torch.randn(3, 4), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0]), BOOLS),
        ValueError, r"channel_scale must be finite and > 0, but channel_scale\[1\] = 0.0"),
    "ops: codebook_quant, float keep_mask": Row(
        lambda w: ops.codebook_quant(torch.randn(3, 4), torch.tensor([0.0, 1.0]), torch.ones(3), torch.ones(3, 4)),
        ValueError, r"keep_mask must be a bool tensor, got torch.float32"),
    "ops: codebook_quant, weight of rank 0": Row(
        lambda w: ops.codebook_quant(torch.tensor(1.0), torch.tensor([0.0, 1.0]), torch.ones(1), torch.tensor(True)),
        ValueError, r"weight must have an output-channel dim 0"),
    "ops: lowbit_linear, x of the wrong width": Row(
        lambda w: ops.lowbit_linear(torch.randn(5, 31), w.linear), ValueError,
        r"x must have last dim 32 \(the weight's in features\), got shape \(5, 31\)"),
    "ops: lowbit_linear, a conv weight": Row(
        lambda w: ops.lowbit_linear(torch.randn(5, 27), w.conv), ValueError, r"packed must hold a 2-D \(out, in\) weight"),
    "ops: lowbit_linear, a tensor for the packed weight": Row(
        lambda w: ops.lowbit_linear(torch.randn(5, 32), torch.randn(10, 32)), ValueError,
        r"packed must be a mixedprec.formats.PackedWeight, got Tensor"),
    "ops: lowbit_linear, bias of the wrong shape": Row(
        lambda w: ops.lowbit_linear(torch.randn(5, 32), w.linear, torch.zeros(9)), ValueError,
        r"bias must have shape \(10,\), got \(9,\)"),
    "ops: lowbit_linear, x on meta, weight on cpu": Row(
        lambda w: ops.lowbit_linear(torch.randn(5, 32, device="meta"), w.linear), ValueError,
        r"packed is on cpu but x is on meta"),
    "ops: lut_conv2d, stride 0": Row(
        lambda w: ops.lut_conv2d(X4, w.conv, stride=0), ValueError, r"stride must be an int >= 1 or a pair of them, got 0"),
    "ops: lut_conv2d, negative padding": Row(
        lambda w: ops.lut_conv2d(X4, w.conv, padding=(1, -1)), ValueError,
        r"padding must be an int >= 0 or a pair of them, got \(1, -1\)"),
    "ops: lut_conv2d, fractional dilation": Row(
        lambda w: ops.lut_conv2d(X4, w.conv, dilation=1.5), ValueError, r"dilation must be an int >= 1"),
    "ops: lut_conv2d, groups not dividing C_out": Row(
        lambda w: ops.lut_conv2d(torch.randn(1, 9, 4, 4), w.conv, groups=3), ValueError,
        r"groups must be an int >= 1 dividing C_out = 2, got 3"),
    "ops: lut_conv2d, x of rank 3": Row(
        lambda w: ops.lut_conv2d(torch.randn(3, 4, 4), w.conv), ValueError, r"x must be 4-D \(N, C_in, H, W\)"),
    "ops: lut_conv2d, x with other channels": Row(
        lambda w: ops.lut_conv2d(torch.randn(1, 4, 4, 4), w.conv), ValueError, r"x has 4 channels .* expects 3"),
    "ops: lut_conv2d, kernel larger than the padded input": Row(
        lambda w: ops.lut_conv2d(torch.randn(1, 3, 2, 2), w.conv), ValueError, r"the output would be empty"),
    # ------------------------------------------------------------------ pack (the packed format)
    "pack: 9-bit codes": Row(
        lambda w: pack_weight(torch.zeros(2, 2, dtype=torch.long), torch.zeros(512), torch.ones(2), 9), ValueError,
        r"bits must be an int in 1\.\.8, got 9"),
    "pack: a code beyond the codebook": Row(
        lambda w: pack_weight(torch.tensor([[0, 8]]), torch.zeros(8), torch.ones(1), 3), ValueError,
        r"codes must lie in \[0, 8\) for bits=3, got \[0, 8\]"),
    "pack: codebook of the wrong size": Row(
        lambda w: pack_weight(torch.zeros(2, 2, dtype=torch.long), torch.zeros(7), torch.ones(2), 3), ValueError,
        r"codebook must have shape \(8,\) for bits=3, got \(7,\)"),
    "pack: NaN channel scale": Row(
        lambda w: pack_weight(torch.zeros(2, 2, dtype=torch.long), torch.zeros(8), torch.tensor([1.0, float("nan")]), 3),
        ValueError, r"channel_scale must be finite and > 0, but channel_scale\[1\] = nan"),
    "pack: infinite level": Row(
        lambda w: pack_weight(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0.0, 1e6]), torch.ones(2), 1),
        ValueError, r"codebook must be finite, but codebook\[1\] = inf"),
    "pack: SBS layer not exported": Row(
        lambda w: mixedprec.pack(sbs.convert(mlp())), ValueError, r"SBS layer '0' is not exported; run mixedprec.sbs.export"),
    "pack: not a module": Row(lambda w: mixedprec.pack(3), ValueError, r"pack: model must be an nn.Module, got int"),
    # ------------------------------------------------------------------ layers
    "layers: PackedLinear of a conv weight": Row(
        lambda w: PackedLinear(w.conv), ValueError, r"PackedLinear: packed must be a 2-D PackedWeight"),
    "layers: PackedLinear, bias of the wrong shape": Row(
        lambda w: PackedLinear(w.linear, torch.zeros(3)), ValueError, r"bias must have shape \(10,\), got \(3,\)"),
    "layers: PackedConv2d with stride 0": Row(
        lambda w: PackedConv2d(w.conv, stride=0), ValueError, r"PackedConv2d: stride must be an int >= 1"),
    "layers: PackedConv2d with groups not dividing C_out": Row(
        lambda w: PackedConv2d(w.conv, groups=4), ValueError, r"PackedConv2d: groups must be an int >= 1 dividing C_out = 2"),
    "layers: PackedConv2d.from_float of another shape": Row(
        lambda w: PackedConv2d.from_float(nn.Conv2d(3, 4, 3), w.conv), ValueError,
        r"packed has shape \(2, 3, 3, 3\) but conv's weight is \(4, 3, 3, 3\)"),
    "layers: SBSConv2d, bits that do not nest": Row(
        lambda w: sbs.SBSConv2d(3, 4, 3, weight_bits=(3, 4)), ValueError, r"bits must be strictly ascending with each "),
    "layers: SBSLinear, 16-bit weights": Row(
        lambda w: sbs.SBSLinear(3, 4, weight_bits=(16,)), ValueError, r"bits must hold bitwidths in 1\.\.8, got \(16,\)"),
    "layers: SBSLinear, NaN clip at construction": Row(
        lambda w: sbs.SBSLinear(3, 4, weight_clip_init=float("nan")), ValueError, r"clip_init must be > 0 or None, got nan"),
    "layers: SBSLinear whose clip became NaN": Row(
        lambda w: sbs_linear_with_clip(float("nan"))(torch.randn(2, 3)), ValueError, r"clip must be finite and > 0 .*got nan"),
    "layers: SBSLinear on integer input": Row(
        lambda w: sbs.SBSLinear(3, 4)(torch.ones(2, 3, dtype=torch.long)), ValueError,
        r"x must be a floating-point tensor, got torch.int64"),
    "layers: OPQLinear, 9 bits": Row(
        lambda w: opq.OPQLinear(3, 4, bits=9), ValueError, r"OPQLinear: bits must be an int in 1\.\.8, got 9"),
    "layers: OPQConv2d, float64 scales": Row(
        lambda w: opq.OPQConv2d(3, 4, 3, bits=2, scale_dtype=torch.float64), ValueError,
        r"scale_dtype must be torch.float16 or torch.float32, got torch.float64"),
    # ------------------------------------------------------------------ convert
    "convert: sbs.convert of a tensor": Row(
        lambda w: sbs.convert(torch.randn(3)), ValueError, r"convert: model must be an nn.Module, got Tensor"),
    "convert: sbs.convert of a bare Linear": Row(
        lambda w: sbs.convert(nn.Linear(3, 4)), ValueError, r"model is itself a Conv2d/Linear; wrap it"),
    "convert: sbs.convert with a dict for the policy": Row(
        lambda w: sbs.convert(mlp(), policy={"prune": False}), ValueError, r"policy must be an SBSPolicy or None, got dict"),
    "convert: SBSPolicy, group size 0": Row(
        lambda w: sbs.SBSPolicy(group_size=0), ValueError, r"group_size must be an int >= 1, got 0"),
    "convert: sbs exclude naming no module": Row(
        lambda w: sbs.convert(mlp(), sbs.SBSPolicy(exclude=("head",))), ValueError,
        r"policy.exclude names modules the model does not have: \['head'\]"),
    "convert: opq.convert with a dict for the plan": Row(
        lambda w: opq.convert(mlp(), {"layers": []}), ValueError, r"plan must be a mixedprec.opq.Plan .* got dict"),
    "convert: opq.convert of a model the plan does not fit": Row(
        lambda w: opq.convert(mlp(hidden=32), w.plan), ValueError,
        r"plan layer '0' is a \[64, 64\] Conv2d/Linear weight, the model has Linear with weight \[32, 64\]"),
    # ------------------------------------------------------------------ allocate
    "allocate: a tensor for the model": Row(
        lambda w: opq.allocate(torch.randn(3), 4), ValueError, r"allocate: model must be an nn.Module, got Tensor"),
    "allocate: rate 1": Row(
        lambda w: opq.allocate(mlp(), 1.0, quiet=True), ValueError, r"target_rate must be a finite number > 1, got 1.0"),
    "allocate: NaN rate": Row(
        lambda w: opq.allocate(mlp(), float("nan"), quiet=True), ValueError, r"target_rate must be a finite number > 1, got nan"),
    "allocate: 9-bit candidates": Row(
        lambda w: opq.allocate(mlp(), 4, bits=[4, 9], quiet=True), ValueError, r"bits must be a non-empty set of ints in 1\.\.8"),
    "allocate: NaN weight": Row(
        lambda w: opq.allocate(nan_layer(mlp()), 4, quiet=True), ValueError, r"layer '0' has non-finite weights"),
    "allocate: weights on the meta device": Row(
        lambda w: opq.allocate(mlp().to("meta"), 4, quiet=True), ValueError, r"layer '0' has no weight values \(meta device\)"),
    "allocate: a rate out of reach": Row(
        lambda w: opq.allocate(mlp(), 5000, quiet=True), ValueError, r"target_rate 5000 is out of reach"),
    "allocate: unknown cost": Row(
        lambda w: opq.allocate(mlp(), 4, cost="bytes", quiet=True), ValueError, r"cost must be one of .* got 'bytes'"),
    # ------------------------------------------------------------------ save / load
    "files: save of a non-module": Row(
        lambda w: mixedprec.save(3, w.dir / "x.safetensors"), ValueError, r"save: model must be an nn.Module, got int"),
    "files: load of a model of other classes without a freshly built one": Row(
        lambda w: (mixedprec.save(nn.Sequential(Custom()), w.dir / "x.safetensors"),
                   mixedprec.load(w.dir / "x.safetensors")), ValueError,
        r"x\.safetensors: the saved model is a torch.nn.modules.container.Sequential whose architecture comes from "
        r"code: pass a freshly built one, mixedprec.load\(path, model=...\)"),
    "files: load into a model of another width": Row(
        lambda w: (mixedprec.save(nn.Sequential(Custom(), nn.Linear(3, 4)), w.dir / "y.safetensors"),
                   mixedprec.load(w.dir / "y.safetensors", model=nn.Sequential(Custom(), nn.Linear(3, 5)))),
        ValueError, r"does not fit the model .*1\.weight \(4, 3\) in the file, \(5, 3\) in the model"),
    "files: token ids given as a bare shape": Row(
        lambda w: count_bops(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), (7,)), ValueError,
        r"output_positions: the model does not run on example inputs .*token ids"),
    "files: load of a missing file": Row(
        lambda w: mixedprec.load(w.dir / "absent.safetensors"), FileNotFoundError, r"absent\.safetensors"),
    "files: load of a truncated file": Row(
        lambda w: mixedprec.load(w.files["truncated"]), ValueError, r"truncated\.safetensors: not a readable safetensors file"),
    "files: load of an empty file": Row(
        lambda w: mixedprec.load(w.files["empty"]), ValueError, r"empty\.safetensors: not a readable safetensors file"),
    "files: load of a file with a flipped data byte": Row(
        lambda w: mixedprec.load(w.files["flipped"]), ValueError, r"tensor '.*' is corrupted \(CRC32 mismatch\)"),
    "files: load of a file from a newer format version": Row(
        lambda w: mixedprec.load(w.files["newer"]), ValueError,
        fr"written by packed format version {formats.FORMAT_VERSION + 1}, this mixedprec reads versions up to "
        fr"{formats.FORMAT_VERSION}; upgrade mixedprec"),
    "files: load of a safetensors file from elsewhere": Row(
        lambda w: mixedprec.load(w.files["foreign"]), ValueError, r"not a mixedprec packed model"),
    "files: load of a conv layer with too few codes": Row(
        lambda w: mixedprec.load(w.files["inconsistent_conv"]), ValueError,
        r"layer '0' is inconsistent: PackedWeight: codes must be uint8 of shape"),
    "files: load of a file naming a foreign class": Row(
        lambda w: mixedprec.load(w.files["foreign_class"]), ValueError, r"module '1': class os.system is not a torch.nn"),
    "pack: PackedWeight whose scales do not fit its shape": Row(
        lambda w: PackedWeight((3, 32), 3, w.linear.codebook, w.linear.channel_scale, w.linear.codes), ValueError,
        r"channel_scale must be float16 or float32 of shape \(3,\)"),
    "files: plan from a newer mixedprec": Row(
        lambda w: opq.Plan.load(w.files["plan_newer"]), ValueError, r"plan_newer\.json: Plan: unsupported plan version 99"),
    "files: plan with a malformed layer": Row(
        lambda w: opq.Plan.load(w.files["plan_malformed"]), ValueError, r"plan_malformed\.json: Plan: malformed plan"),
    "files: truncated SBS configuration": Row(
        lambda w: sbs.load_config(w.files["config_truncated"]), ValueError, r"config\.json is not a JSON file"),
    # ------------------------------------------------------------------ CLI (in process)
    "cli: report of a truncated model file": Row(
        lambda w: cli("report", w.files["truncated"], "--input-shape", "3,4,4"), CommandFailed,
        r"^exit 2: mixedprec report: error: .*truncated\.safetensors: not a readable safetensors file"),
    "cli: report of a file from a newer format version": Row(
        lambda w: cli("report", w.files["newer"], "--input-shape", "3,4,4"), CommandFailed,
        fr"^exit 2: mixedprec report: error: .*written by packed format version {formats.FORMAT_VERSION + 1}"),
    "cli: report of a file naming a foreign class": Row(
        lambda w: cli("report", w.files["foreign_class"], "--input-shape", "3,4,4"), CommandFailed,
        r"^exit 2: mixedprec report: error: .*class os.system is not a torch.nn or mixedprec module"),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_misuse_raises_an_error_naming_the_problem(name, ws):
    row = ROWS[name]
    if row.needs and row.needs not in ops.available_backends("cpu"):
        pytest.skip(_extension.missing_reason(row.needs, torch.device("cpu")))
    with pytest.raises(row.error) as raised:
        row.call(ws)
    assert re.search(row.match, str(raised.value)), f"{str(raised.value)!r} does not match {row.match!r}"


def test_meta_tensors_are_not_misuse_they_give_shapes():
    """Meta tensors hold no values: the ops skip their value checks and the reference gives shapes."""
    x = torch.ones(3, 4, device="meta")
    result = ops.bit_sharing_quant(x, CLIP.to("meta"), THRESHOLDS.to("meta"))
    y = ops.codebook_quant(x, torch.tensor([0.0, 1.0], device="meta"), torch.ones(3, device="meta"), BOOLS.to("meta"))
    assert result.output.is_meta and result.output.shape == x.shape and y.is_meta and y.shape == x.shape


# ---------------------------------------------------------------------------------------------
# the kernel ops' own checks (C++), called directly: each bad call must raise, not crash

_LOWBIT = packed((4, 40), 2, sparse=True)  # 160 weights: 3 blocks of code_offsets


def _lowbit_args(offset_step: int | None = None, codes_short: bool = False, bitmap_alone: bool = False):
    p = _LOWBIT
    offsets = p.code_offsets.clone()
    if offset_step is not None:
        offsets[1] = offset_step  # block 0 claims offset_step kept weights
    codes = p.codes[:-1] if codes_short else p.codes
    return (torch.randn(3, 40), codes, p.codebook.float(), p.channel_scale.float(), p.keep_bitmap,
            None if bitmap_alone else offsets, [4, 40], 2)


def _padding_bit_args():
    """A (3, 7) weight (21 bitmap bits in 3 bytes) whose bitmap also sets bit 23."""
    p = packed((3, 7), 4, sparse=True, seed=3)
    bitmap = p.keep_bitmap.clone()
    bitmap[-1] |= 0x80
    kept = p.kept + 1  # as many codes as the set bits would take
    codes = torch.zeros(-(-kept * 4 // 8), dtype=torch.uint8)
    return (torch.randn(2, 7), codes, p.codebook.float(), p.channel_scale.float(), bitmap, p.code_offsets, [3, 7], 4)


def _lut_conv2d_args(codes_short: bool = False, stride=(1, 1)):
    p = packed((2, 3, 3, 3), 4, seed=2)
    codes = p.codes[:-1] if codes_short else p.codes
    return (X4, codes, p.codebook.float(), p.channel_scale.float(), None, None, [2, 3, 3, 3], 4, None, list(stride),
            [1, 1], [1, 1], 1)


def _mixedprec_op(name: str, namespace: str = "mixedprec"):
    return getattr(getattr(torch.ops, namespace), name)


KERNEL_ROWS: dict[str, Row] = {
    "lowbit_linear_fwd: a code offset step beyond 64": Row(
        lambda: _mixedprec_op("lowbit_linear_fwd")(*_lowbit_args(offset_step=100)), RuntimeError,
        rf"code_offsets must count keep_bitmap's kept weights before each block of 64, but block 1 starts at 100 "
        rf"where the bitmap keeps {int(_LOWBIT.code_offsets[1])}"),
    "mixedprec_simt lowbit_linear_fwd: a negative code offset step": Row(
        lambda: _mixedprec_op("lowbit_linear_fwd", "mixedprec_simt")(*_lowbit_args(offset_step=-50)), RuntimeError,
        r"block 1 starts at -50 where the bitmap keeps"),
    "lowbit_linear_fwd: a bitmap bit set past the weight's entries": Row(
        lambda: _mixedprec_op("lowbit_linear_fwd")(*_padding_bit_args()), RuntimeError,
        r"keep_bitmap's bits past the weight's 21 entries must be 0"),
    "lowbit_linear_bwd: one code byte short": Row(
        lambda: _mixedprec_op("lowbit_linear_bwd")(torch.randn(3, 4), *_lowbit_args(codes_short=True)[1:]), RuntimeError,
        rf"codes hold {_LOWBIT.codes.numel() - 1} bytes but {_LOWBIT.kept} kept 2-bit codes need {_LOWBIT.codes.numel()}"),
    "lowbit_linear_fwd: a bitmap without code offsets": Row(
        lambda: _mixedprec_op("lowbit_linear_fwd")(*_lowbit_args(bitmap_alone=True)), RuntimeError,
        r"keep_bitmap and code_offsets must be given together"),
    "lut_conv2d_fwd: one code byte short": Row(
        lambda: _mixedprec_op("lut_conv2d_fwd")(*_lut_conv2d_args(codes_short=True)), RuntimeError,
        r"codes hold 26 bytes but 54 kept 4-bit codes need 27"),
    "mixedprec_simt lut_conv2d_fwd: stride 0": Row(
        lambda: _mixedprec_op("lut_conv2d_fwd", "mixedprec_simt")(*_lut_conv2d_args(stride=(0, 1))), RuntimeError,
        r"stride must be two ints >= 1, got \[0, 1\]"),
    "bit_sharing_quant_fwd: a 0-bit candidate": Row(
        lambda: _mixedprec_op("bit_sharing_quant_fwd")(torch.ones(3), CLIP, torch.zeros(0), [0], True), RuntimeError,
        r"bits must lie in 1\.\.16, got \[0\]"),
    "bit_sharing_quant_bwd: grad_y of another shape": Row(
        lambda: _mixedprec_op("bit_sharing_quant_bwd")(torch.ones(4), torch.ones(3), CLIP, torch.zeros(0), [4], True),
        RuntimeError, r"grad_y must be a tensor of x's shape, layout and dtype"),
    "codebook_quant_fwd: 300 levels": Row(
        lambda: _mixedprec_op("codebook_quant_fwd")(torch.randn(3, 4), torch.linspace(0, 1, 300), torch.ones(3), BOOLS),
        RuntimeError, r"codebook must be 1-D with 1 to 256 levels, got shape \[300\]"),
}


def _report_kernel_rows() -> None:
    """Makes every kernel-row call, printing a line before it (a crash names the row) and its outcome."""
    for name, row in KERNEL_ROWS.items():
        print(json.dumps({"row": name, "started": True}), flush=True)
        try:
            row.call()
            outcome = {"row": name, "error": None, "message": "no error"}
        except Exception as exc:  # noqa: BLE001 - the parent checks the type
            outcome = {"row": name, "error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(outcome), flush=True)


@pytest.fixture(scope="module")
def kernel_outcomes() -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    if not (_extension.CPU_BUILT and _extension.SIMT_BUILT):
        pytest.skip(_extension.missing_reason("cpu", torch.device("cpu")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, {line["row"]: line for line in lines if "started" not in line}


@pytest.mark.parametrize("name", list(KERNEL_ROWS))
def test_kernel_op_misuse_raises_without_crashing(name, kernel_outcomes):
    result, outcomes = kernel_outcomes
    assert name in outcomes, (f"the process died (exit {result.returncode}) during or before this call:\n"
                              f"{result.stdout[-1500:]}\n{result.stderr[-1500:]}")
    row, outcome = KERNEL_ROWS[name], outcomes[name]
    assert outcome["error"] == row.error.__name__, outcome
    assert re.search(row.match, outcome["message"]), f"{outcome['message']!r} does not match {row.match!r}"


@pytest.mark.skipif(not _extension.CPU_BUILT, reason="needs the CPU kernels")
def test_sparse_index_checked_again_after_writes_and_for_new_tensors():
    """The glue checks a sparse index once per version of its (code_offsets, keep_bitmap) tensors
    (register/packed_weight.h): in-place writes to either, new data under ``.data``, and new
    tensors made after freeing checked ones are checked again. Every bad index here stays within
    the code stream, so a missed check would give wrong numbers, not a crash."""
    op = _mixedprec_op("lowbit_linear_fwd")
    args = list(_lowbit_args())
    args[4] = args[4].clone()
    offsets, bitmap = args[5], args[4]
    expected = op(*args)
    torch.testing.assert_close(op(*args), expected, rtol=0, atol=0)
    offsets[1] += 1
    with pytest.raises(RuntimeError, match="block 1 starts at"):
        op(*args)
    offsets[1] -= 1
    torch.testing.assert_close(op(*args), expected, rtol=0, atol=0)
    lowest = int(bitmap[0]) & -int(bitmap[0])  # a kept weight of block 0 pruned: block 1's offset is one too high
    bitmap[0] ^= lowest
    with pytest.raises(RuntimeError, match="block 1 starts at"):
        op(*args)
    bitmap[0] ^= lowest
    torch.testing.assert_close(op(*args), expected, rtol=0, atol=0)
    good, bad = offsets.tolist(), offsets.tolist()
    bad[1] += 1
    offsets.data = torch.tensor(bad)  # new data, same tensor and version
    with pytest.raises(RuntimeError, match="block 1 starts at"):
        op(*args)
    for _ in range(20):  # fresh tensors at version 0, their data often where the last one's was
        args[5] = torch.tensor(good)
        op(*args)
        args[5] = torch.tensor(bad)
        with pytest.raises(RuntimeError, match="block 1 starts at"):
            op(*args)


# ---------------------------------------------------------------------------------------------
# saves are atomic: a failing save leaves the previous file as it was, and no other file

def _save_model(path: Path, fail: bool) -> None:
    model = nn.Sequential(nn.Linear(2, 3))
    if fail:
        model[0].helper = object()  # no file format holds an arbitrary object
    mixedprec.save(model, path)


def _save_config(path: Path, fail: bool) -> None:
    sbs.save_config(sbs.convert(mlp()), path, **({"accuracy": torch.tensor(0.5)} if fail else {"accuracy": 0.5}))


def _save_plan(path: Path, fail: bool) -> None:
    plan = opq.allocate(mlp(), 8, quiet=True)
    if fail:
        plan.layers[0].codebook.append(object())  # not JSON
    plan.save(path)


SAVERS = {"mixedprec.save": _save_model, "sbs.save_config": _save_config, "opq.Plan.save": _save_plan}


@pytest.mark.parametrize("saver", list(SAVERS))
def test_failed_save_of_unwritable_content_leaves_the_old_file(saver, tmp_path):
    path = tmp_path / "target"
    SAVERS[saver](path, fail=False)
    before = path.read_bytes()
    with pytest.raises((TypeError, ValueError)):
        SAVERS[saver](path, fail=True)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["target"]


@pytest.mark.parametrize("saver", list(SAVERS))
def test_failed_save_mid_write_leaves_no_file(saver, tmp_path, monkeypatch):
    """The disk fails after the data went out (fsync): no target, no temporary file left behind."""
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        SAVERS[saver](tmp_path / "target", fail=False)
    assert list(tmp_path.iterdir()) == []


if __name__ == "__main__":
    _report_kernel_rows()
