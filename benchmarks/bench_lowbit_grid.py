"""lowbit_linear on a 4096x4096 layer, the grid bits 1..8 x sparsity 0/30/50/75/90% at batch 1
and 16, against torch's fp32 and bf16 F.linear and its dense 4-bit weight-only matmul (group size
128; on CPU _weight_int4pack_mm_for_cpu, on CUDA _weight_int4pack_mm, both with bf16 x).
`pytest benchmarks/bench_lowbit_grid.py` (pytest-benchmark; `-k` picks cells), or run this file
for the tables (ms, and speedups over the three torch baselines timed in the same run;
`--device cuda`: the CUDA kernel)."""
from __future__ import annotations

import argparse
import functools
import statistics

import pytest
import torch
import torch.nn.functional as F

from mixedprec import ops
from mixedprec.formats import pack_weight
from bench_lowbit_linear import K, N, int4_baseline  # the layer and int4 baseline of the headline cases
from timing import our_backend, time_ms  # benchmarks/timing.py

BATCHES = (1, 16)
BITS = tuple(range(1, 9))
SPARSITY = (0, 30, 50, 75, 90)  # percent pruned
BASELINES = ("torch fp32 F.linear", "torch bf16 F.linear", "torch int4pack_mm (bf16 x)")


@functools.lru_cache(maxsize=1)  # packing 16M codes takes seconds; the tables pack one cell at a time
def packed_case(bits: int, sparsity: int, device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    keep = torch.rand(N, K, generator=g) >= sparsity / 100 if sparsity else None
    return pack_weight(codes, torch.randn(1 << bits, generator=g), torch.rand(N, generator=g) + 0.5, bits, keep).to(device)


def batch_input(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(batch, K, generator=torch.Generator().manual_seed(batch)).to(device)


def baselines(batch: int, device: torch.device | str = "cpu") -> dict:
    x = batch_input(batch, device)
    w = torch.randn(N, K).to(device)
    x_bf16, w_bf16 = x.bfloat16(), w.bfloat16()
    int4 = int4_baseline(device)
    fns = (lambda: F.linear(x, w), lambda: F.linear(x_bf16, w_bf16), lambda: int4(x_bf16))
    return dict(zip(BASELINES, fns))


def cell_name(bits: int, sparsity: int) -> str:
    return f"lowbit_linear {bits}-bit {sparsity}%"


def lowbit(batch: int, bits: int, sparsity: int, device: torch.device | str = "cpu"):
    x, p, backend = batch_input(batch, device), packed_case(bits, sparsity, device), our_backend(device)
    return lambda: ops.lowbit_linear(x, p, backend=backend)


CELLS = [(b, s) for b in BITS for s in SPARSITY]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(BASELINES) + [cell_name(b, s) for b, s in CELLS])
def test_lowbit_grid(benchmark, batch, name):
    with torch.inference_mode():
        if name in BASELINES:
            fn = baselines(batch)[name]
        else:
            fn = lowbit(batch, *next(c for c in CELLS if cell_name(*c) == name))
        benchmark(fn)


def measure(device: torch.device | str = "cpu", repeats: int = 7) -> tuple[dict, dict]:
    """Median ms: per batch the baselines (timed before and after the grid, median of both), and
    per (batch, bits, sparsity) lowbit_linear. Cells are packed one at a time (batches share it)."""
    with torch.inference_mode():
        base_fns = {batch: baselines(batch, device) for batch in BATCHES}
        samples = {batch: {n: [time_ms(f, repeats, device=device)] for n, f in fns.items()} for batch, fns in base_fns.items()}
        grid = {(batch, b, s): time_ms(lowbit(batch, b, s, device), repeats, device=device)
                for b, s in CELLS for batch in BATCHES}
        for batch, fns in base_fns.items():
            for n, f in fns.items():
                samples[batch][n].append(time_ms(f, repeats, device=device))
        base = {batch: {n: statistics.median(v) for n, v in t.items()} for batch, t in samples.items()}
    return base, grid


def print_tables(base: dict, grid: dict) -> None:
    head = "| bits | " + " | ".join(f"{s}%" for s in SPARSITY) + " |"
    rule = "|---" * (len(SPARSITY) + 1) + "|"
    for batch in BATCHES:
        b = base[batch]
        print(f"\nbatch {batch}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in b.items()))
        print("\nlowbit_linear ms (x fp32 F.linear / x bf16 F.linear / x int4pack_mm: speedups, >1 = faster)\n")
        print(head)
        print(rule)
        for bits in BITS:
            cells = []
            for s in SPARSITY:
                t = grid[batch, bits, s]
                ratios = "/".join(f"{b[n] / t:.2f}" for n in BASELINES)
                cells.append(f"{t:.3f} ({ratios})")
            print(f"| {bits} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{N}x{K} layer, {torch.get_num_threads()} threads, {args.device} ({our_backend(args.device)} backend), "
          f"median of {args.repeats}, times in ms")
    print_tables(*measure(args.device, args.repeats))


if __name__ == "__main__":
    main()
