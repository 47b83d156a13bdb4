"""``mixedprec report FILE``: per-layer table and totals of a saved (compressed or packed) model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixedprec.cli.common import UsageError, resolve_device
from mixedprec.cli.inputs import parse_model_args
from mixedprec.nn import factory
from mixedprec.cli.pipeline import RECORD_FORMAT, record_path
from mixedprec.reporting import Reference, model_report


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
                        help="where the model is loaded and the shape-finding forward pass runs (default: cpu)")


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
    if args.json:
        print(json.dumps(summary, indent=1))
        return summary
    described = ", ".join(f"{k} {record[k]}" for k in ("method", "model", "data") if k in record)
    print(f"{args.file} ({summary['file_bytes']:,} bytes on disk{'; ' + described if described else ''})")
    print(report.table())
    if "top1" in record:
        print(f"top-1 {record['top1']:.2f}% when it was written (from {record_path(args.file)})")
    return summary


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
