"""The ``mixedprec`` command line (also ``python -m mixedprec``).

    mixedprec demo                     the end-to-end run on the embedded digits data
    mixedprec compress sbs|opq ...     compress a zoo or user model on digits, CIFAR or an image folder
    mixedprec reproduce RECIPE ...     an SBS paper's CIFAR-100 experiment, next to the paper's row
    mixedprec report FILE              per-layer table and totals of a saved model
    mixedprec bench [NAME ...]         the kernel benchmark tables

User mistakes (missing files, bad model specs, absent data folders, bad values) print one line
``mixedprec <command>: error: ...`` and exit with status 2; failures of the program (a failed
benchmark, packing or saving that fails after training, naming the checkpoint kept) exit 1.
"""
from __future__ import annotations

import argparse
import sys

from mixedprec.cli.common import RunFailed, UsageError
from mixedprec.distributed import RankLostError

COMMANDS = {
    "demo": ("mixedprec.demo", "the end-to-end demo on the embedded digits data: float, uniform 4-bit, SBS and OPQ, "
                               "packed, saved, reloaded; table, JSON and plot"),
    "compress": ("mixedprec.cli.compress", "compress a model with SBS or OPQ, finetune, pack, save and evaluate it"),
    "reproduce": ("mixedprec.cli.reproduce", "run one of the SBS papers' CIFAR-100 experiments on a local copy and "
                                             "print the paper's row next to the measured one"),
    "report": ("mixedprec.cli.report", "per-layer bits, sparsity, BOPs, bytes and compression of a saved model file"),
    "bench": ("mixedprec.cli.bench", "run the kernel benchmarks in benchmarks/ and print their tables"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> Parser:
    import importlib

    parser = Parser(prog="mixedprec", description="Joint pruning + mixed-precision quantization (SBS, OPQ) with "
                                                  "packed low-bit models and fused kernels.",
                    epilog="`mixedprec COMMAND --help` explains each command's options.")
    from mixedprec import __version__

    parser.add_argument("--version", action="version", version=f"mixedprec {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if argv[:1] == ["bench"] and "--" in argv:  # everything after -- goes to the benchmark scripts
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    prog = " ".join(["mixedprec", args.command] + ([args.method] if getattr(args, "method", None) else []))
    try:
        result = args.func(args, script_args) if args.command == "bench" else args.func(args)
    except UsageError as exc:
        return _fail(prog, str(exc), 2)
    except RunFailed as exc:  # after training: the message names the checkpoint that holds the work
        return _fail(prog, str(exc), 1)
    except ValueError as exc:  # the library's argument checks and file validation
        return _fail(prog, str(exc), 2)
    except RankLostError as exc:  # a data-parallel run under torchrun lost one of its ranks
        return _fail(prog, str(exc), 1)
    except OSError as exc:
        return _fail(prog, f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    return result if isinstance(result, int) else 0


def _fail(prog: str, message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"{prog}: error: {first}", file=sys.stderr)
    return code
