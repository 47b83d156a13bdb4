"""OPQ codebook fake-quant, forward + backward on a 1024 x 4096 weight (4M elements, 16-level
codebook, half the weights pruned): the CPU kernel against the reference composite, and a clone
plus a masked select (the least any one-pass version must move, 9 B/elem fp32) as bandwidth probes.

    python benchmarks/bench_codebook_quant.py            # table, ratios measured in this run
    python benchmarks/bench_codebook_quant.py --device cuda   # the CUDA and Triton kernels
    pytest benchmarks/bench_codebook_quant.py --benchmark-enable
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch

from mixedprec import ops
from timing import our_backend, table_backends, time_ms  # benchmarks/timing.py

SHAPE = (1024, 4096)
LEVELS = 16
KEEP = 0.5


def make_inputs(shape=SHAPE, levels: int = LEVELS, keep: float = KEEP, seed: int = 0,
                device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g).to(device).requires_grad_()
    codebook = torch.linspace(-2.5, 2.5, levels, device=device)
    channel_scale = (torch.rand(shape[0], generator=g) * 0.1 + 0.05).to(device)
    keep_mask = (torch.rand(shape, generator=g) < keep).to(device)
    grad_y = torch.randn(shape, generator=g).to(device)
    return weight, codebook, channel_scale, keep_mask, grad_y


def codebook_step(backend: str, weight, codebook, channel_scale, keep_mask, grad_y) -> Callable[[], object]:
    def step():
        y = ops.codebook_quant(weight, codebook, channel_scale, keep_mask, backend=backend)
        return torch.autograd.grad(y, (weight,), grad_y)
    return step


def forward_step(backend: str, weight, codebook, channel_scale, keep_mask, grad_y) -> Callable[[], object]:
    w = weight.detach()
    return lambda: ops.codebook_quant(w, codebook, channel_scale, keep_mask, backend=backend)


def masked_clone_step(weight, codebook, channel_scale, keep_mask, grad_y) -> Callable[[], object]:
    w = weight.detach()
    return lambda: torch.where(keep_mask, w, 0.0)


def contenders(device: torch.device | str = "cpu") -> dict[str, Callable]:
    """Name -> maker of a step from make_inputs()."""
    found = {}
    for backend in table_backends(device):
        if ops.KERNELS_BUILT["codebook_quant"][backend]:
            found[f"codebook_quant[{backend}] fwd+bwd"] = lambda *a, b=backend: codebook_step(b, *a)
            found[f"codebook_quant[{backend}] fwd"] = lambda *a, b=backend: forward_step(b, *a)
    found["where(keep_mask, w, 0) (bandwidth probe)"] = masked_clone_step
    return found


@pytest.mark.parametrize("name", list(contenders()))
def test_codebook_quant(benchmark, name):
    step = contenders()[name](*make_inputs())
    benchmark(step)


def measure(device: torch.device | str = "cpu", repeats: int = 20) -> dict[str, float]:
    """Median ms of every contender."""
    inputs = make_inputs(device=device)
    return {name: time_ms(make(*inputs), repeats, device=device) for name, make in contenders(device).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    times = measure(args.device, args.repeats)
    print(f"codebook fake-quant, {SHAPE[0]}x{SHAPE[1]} fp32 weight, {LEVELS} levels, keep {KEEP:.0%}, "
          f"{torch.get_num_threads()} threads, {args.device} (median of {args.repeats})")
    print(f"{'contender':42s} {'ms':>9s} {'x ours':>9s}")
    ours_name = f"codebook_quant[{our_backend(args.device)}]"
    for name, ms in times.items():
        kind = name.rsplit(" ", 1)[-1]
        ours = times.get(f"{ours_name} {kind}", times.get(f"{ours_name} fwd"))
        ratio = f"{ms / ours:9.2f}" if ours else f"{'-':>9s}"
        print(f"{name:42s} {ms:9.2f} {ratio}")


if __name__ == "__main__":
    main()
