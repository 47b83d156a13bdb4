"""Bit-sharing fake-quant, forward + backward on 4M elements: our kernels against the reference
composite, torch's single-bitwidth fake-quant built-ins and a clone (bandwidth probe).

    python benchmarks/bench_bit_sharing.py            # table, ratios measured in this run
    python benchmarks/bench_bit_sharing.py --device cuda   # the CUDA and Triton kernels
    pytest benchmarks/bench_bit_sharing.py --benchmark-enable
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch

from mixedprec import ops
from timing import our_backend, table_backends, time_ms  # benchmarks/timing.py

N = 4 << 20
BITS = (2, 4, 8)


def make_inputs(n: int = N, seed: int = 0, device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).to(device).requires_grad_()
    clip = torch.tensor(2.5, device=device, requires_grad=True)
    thresholds = torch.tensor([0.01, 0.001], device=device, requires_grad=True)
    grad_y = torch.randn(n, generator=g).to(device)
    return x, clip, thresholds, grad_y


def bit_sharing_step(backend: str, x, clip, thresholds, grad_y) -> Callable[[], object]:
    def step():
        y = ops.bit_sharing_quant(x, clip, thresholds, BITS, True, backend=backend).output
        return torch.autograd.grad(y, (x, clip, thresholds), grad_y)
    return step


def learnable_fake_quant_step(x, clip, thresholds, grad_y) -> Callable[[], object]:
    scale = (clip.detach() / 127).reshape(1).requires_grad_()
    zero_point = torch.zeros(1, device=x.device)

    def step():
        y = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, -128, 127, 1.0)
        return torch.autograd.grad(y, (x, scale), grad_y)
    return step


def fake_quant_step(x, clip, thresholds, grad_y) -> Callable[[], object]:
    scale = float(clip.detach()) / 127

    def step():
        y = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
        return torch.autograd.grad(y, (x,), grad_y)
    return step


def clone_step(x, clip, thresholds, grad_y) -> Callable[[], object]:
    data = x.detach()
    return lambda: data.clone()


def contenders(device: torch.device | str = "cpu") -> dict[str, Callable]:
    """Name -> maker of a step from make_inputs()."""
    found = {}
    for backend in table_backends(device):
        found[f"bit_sharing_quant[{backend}]"] = lambda *a, b=backend: bit_sharing_step(b, *a)
    found["torch learnable fake-quant (8-bit)"] = learnable_fake_quant_step
    found["torch fake_quantize_per_tensor (8-bit)"] = fake_quant_step
    found["clone (bandwidth probe)"] = clone_step
    return found


@pytest.mark.parametrize("name", list(contenders()))
def test_bit_sharing_fwd_bwd(benchmark, name):
    step = contenders()[name](*make_inputs())
    benchmark(step)


def measure(device: torch.device | str = "cpu", repeats: int = 20) -> dict[str, float]:
    """Median ms of every contender's forward + backward."""
    inputs = make_inputs(device=device)
    return {name: time_ms(make(*inputs), repeats, device=device) for name, make in contenders(device).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    times = measure(args.device, args.repeats)
    ours = times.get(f"bit_sharing_quant[{our_backend(args.device)}]")
    print(f"bit-sharing fake-quant, forward + backward, {N:,} fp32 elements, bits={BITS}, "
          f"{torch.get_num_threads()} threads, {args.device} (median of {args.repeats})")
    print(f"{'contender':42s} {'ms':>9s} {'x ours':>9s}")
    for name, ms in times.items():
        ratio = f"{ms / ours:9.2f}" if ours else f"{'-':>9s}"
        print(f"{name:42s} {ms:9.2f} {ratio}")


if __name__ == "__main__":
    main()
