"""Mutation spot-checks: plausible bugs, each of which some test must catch.

A mutant is a textual patch of one file (its old text must occur exactly once) and the pytest
selection that must fail under it. The script copies the repository (tracked and untracked,
not ignored, files plus the compiled mixedprec/_C*.so) into a temporary directory, applies each
mutant there in turn, runs its selection with this Python, and reports it killed (pytest
failed) or survived (pytest passed). The real tree is never written. Exit status 1 when a
mutant survives or its selection runs no test. Mutants of csrc/ would need a rebuild of the
copy (minutes each) and are left out.

    python tests/mutants/run.py              # every mutant
    python tests/mutants/run.py --list       # their names
    python tests/mutants/run.py NAME ...     # some of them
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: the selection that must fail


MUTANTS = [
    Mutant("last threshold gradient zero", "mixedprec/ops/bit_sharing_quant.py",
           "    return (-s * (1 - s) * dy_dzhat * outer_gates * tail_sums).to(thresholds.dtype)",
           "    grad = (-s * (1 - s) * dy_dzhat * outer_gates * tail_sums).to(thresholds.dtype)\n"
           "    return torch.cat([grad[:-1], torch.zeros_like(grad[-1:])])",
           ("tests/test_bit_sharing.py", "-k", "sizes and 1048579")),
    Mutant("Triton bfloat16 ties round half up", "mixedprec/backends/triton/common.py",
           "rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16",
           "rounded = (bits + 0x8000) >> 16",
           ("tests/test_bit_sharing.py", "tests/test_codebook_quant.py", "-k", "bfloat16_ties and triton")),
    Mutant("float64 codebook_quant computed in float32", "mixedprec/backends/reference/codebook_quant.py",
           "    dtype = compute_dtype(weight.dtype)\n",
           "    dtype = torch.float32\n",
           ("tests/test_codebook_quant.py", "-k", "float64")),
    Mutant("an explicit backend lacking the op's kernel replaced by the reference", "mixedprec/ops/backend.py",
           "    if not built[asked.value]:\n        raise RuntimeError(",
           "    if not built[asked.value]:\n        return Backend.REFERENCE\n        raise RuntimeError(",
           ("tests/test_codebook_quant.py", "-k", "refused_not_replaced")),
    Mutant("Triton outputs not NaN-poisoned", "mixedprec/_extension.py",
           'return os.environ.get("MIXEDPREC_POISON_OUTPUTS", "0") == "1"',
           "return False",
           ("tests/test_codebook_quant.py", "-k", "half_way")),
]


def copy_repository(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for relative in [f for f in listed if f and (ROOT / f).is_file()] + \
            [str(p.relative_to(ROOT)) for p in ROOT.glob("mixedprec/_*.so")]:
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, dest / relative)


def run(mutant: Mutant, copy: Path) -> str:
    target = copy / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        return f"ERROR: its text occurs {original.count(mutant.old)} times in {mutant.path}, not once"
    target.write_text(original.replace(mutant.old, mutant.new))
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests],
                                cwd=copy, capture_output=True, text=True)
    finally:
        target.write_text(original)
    last = ((result.stdout + result.stderr).strip().splitlines() or [""])[-1]
    if result.returncode == 0:
        return f"SURVIVED ({last})"
    if result.returncode == 5:
        return "ERROR: its selection ran no test"
    failed = [line.split(" - ")[0] for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return f"killed by {failed[0] if failed else f'pytest exit {result.returncode}: {last}'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(m.name for m in MUTANTS))
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {sorted(unknown)}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    bad = 0
    with tempfile.TemporaryDirectory(prefix="mixedprec-mutants-") as scratch:
        copy_repository(Path(scratch))
        for mutant in chosen:
            start = time.monotonic()
            outcome = run(mutant, Path(scratch))
            bad += not outcome.startswith("killed")
            print(f"{mutant.name}: {outcome} [{time.monotonic() - start:.0f} s]", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
