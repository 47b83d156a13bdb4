"""A ``mixedprec compress`` run's checkpoints, so that no trained work is lost.

``<out>/checkpoints/`` holds ``run.json`` (the options that define the run, and whether it
finished) and one file per stage: the float training (``float.pt``), each training loop's
per-epoch state (``search.pt``, ``finetune.pt``), and the finetuned, unpacked compressed model
(``compressed.pt``), written before anything is packed. ``--resume`` continues an unfinished run
from its last completed stage and epoch; a failure after training names what was kept.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mixedprec import distributed
from mixedprec.atomic import write_atomically
from mixedprec.cli.common import RunFailed, UsageError, say

# Options that do not change what a run computes: they may differ when it is resumed.
_FREE_OPTIONS = {"resume", "quiet", "device", "out", "func", "command"}


class Run:
    """The checkpoint folder of one run; checks a resumed run's options against the stored ones."""

    def __init__(self, out: Path, args: argparse.Namespace, *, quiet: bool):
        self.folder = out / "checkpoints"
        self.record = self.folder / "run.json"
        options = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
                   if k not in _FREE_OPTIONS}
        stored = self._stored()
        distributed.barrier()  # under torchrun every rank has read the folder before rank 0 changes it
        if stored is not None and args.resume:
            differ = sorted(k for k in set(options) | set(stored["options"])
                            if options.get(k) != stored["options"].get(k))
            if differ:
                raise UsageError(f"--resume: {self.folder} holds a run with other options ("
                                 + ", ".join(f"--{k.replace('_', '-')} {stored['options'].get(k)!r} there, "
                                             f"{options.get(k)!r} now" for k in differ[:3]) + ")")
            say(quiet, f"resuming the run in {self.folder}")
        elif stored is not None and not stored["completed"]:
            raise UsageError(f"--out {out}: {self.folder} holds an unfinished run; pass --resume to continue it, "
                             f"or choose another --out")
        elif distributed.is_main():  # a new run (replacing a finished one, whose checkpoints would not fit it)
            if args.resume:
                say(quiet, f"--resume: no run in {self.folder} to resume; starting one")
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            self._write(options, completed=False)
        distributed.barrier()  # and every rank sees the folder rank 0 prepared
        self.options = options

    def _stored(self) -> dict | None:
        if not self.record.is_file():
            return None
        try:
            stored = json.loads(self.record.read_text())
            return {"options": dict(stored["options"]), "completed": bool(stored["completed"])}
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{self.record}: not a readable run record; remove {self.folder} or choose "
                             f"another --out") from None

    def _write(self, options: dict, completed: bool) -> None:
        write_atomically(self.record, json.dumps({"options": options, "completed": completed}, indent=1) + "\n")

    def path(self, stage: str) -> Path:
        return self.folder / f"{stage}.pt"

    def complete(self) -> None:
        self._write(self.options, completed=True)

    def failed(self, what: str, exc: BaseException) -> RunFailed:
        """The error for a failure after training: it names the checkpoint that holds the work."""
        return RunFailed(f"{what} failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                         f"the finetuned model is kept in {self.path('compressed')}: rerun the same command with "
                         f"--resume to deploy it without training again")
