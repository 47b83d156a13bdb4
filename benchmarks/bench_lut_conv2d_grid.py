"""lut_conv2d on every convolution geometry the torchvision CNNs use besides ResNet's 3x3
stride-1 layers (bench_lut_conv2d.py): 1x1 (ResNet-50's bottlenecks, MobileNetV2's expansions and
projections), 3x3 stride 2, the 7x7 stride-2 stem, depthwise 3x3 at stride 1 and 2, each at the
bits 1..8 x sparsity 0/50/90% that OPQ produces, at batch 1 and 8, in NCHW and channels-last
(x in that layout, as a model moved to it feeds its layers), against torch's float32 conv2d of the
same layer in the same layout, timed in the same run.

    python benchmarks/bench_lut_conv2d_grid.py     # the table: ms and speedup over fp32 conv2d
    pytest benchmarks/bench_lut_conv2d_grid.py --benchmark-enable
"""
from __future__ import annotations

import argparse
import itertools

import pytest
import torch
import torch.nn.functional as F

from mixedprec import ops
from mixedprec.formats import pack_weight
from timing import time_ms  # benchmarks/timing.py

# name -> (C_in, C_out, kernel, stride, groups, input size)
GEOMETRIES = {
    "1x1 256->64 @56": (256, 64, 1, 1, 1, 56),
    "1x1 512->2048 @7": (512, 2048, 1, 1, 1, 7),
    "1x1 96->24 @56": (96, 24, 1, 1, 1, 56),
    "3x3 s2 128->128 @56": (128, 128, 3, 2, 1, 56),
    "7x7 s2 stem 3->64 @224": (3, 64, 7, 2, 1, 224),
    "dw 3x3 144 @56": (144, 144, 3, 1, 144, 56),
    "dw 3x3 s2 384 @28": (384, 384, 3, 2, 384, 28),
}
BITS = tuple(range(1, 9))
SPARSITY = (0, 50, 90)
BATCHES = (1, 8)
LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


def layer(name: str, bits: int, sparsity: int, batch: int, layout: str = "nchw") -> tuple:
    """(x, packed weight, its decoded float weight, conv arguments) of one cell."""
    c_in, c_out, k, stride, groups, size = GEOMETRIES[name]
    g = torch.Generator().manual_seed(bits * 100 + sparsity)
    shape = (c_out, c_in // groups, k, k)
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    keep = torch.rand(shape, generator=g) >= sparsity / 100 if sparsity else None
    packed = pack_weight(codes, torch.randn(1 << bits, generator=g), torch.rand(c_out, generator=g) + 0.5, bits, keep)
    x = torch.randn(batch, c_in, size, size, generator=g).contiguous(memory_format=LAYOUTS[layout])
    return x, packed, packed.decode(), dict(stride=stride, padding=k // 2, groups=groups)


def steps(x, packed, weight, conv) -> dict:
    return {"lut_conv2d": lambda: ops.lut_conv2d(x, packed, **conv, backend="cpu"),
            "fp32 conv2d": lambda: F.conv2d(x, weight, **conv)}


CELLS = [(n, b, s, m, lay) for n in GEOMETRIES for b in BITS for s in SPARSITY for m in BATCHES for lay in LAYOUTS]


@pytest.mark.parametrize("contender", ["lut_conv2d", "fp32 conv2d"])
@pytest.mark.parametrize("cell", [c for c in CELLS if c[1] in (2, 5) and c[2] in (0, 90) and c[3] == 1
                                  and (c[4] == "nchw" or c[1] == 2)],
                         ids=lambda c: f"{c[0]}-{c[1]}bit-{c[2]}%-b{c[3]}-{c[4]}")
def test_conv_geometry(benchmark, contender, cell):
    with torch.inference_mode():
        benchmark(steps(*layer(*cell))[contender])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bits", default=",".join(map(str, BITS)), help="comma-separated subset of 1..8")
    parser.add_argument("--layout", choices=[*LAYOUTS, "both"], default="both")
    parser.add_argument("--layers", nargs="+", choices=GEOMETRIES, default=list(GEOMETRIES),
                        help="the geometries to time (default: all)")
    args = parser.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    print(f"{torch.get_num_threads()} threads, cpu, median of {args.repeats}; cells: lut_conv2d ms (speedup over the "
          f"fp32 conv2d of the same layer in the same layout, timed right after it)")
    with torch.inference_mode():
        for layout, batch in itertools.product(layouts, BATCHES):
            print(f"\n{layout}, batch {batch}\n\n| layer | bits | " + " | ".join(f"{s}% sparse" for s in SPARSITY) + " |")
            print("|---" * (len(SPARSITY) + 2) + "|")
            for name in args.layers:
                for b in bits:
                    cells = []
                    for s in SPARSITY:
                        t = {k: time_ms(f, args.repeats) for k, f in steps(*layer(name, b, s, batch, layout)).items()}
                        cells.append(f"{t['lut_conv2d']:.3f} ({t['fp32 conv2d'] / t['lut_conv2d']:.2f}x)")
                    print(f"| {name} | {b} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
