"""lowbit_linear (CPU kernel) on a 4096x4096 layer at batch 1 and 16: dense 4-bit, 75%-sparse 4-bit
and 2-bit, against torch's fp32 matmul and its int4 CPU kernel (_weight_int4pack_mm_for_cpu,
group size 128). `pytest benchmarks/bench_lowbit_linear.py` (pytest-benchmark), or run this file
for one table with ratios."""
from __future__ import annotations


import pytest
import torch

from mixedprec import ops
from mixedprec.formats import pack_weight
from timing import time_ms  # benchmarks/timing.py

N = K = 4096
CASES = {"dense 4-bit": (4, 0.0), "75%-sparse 4-bit": (4, 0.75), "75%-sparse 2-bit": (2, 0.75)}


def packed_case(bits, sparsity):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    keep = torch.rand(N, K, generator=g) >= sparsity if sparsity else None
    return pack_weight(codes, torch.randn(1 << bits, generator=g), torch.rand(N, generator=g) + 0.5, bits, keep)


def int4_baseline():
    """torch's int4 weight-only CPU matmul: (x bf16, packed int4 weight, group scales/zeros)."""
    w_int = torch.randint(0, 16, (N, K), dtype=torch.int32)
    w_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_int, 1)
    scales_zeros = torch.rand(K // 128, N, 2, dtype=torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w_packed, 128, scales_zeros)


def candidates(batch):
    x = torch.randn(batch, K)
    w = torch.randn(N, K)
    fns = {"torch fp32 matmul": lambda: x @ w.T}
    int4 = int4_baseline()
    x_bf16 = x.bfloat16()
    fns["torch int4pack_mm (bf16 x)"] = lambda: int4(x_bf16)
    for name, (bits, sparsity) in CASES.items():
        p = packed_case(bits, sparsity)
        fns[f"lowbit_linear {name}"] = (lambda p=p: ops.lowbit_linear(x, p, backend="cpu"))
    return fns


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("name", ["torch fp32 matmul", "torch int4pack_mm (bf16 x)"] + [f"lowbit_linear {n}" for n in CASES])
def test_lowbit_linear(benchmark, batch, name):
    with torch.inference_mode():
        benchmark(candidates(batch)[name])


if __name__ == "__main__":
    print(f"{N}x{K} layer, {torch.get_num_threads()} threads, median of 20, times in ms")
    with torch.inference_mode():
        for batch in (1, 16):
            times = {name: time_ms(fn) for name, fn in candidates(batch).items()}
            fp32, int4 = times["torch fp32 matmul"], times["torch int4pack_mm (bf16 x)"]
            print(f"\nbatch {batch}:  {'':28s} {'ms':>8s} {'vs fp32':>8s} {'vs int4':>8s}")
            for name, t in times.items():
                print(f"  {name:36s} {t:8.3f} {fp32 / t:7.2f}x {int4 / t:7.2f}x")
