"""lut_conv2d forward on ResNet-18's 3x3 layer shapes (4-bit, dense) against torch's float32
conv2d (on CUDA: cuDNN, with TF32 off as in our kernels and on as torch's default), at batch 1
and 32, with the weight bytes each holds.

    python benchmarks/bench_lut_conv2d.py            # table, ratios measured in this run
    python benchmarks/bench_lut_conv2d.py --device cuda   # the CUDA and Triton kernels
    pytest benchmarks/bench_lut_conv2d.py --benchmark-enable
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch

from mixedprec import ops
from mixedprec.formats import pack_weight
from timing import table_backends, time_ms  # benchmarks/timing.py

# (channels, spatial size) of ResNet-18's 3x3, stride-1 convolutions
LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]
BATCHES = (1, 32)
BITS = 4


def make_case(channels: int, size: int, batch: int, seed: int = 0, device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (channels, channels, 3, 3)
    codes = torch.randint(0, 1 << BITS, shape, generator=g)
    codebook = torch.sort(torch.randn(1 << BITS, generator=g)).values
    packed = pack_weight(codes, codebook, torch.rand(channels, generator=g) + 0.5, BITS).to(device)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    return x, packed, packed.decode()


def lut_step(x, packed, weight, backend: str = "cpu") -> Callable[[], object]:
    return lambda: ops.lut_conv2d(x, packed, padding=1, backend=backend)


def torch_step(x, packed, weight) -> Callable[[], object]:
    return lambda: torch.nn.functional.conv2d(x, weight, padding=1)


def cudnn_step(x, packed, weight, tf32: bool) -> Callable[[], object]:
    def step():
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
            return torch.nn.functional.conv2d(x, weight, padding=1)
    return step


def contenders(device: torch.device | str = "cpu") -> dict[str, Callable]:
    """Name -> maker of a step from make_case(); ours (a lut_conv2d kernel) first."""
    if torch.device(device).type == "cpu":
        return {"lut": lut_step, "torch": torch_step}
    found = {f"lut[{b}]": lambda *c, b=b: lut_step(*c, backend=b) for b in table_backends(device) if b != "reference"}
    found["cudnn fp32"] = lambda *c: cudnn_step(*c, tf32=False)
    found["cudnn tf32"] = lambda *c: cudnn_step(*c, tf32=True)
    return found


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


def measure(device: torch.device | str = "cpu", repeats: int = 20) -> list[dict]:
    """Per layer and batch: the median ms of every contender, the packed and the fp32 weight bytes."""
    rows = []
    with torch.no_grad():  # inference timings
        for channels, size, batch in CASES:
            case = make_case(channels, size, batch, device=device)
            packed_bytes, float_bytes = weight_bytes(*case[1:])
            rows.append({"layer": f"{channels}x{size}x{size}", "batch": batch, "packed_bytes": packed_bytes,
                         "fp32_bytes": float_bytes,
                         "ms": {name: time_ms(make(*case), repeats, device=device)
                                for name, make in contenders(device).items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, {BITS}-bit dense weights, {args.device}, median of {args.repeats}")
    rows = measure(args.device, args.repeats)
    ours, *baselines = rows[0]["ms"]
    print(f"{'layer':>14} {'batch':>5}" + "".join(f" {f'{n} ms':>9}" for n in rows[0]["ms"])
          + "".join(f" {f'{ours}/{b}':>9}" for b in baselines) + f" {'packed B':>9} {'fp32 B':>9}")
    for r in rows:
        ms = r["ms"]
        print(f"{r['layer']:>14} {r['batch']:>5}" + "".join(f" {t:>9.2f}" for t in ms.values())
              + "".join(f" {ms[ours] / ms[b]:>9.2f}" for b in baselines) + f" {r['packed_bytes']:>9} {r['fp32_bytes']:>9}")
    for batch in BATCHES:
        total = {n: sum(r["ms"][n] for r in rows if r["batch"] == batch) for n in rows[0]["ms"]}
        print(f"{'all four':>14} {batch:>5}" + "".join(f" {t:>9.2f}" for t in total.values())
              + "".join(f" {total[ours] / total[b]:>9.2f}" for b in baselines))


if __name__ == "__main__":
    main()
