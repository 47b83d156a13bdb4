"""One QAT training step of ResNet-20 (batch 64, 32x32 inputs, CPU): float vs SBS.

Cases: the float step; the SBS search step (CE + lambda * log(BOPs), gates learning) and the
SBS finetune step (fixed bits), each with the op's default backend (the fused kernel when it
is built) and forced to the reference composite. Every step is forward, loss, backward,
optimizer step and projection of the SBS parameters.

    .venv/bin/pytest benchmarks/bench_qat_step.py --benchmark-enable
    .venv/bin/python benchmarks/bench_qat_step.py          # table: min, median, ratio to float
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mixedprec import ops, sbs
from mixedprec.metrics import output_positions
from mixedprec.models import resnet20
from mixedprec.sbs.trainer import param_groups, train_step

BATCH, SHAPE = 64, (3, 32, 32)
CASES = [("float", None), ("search", None), ("search", "reference"), ("finetune", None), ("finetune", "reference")]


def make_step(kind: str, backend: str | None) -> Callable[[], None]:
    """A closure running one training step of the given kind; the model is warmed up."""
    torch.manual_seed(0)
    images, labels = torch.randn(BATCH, *SHAPE), torch.randint(0, 10, (BATCH,))
    model = resnet20()
    if kind != "float":
        model = sbs.convert(model, inplace=True)
    positions = output_positions(model, SHAPE) if kind == "search" else None
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9, nesterov=True)
    parity = iter(range(1 << 62))

    def step() -> None:
        with sbs.force_backend(backend):
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


def backend_used(backend: str | None) -> str:
    return backend or ops.resolve_backend("bit_sharing_quant", None, torch.empty(1))


@pytest.mark.parametrize("kind,backend", CASES,
                         ids=[k if k == "float" else f"{k}-{backend_used(b)}" for k, b in CASES])
def test_qat_step(benchmark, kind, backend):
    benchmark.extra_info["backend"] = "none" if kind == "float" else backend_used(backend)
    benchmark.pedantic(make_step(kind, backend), rounds=5, iterations=1, warmup_rounds=1)


def main(rounds: int = 10) -> None:
    print(f"ResNet-20 QAT step, batch {BATCH}, {SHAPE[1]}x{SHAPE[2]}, CPU, {torch.get_num_threads()} threads, "
          f"{rounds} rounds, cases interleaved (ratios of minima: the least disturbed runs on a shared machine)")
    steps = [make_step(kind, backend) for kind, backend in CASES]
    times: list[list[float]] = [[] for _ in CASES]
    for _ in range(rounds):  # round-robin, so that every case sees the same machine load
        for step, case_times in zip(steps, times):
            start = time.perf_counter()
            step()
            case_times.append(1e3 * (time.perf_counter() - start))
    float_ms = min(times[0])
    print(f"{'step':<10} {'backend':<10} {'min ms':>9} {'median ms':>10} {'vs float':>9}")
    for (kind, backend), case_times in zip(CASES, times):
        name = "-" if kind == "float" else backend_used(backend)
        print(f"{kind:<10} {name:<10} {min(case_times):>9.1f} {statistics.median(case_times):>10.1f} "
              f"{min(case_times) / float_ms:>8.2f}x")


if __name__ == "__main__":
    main()
