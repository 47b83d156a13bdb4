"""What every subcommand shares: the user-error type, device/seed/quiet options, output folders."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


class RunFailed(Exception):
    """The program failed, not the user's input (e.g. packing or saving after training): printed
    as one line naming what was kept, exit status 1."""


def add_run_options(parser: argparse.ArgumentParser, *, out: str | None = None) -> None:
    """--device, --seed, --quiet (and --out when ``out`` gives its default)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where training and evaluation run (default: cpu); cuda needs a CUDA build of torch and a GPU")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split, initial weights and data order (default: 0); runs on CPU "
                             "with the same seed give the same numbers")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or step messages; print only the results and where they were written")
    if out is not None:
        parser.add_argument("--out", type=Path, default=Path(out),
                            help=f"folder for the models, tables, JSON and plots (default: {out}); created if missing")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return torch.device(name)


def make_out_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot create the folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--out {path}: the folder is not writable")
    return path


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def say(quiet: bool, message: str) -> None:
    """A step message (suppressed by --quiet)."""
    if not quiet:
        print(message, flush=True)
