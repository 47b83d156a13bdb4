"""One QAT training step of ResNet-20 (batch 64, 32x32 synthetic inputs): float vs SBS.

Cases: the float step; the SBS search step (CE + lambda * log(BOPs), gates learning) and the
SBS finetune step (fixed bits), each with the op's default backend (the fused kernel when it
is built), forced to the reference composite and, on CUDA, forced to Triton. Every step is
forward, loss, backward, optimizer step and projection of the SBS parameters.

    .venv/bin/pytest benchmarks/bench_qat_step.py --benchmark-enable
    .venv/bin/python benchmarks/bench_qat_step.py          # table: min, median, ratio to float
    .venv/bin/python benchmarks/bench_qat_step.py --device cuda
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mixedprec import ops, sbs
from mixedprec.metrics import output_positions
from mixedprec.models import resnet20
from mixedprec.sbs.trainer import param_groups, train_step
from timing import elapsed_ms  # benchmarks/timing.py

BATCH, SHAPE = 64, (3, 32, 32)
CASES = [("float", None), ("search", None), ("search", "reference"), ("finetune", None), ("finetune", "reference")]


def cases(device: torch.device | str = "cpu") -> list[tuple[str, str | None]]:
    """CASES, and on CUDA the SBS steps forced to Triton when it runs there."""
    extra = [(kind, "triton") for kind in ("search", "finetune")
             if torch.device(device).type == "cuda" and "triton" in ops.available_backends(device)]
    return CASES + extra


def make_step(kind: str, backend: str | None, device: torch.device | str = "cpu") -> Callable[[], None]:
    """A closure running one training step of the given kind; the model is warmed up."""
    torch.manual_seed(0)
    images, labels = torch.randn(BATCH, *SHAPE).to(device), torch.randint(0, 10, (BATCH,)).to(device)
    model = resnet20()
    if kind != "float":
        model = sbs.convert(model, inplace=True)
    model.to(device)
    positions = output_positions(model, SHAPE) if kind == "search" else None
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9, nesterov=True)
    parity = iter(range(1 << 62))

    def step() -> None:
        with ops.use_backend(backend):
            if kind == "float":
                loss = nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            else:
                train_step(model, images, labels, optimizer, positions=positions, bops_weight=0.05,
                           learn_weights=next(parity) % 2 == 0)

    step()  # first-batch clip initialization, allocator warm-up
    if kind == "finetune":
        sbs.fix_configuration(model)
    return step


def backend_used(backend: str | None, device: torch.device | str = "cpu") -> str:
    return backend or ops.resolve("bit_sharing_quant", None, torch.empty(1, device=device),
                                  ops.KERNELS_BUILT["bit_sharing_quant"]).value


@pytest.mark.parametrize("kind,backend", CASES,
                         ids=[k if k == "float" else f"{k}-{backend_used(b)}" for k, b in CASES])
def test_qat_step(benchmark, kind, backend):
    benchmark.extra_info["backend"] = "none" if kind == "float" else backend_used(backend)
    benchmark.pedantic(make_step(kind, backend), rounds=5, iterations=1, warmup_rounds=1)


def measure(rounds: int = 10, device: torch.device | str = "cpu") -> list[dict]:
    """Per case: kind, backend used and the ms of each round, the cases run round-robin so that
    every case sees the same machine load."""
    steps = {case: make_step(*case, device) for case in cases(device)}
    times: dict[tuple, list[float]] = {case: [] for case in steps}
    for _ in range(rounds):
        for case, step in steps.items():
            times[case].append(elapsed_ms(step, device))
    return [{"kind": kind, "backend": "-" if kind == "float" else backend_used(backend, device), "ms": ms}
            for (kind, backend), ms in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"ResNet-20 QAT step, batch {BATCH}, {SHAPE[1]}x{SHAPE[2]}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, cases interleaved (ratios of minima: the least disturbed runs on a shared machine)")
    rows = measure(args.rounds, args.device)
    float_ms = min(rows[0]["ms"])
    print(f"{'step':<10} {'backend':<10} {'min ms':>9} {'median ms':>10} {'vs float':>9}")
    for r in rows:
        print(f"{r['kind']:<10} {r['backend']:<10} {min(r['ms']):>9.1f} {statistics.median(r['ms']):>10.1f} "
              f"{min(r['ms']) / float_ms:>8.2f}x")


if __name__ == "__main__":
    main()
