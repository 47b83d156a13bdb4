"""lut_conv2d forward on ResNet-18's 3x3 layer shapes (4-bit, dense) against torch's float32
conv2d, at batch 1 and 32, with the weight bytes each holds.

    python benchmarks/bench_lut_conv2d.py            # table, ratios measured in this run
    pytest benchmarks/bench_lut_conv2d.py --benchmark-enable
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch

from mixedprec import ops
from mixedprec.formats import pack_weight
from timing import time_ms  # benchmarks/timing.py

# (channels, spatial size) of ResNet-18's 3x3, stride-1 convolutions
LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]
BATCHES = (1, 32)
BITS = 4


def make_case(channels: int, size: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (channels, channels, 3, 3)
    codes = torch.randint(0, 1 << BITS, shape, generator=g)
    codebook = torch.sort(torch.randn(1 << BITS, generator=g)).values
    packed = pack_weight(codes, codebook, torch.rand(channels, generator=g) + 0.5, BITS)
    x = torch.randn(batch, channels, size, size, generator=g)
    return x, packed, packed.decode()


def lut_step(x, packed, weight) -> Callable[[], object]:
    return lambda: ops.lut_conv2d(x, packed, padding=1, backend="cpu")


def torch_step(x, packed, weight) -> Callable[[], object]:
    return lambda: torch.nn.functional.conv2d(x, weight, padding=1)


def weight_bytes(packed, weight) -> tuple[int, int]:
    packed_bytes = sum(t.numel() * t.element_size() for t in (packed.codes, packed.codebook, packed.channel_scale))
    return packed_bytes, weight.numel() * weight.element_size()


CASES = [(c, s, b) for c, s in LAYERS for b in BATCHES]


@pytest.mark.parametrize("step", [lut_step, torch_step], ids=["lut_conv2d[cpu]", "torch.conv2d[fp32]"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c}x{s}x{s}-b{b}" for c, s, b in CASES])
def test_conv3x3(benchmark, step, case):
    fn = step(*make_case(*case))
    with torch.no_grad():
        benchmark(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_grad_enabled(False)  # inference timings
    print(f"threads {torch.get_num_threads()}, {BITS}-bit dense weights, median of {args.repeats}")
    print(f"{'layer':>14} {'batch':>5} {'lut ms':>9} {'torch ms':>9} {'lut/torch':>9} {'packed B':>9} {'fp32 B':>9}")
    totals = {batch: [0.0, 0.0] for batch in BATCHES}
    for channels, size, batch in CASES:
        x, packed, weight = make_case(channels, size, batch)
        ours = time_ms(lut_step(x, packed, weight), args.repeats)
        base = time_ms(torch_step(x, packed, weight), args.repeats)
        totals[batch][0] += ours
        totals[batch][1] += base
        packed_bytes, float_bytes = weight_bytes(packed, weight)
        print(f"{f'{channels}x{size}x{size}':>14} {batch:>5} {ours:>9.2f} {base:>9.2f} {ours / base:>9.2f} "
              f"{packed_bytes:>9} {float_bytes:>9}")
    for batch, (ours, base) in totals.items():
        print(f"{'all four':>14} {batch:>5} {ours:>9.2f} {base:>9.2f} {ours / base:>9.2f}")


if __name__ == "__main__":
    main()
