"""lowbit_linear on a 4096x4096 layer at batch 1 and 16: dense 4-bit, 75%-sparse 4-bit and 2-bit,
against torch's fp32 matmul and its int4 weight-only matmul (group size 128; on CPU
_weight_int4pack_mm_for_cpu, on CUDA _weight_int4pack_mm, both with bf16 x), on CUDA also against
fp16 and bf16 matmul. `pytest benchmarks/bench_lowbit_linear.py` (pytest-benchmark), or run this
file for one table with ratios (`--device cuda`: the CUDA and Triton kernels). The grid of every
bitwidth and sparsity: bench_lowbit_grid.py."""
from __future__ import annotations

import argparse
import functools

import pytest
import torch

from mixedprec import ops
from mixedprec.formats import pack_weight
from timing import table_backends, time_ms  # benchmarks/timing.py

N = K = 4096
BATCHES = (1, 16)
CASES = {"dense 4-bit": (4, 0.0), "75%-sparse 4-bit": (4, 0.75), "75%-sparse 2-bit": (2, 0.75)}
INT4_GROUP = 128


@functools.cache  # packing 16M codes takes seconds; every table and test reuses the same three
def packed_case(bits, sparsity, device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    keep = torch.rand(N, K, generator=g) >= sparsity if sparsity else None
    return pack_weight(codes, torch.randn(1 << bits, generator=g), torch.rand(N, generator=g) + 0.5, bits, keep).to(device)


def int4_baseline(device: torch.device | str = "cpu"):
    """torch's int4 weight-only matmul: (x bf16, packed int4 weight, group scales/zeros)."""
    device = torch.device(device)
    w_int = torch.randint(0, 16, (N, K), dtype=torch.int32)
    scales_zeros = torch.rand(K // INT4_GROUP, N, 2, dtype=torch.bfloat16, device=device)
    if device.type == "cuda":  # two codes per byte, tiled for the tensor cores (inner k tiles: 8)
        w_uint8 = (w_int[:, ::2] << 4 | w_int[:, 1::2]).to(torch.uint8).to(device)
        w_packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, w_packed, INT4_GROUP, scales_zeros)
    w_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_int, 1)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w_packed, INT4_GROUP, scales_zeros)


def lowbit_name(case: str, backend: str, device: torch.device | str = "cpu") -> str:
    """A lowbit_linear candidate's name: the CPU table has one backend, the CUDA table two."""
    return f"lowbit_linear {case}" + ("" if torch.device(device).type == "cpu" else f" [{backend}]")


def candidates(batch, device: torch.device | str = "cpu"):
    device = torch.device(device)
    x = torch.randn(batch, K).to(device)
    w = torch.randn(N, K).to(device)
    fns = {"torch fp32 matmul": lambda: x @ w.T}
    if device.type == "cuda":
        for dtype in (torch.float16, torch.bfloat16):
            x_half, w_half = x.to(dtype), w.to(dtype)
            fns[f"torch {str(dtype).removeprefix('torch.')} matmul"] = lambda a=x_half, b=w_half: a @ b.T
    int4 = int4_baseline(device)
    x_bf16 = x.bfloat16()
    fns["torch int4pack_mm (bf16 x)"] = lambda: int4(x_bf16)
    for name, (bits, sparsity) in CASES.items():
        p = packed_case(bits, sparsity, device)
        for backend in table_backends(device):
            if backend != "reference":
                fns[lowbit_name(name, backend, device)] = (lambda p=p, b=backend: ops.lowbit_linear(x, p, backend=b))
    return fns


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", ["torch fp32 matmul", "torch int4pack_mm (bf16 x)"] + [f"lowbit_linear {n}" for n in CASES])
def test_lowbit_linear(benchmark, batch, name):
    with torch.inference_mode():
        benchmark(candidates(batch)[name])


def measure(device: torch.device | str = "cpu", repeats: int = 20) -> dict[int, dict[str, float]]:
    """Per batch, the median ms of every candidate."""
    with torch.inference_mode():
        return {batch: {name: time_ms(fn, repeats, device=device) for name, fn in candidates(batch, device).items()}
                for batch in BATCHES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{N}x{K} layer, {torch.get_num_threads()} threads, {args.device}, median of {args.repeats}, times in ms")
    for batch, times in measure(args.device, args.repeats).items():
        fp32, int4 = times["torch fp32 matmul"], times["torch int4pack_mm (bf16 x)"]
        print(f"\nbatch {batch}:  {'':28s} {'ms':>8s} {'vs fp32':>8s} {'vs int4':>8s}")
        for name, t in times.items():
            print(f"  {name:36s} {t:8.3f} {fp32 / t:7.2f}x {int4 / t:7.2f}x")


if __name__ == "__main__":
    main()
