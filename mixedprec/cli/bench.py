"""``mixedprec bench``: runs the kernel benchmark scripts (``benchmarks/bench_*.py``), each
printing its table. The scripts are discovered, not listed here."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from mixedprec.cli.common import UsageError

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "benchmarks"  # a source checkout's benchmarks/


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run, by script name with or without bench_ and .py "
                             "(e.g. bit_sharing); default: all of them, one after another")
    parser.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"folder searched for bench_*.py scripts (default: the checkout's benchmarks/, {DEFAULT_DIR})")
    parser.epilog = ("Arguments after -- go to every script run, e.g. `mixedprec bench bit_sharing -- --repeats 5`; "
                     "a script's own options: python benchmarks/bench_NAME.py --help")


def discover(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise UsageError(f"--dir {folder}: folder not found (the benchmarks live in a source checkout of mixedprec)")
    return {p.stem.removeprefix("bench_"): p for p in sorted(folder.glob("bench_*.py"))}


def run(args: argparse.Namespace, script_args: list[str] = ()) -> int:
    found = discover(args.dir)
    if not found:
        raise UsageError(f"--dir {args.dir}: no bench_*.py scripts there")
    if args.list:
        for name, path in found.items():
            print(f"{name:24s} {path}")
        return 0
    wanted = [n.removesuffix(".py").removeprefix("bench_") for n in args.names] or list(found)
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise UsageError(f"unknown benchmark {', '.join(map(repr, unknown))}; found: {', '.join(found)}")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # so the scripts import this mixedprec
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    failed = []
    for name in wanted:
        print(f"== {name}: {found[name]}", flush=True)
        code = subprocess.call([sys.executable, str(found[name]), *script_args], cwd=found[name].parent, env=env)
        if code != 0:
            failed.append(f"{name} (exit {code})")
        print(flush=True)
    if failed:
        print(f"mixedprec bench: error: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
