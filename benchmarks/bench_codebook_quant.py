"""OPQ codebook fake-quant, forward + backward on a 1024 x 4096 weight (4M elements, 16-level
codebook, half the weights pruned): the CPU kernel against the reference composite, and a clone
plus a masked select (the least any one-pass version must move, 9 B/elem fp32) as bandwidth probes.

    python benchmarks/bench_codebook_quant.py            # table, ratios measured in this run
    pytest benchmarks/bench_codebook_quant.py --benchmark-enable
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch

from mixedprec import ops
from timing import time_ms  # benchmarks/timing.py

SHAPE = (1024, 4096)
LEVELS = 16
KEEP = 0.5


def make_inputs(shape=SHAPE, levels: int = LEVELS, keep: float = KEEP, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g).requires_grad_()
    codebook = torch.linspace(-2.5, 2.5, levels)
    channel_scale = torch.rand(shape[0], generator=g) * 0.1 + 0.05
    keep_mask = torch.rand(shape, generator=g) < keep
    grad_y = torch.randn(shape, generator=g)
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


def contenders() -> dict[str, Callable]:
    found = {}
    for backend in ops.available_backends("cpu"):
        if backend in ("cpu", "reference") and ops._CODEBOOK_KERNEL_BUILT[backend]:
            found[f"codebook_quant[{backend}] fwd+bwd"] = lambda *a, b=backend: codebook_step(b, *a)
            found[f"codebook_quant[{backend}] fwd"] = lambda *a, b=backend: forward_step(b, *a)
    found["where(keep_mask, w, 0) (bandwidth probe)"] = masked_clone_step
    return found


@pytest.mark.parametrize("name", list(contenders()))
def test_codebook_quant(benchmark, name):
    step = contenders()[name](*make_inputs())
    benchmark(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    inputs = make_inputs()
    times = {name: time_ms(make(*inputs), args.repeats) for name, make in contenders().items()}
    print(f"codebook fake-quant, {SHAPE[0]}x{SHAPE[1]} fp32 weight, {LEVELS} levels, keep {KEEP:.0%}, "
          f"{torch.get_num_threads()} threads (median of {args.repeats})")
    print(f"{'contender':42s} {'ms':>9s} {'x ours':>9s}")
    for name, ms in times.items():
        kind = name.rsplit(" ", 1)[-1]
        ours = times.get(f"codebook_quant[cpu] {kind}", times.get("codebook_quant[cpu] fwd"))
        ratio = f"{ms / ours:9.2f}" if ours else f"{'-':>9s}"
        print(f"{name:42s} {ms:9.2f} {ratio}")


if __name__ == "__main__":
    main()
