"""Bit-sharing fake-quant, forward + backward on 4M elements: our kernels against the reference
composite, torch's single-bitwidth fake-quant built-ins and a clone (bandwidth probe).

    python benchmarks/bench_bit_sharing.py            # table, ratios measured in this run
    pytest benchmarks/bench_bit_sharing.py --benchmark-enable
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch

from mixedprec import ops
from timing import time_ms  # benchmarks/timing.py

N = 4 << 20
BITS = (2, 4, 8)


def make_inputs(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).requires_grad_()
    clip = torch.tensor(2.5, requires_grad=True)
    thresholds = torch.tensor([0.01, 0.001], requires_grad=True)
    grad_y = torch.randn(n, generator=g)
    return x, clip, thresholds, grad_y


def bit_sharing_step(backend: str, x, clip, thresholds, grad_y) -> Callable[[], object]:
    def step():
        y = ops.bit_sharing_quant(x, clip, thresholds, BITS, True, backend=backend).output
        return torch.autograd.grad(y, (x, clip, thresholds), grad_y)
    return step


def learnable_fake_quant_step(x, clip, thresholds, grad_y) -> Callable[[], object]:
    scale = (clip.detach() / 127).reshape(1).requires_grad_()
    zero_point = torch.zeros(1)

    def step():
        y = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, -128, 127, 1.0)
        return torch.autograd.grad(y, (x, scale), grad_y)
    return step


def fake_quant_step(x, clip, thresholds, grad_y) -> Callable[[], object]:
    scale = float(clip) / 127

    def step():
        y = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
        return torch.autograd.grad(y, (x,), grad_y)
    return step


def clone_step(x, clip, thresholds, grad_y) -> Callable[[], object]:
    data = x.detach()
    return lambda: data.clone()


def contenders() -> dict[str, Callable]:
    found = {}
    for backend in ops.available_backends("cpu"):
        if backend in ("cpu", "reference"):
            found[f"bit_sharing_quant[{backend}]"] = lambda *a, b=backend: bit_sharing_step(b, *a)
    found["torch learnable fake-quant (8-bit)"] = learnable_fake_quant_step
    found["torch fake_quantize_per_tensor (8-bit)"] = fake_quant_step
    found["clone (bandwidth probe)"] = clone_step
    return found


@pytest.mark.parametrize("name", list(contenders()))
def test_bit_sharing_fwd_bwd(benchmark, name):
    step = contenders()[name](*make_inputs())
    benchmark(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    inputs = make_inputs()
    times = {name: time_ms(make(*inputs), args.repeats) for name, make in contenders().items()}
    ours = times["bit_sharing_quant[cpu]"] if "bit_sharing_quant[cpu]" in times else None
    print(f"bit-sharing fake-quant, forward + backward, {N:,} fp32 elements, bits={BITS}, "
          f"{torch.get_num_threads()} threads (median of {args.repeats})")
    print(f"{'contender':42s} {'ms':>9s} {'x ours':>9s}")
    for name, ms in times.items():
        ratio = f"{ms / ours:9.2f}" if ours else f"{'-':>9s}"
        print(f"{name:42s} {ms:9.2f} {ratio}")


if __name__ == "__main__":
    main()
