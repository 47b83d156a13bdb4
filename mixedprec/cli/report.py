"""``mixedprec report FILE``: per-layer table and totals of a saved (compressed or packed) model,
and its batch-1 latency against the float model of its architecture."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixedprec.cli.common import UsageError, resolve_device
from mixedprec.cli.inputs import parse_model_args
from mixedprec.nn import factory
from mixedprec.cli.pipeline import RECORD_FORMAT, record_path
from mixedprec.metrics.latency import models_latency
from mixedprec.nn.float_twin import float_twin
from mixedprec.reporting import Reference, model_report

LATENCY_BUDGET_S = 1.0  # per model: the report stays quick whatever the model's size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path,
                        help="a model file written by mixedprec.save (e.g. by `mixedprec demo` or `mixedprec compress`)")
    parser.add_argument("--input-shape", default=None, metavar="C,H,W",
                        help="shape of one input example, for BOPs (default: from the JSON record written beside "
                             "the file, FILE with .json; required when there is none)")
    parser.add_argument("--model", default=None, metavar="SPEC",
                        help="build the model to load the file into: module:function or path/to/file.py:function "
                             "(for files of models of your own classes; default: rebuild it from the file)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the --model function, repeatable (VALUE a Python literal or a string)")
    parser.add_argument("--trust-code", action="store_true",
                        help="let the file's recorded model factory run when it is not mixedprec's or torchvision's "
                             "(it runs that code: only for files you trust)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model is loaded, and the shape-finding and timed forward passes run "
                             "(default: cpu)")
    parser.add_argument("--no-latency", action="store_true",
                        help=f"skip timing the model and its float counterpart at batch 1 (each is timed for at "
                             f"most about {LATENCY_BUDGET_S:g} s)")


def run(args: argparse.Namespace) -> dict:
    import mixedprec

    device = resolve_device(args.device)
    if not args.file.is_file():
        raise UsageError(f"{args.file}: file not found")
    given_shape = None if args.input_shape is None else _parse_shape(args.input_shape)
    skeleton = None
    if args.model is not None:
        try:
            skeleton = factory.build(factory.name_of(args.model), parse_model_args(args.model_arg))
        except ValueError as exc:
            raise UsageError(f"--model {exc}") from None
    try:  # a ValueError names what is wrong with the file, or why the model cannot be rebuilt from it
        model = mixedprec.load(args.file, model=skeleton, trust_code=args.trust_code, map_location=device)
    except factory.UntrustedFactory as exc:
        raise UsageError(f"{args.file}: the model is built by {exc.name!r}; pass --trust-code to let it run, or "
                         f"--model SPEC to build the model yourself") from None
    record = _record(args.file)
    input_shape = given_shape or _recorded_shape(record, args.file)
    reference = record.get("reference")
    report = model_report(model, input_shape, Reference(**reference) if reference else None)
    summary = {"file": str(args.file), "file_bytes": args.file.stat().st_size,
               **{k: record[k] for k in ("method", "model", "data", "top1") if k in record}, **report.to_dict()}
    if not args.no_latency:
        summary["latency"] = latency(model, input_shape, device)
    if args.json:
        print(json.dumps(summary, indent=1))
        return summary
    described = ", ".join(f"{k} {record[k]}" for k in ("method", "model", "data") if k in record)
    print(f"{args.file} ({summary['file_bytes']:,} bytes on disk{'; ' + described if described else ''})")
    print(report.table())
    if "latency" in summary:
        print(latency_line(summary["latency"]))
    if "top1" in record:
        print(f"top-1 {record['top1']:.2f}% when it was written (from {record_path(args.file)})")
    return summary


def latency(model, input_shape: tuple[int, ...], device) -> dict:
    """Batch-1 latency of ``model`` and of its float twin (``float_twin``: same architecture,
    plain conv/linear layers at the original widths, random weights), or why there is no twin."""
    try:
        models, missing = [model, float_twin(model)], None
    except ValueError as exc:
        models, missing = [model], str(exc)
    timed = models_latency(models, input_shape, repeats=100, budget_s=LATENCY_BUDGET_S)  # in alternation
    result = {"batch": 1, "device": str(device), "model_ms": timed[0].median_ms, "model_runs": timed[0].runs}
    if missing is not None:
        return {**result, "float_ms": None, "float_unavailable": missing}
    base = timed[1]
    return {**result, "float_ms": base.median_ms, "float_runs": base.runs, "speedup": base.median_ms / timed[0].median_ms}


def latency_line(timed: dict) -> str:
    model = f"latency at batch 1 on {timed['device']}: {timed['model_ms']:.3f} ms (median of {timed['model_runs']})"
    if timed["float_ms"] is None:
        return f"{model}; float model not timed: {timed['float_unavailable']}"
    return (f"{model}, float model {timed['float_ms']:.3f} ms (median of {timed['float_runs']}; same architecture, "
            f"plain conv/linear layers at the original widths): {timed['speedup']:.2f}x its speed")


def _record(path: Path) -> dict:
    sidecar = record_path(path)
    if not sidecar.is_file() or sidecar == path:
        return {}
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{sidecar}: the model's record is not readable JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise UsageError(f"{sidecar}: not a mixedprec record (format {record.get('format') if isinstance(record, dict) else None!r}, "
                         f"expected {RECORD_FORMAT!r}); move it away or pass --input-shape")
    return record


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input-shape {text!r}: expected positive ints like 3,32,32 (channels, height, width)")
    return shape


def _recorded_shape(record: dict, path: Path) -> tuple[int, ...]:
    if "input_shape" in record:
        return tuple(record["input_shape"])
    raise UsageError(f"{path}: no record {record_path(path)} beside it to give the input shape; pass --input-shape C,H,W")
