"""Wall-clock timing: the one way the package (reports, the demo) and the benchmark scripts
time things. A model's latency is the median of repeated eval-mode, inference-mode forwards after
warm-up, cut short by a time budget so that a large model does not run for minutes."""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mixedprec.metrics.examples import Example, as_tensors


# Untimed rounds before a model's timing (at most a quarter of its budget): a fresh process runs
# its first ~100 forwards slower (the demo's float model 0.45 ms against 0.30 ms after them, the
# packed ones alike, on a 2-core VM).
MODEL_WARMUP = 50


@dataclass(frozen=True)
class Latency:
    median_ms: float
    runs: int  # timed calls the median is taken over (warm-up excluded)


def elapsed_ms(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall time of one call of ``fn``; on a CUDA device from a synchronized start until the
    device has finished the call."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_calls(fn: Callable[[], object], repeats: int = 20, warmup: int = 2, device: torch.device | str = "cpu",
               budget_s: float = float("inf")) -> Latency:
    """Median of up to ``repeats`` timed calls after up to ``warmup`` untimed ones (no more once a
    quarter of the budget has gone). Once ``budget_s`` seconds have gone (warm-up included) no
    further call starts; at least one call is timed."""
    return time_rounds([fn], repeats, warmup, [device], budget_s)[0]


def time_rounds(fns: Sequence[Callable[[], object]], repeats: int = 20, warmup: int = 2,
                devices: Sequence[torch.device | str] | None = None, budget_s: float = float("inf")) -> list[Latency]:
    """``time_calls`` of each of ``fns``, timed in rounds of one call of each in turn, so that a
    slow phase of the machine (another process, a frequency change) falls on all of them alike
    and the ratios between them hold (timed one after another, the demo's models moved 1.6x
    between runs on a 2-core VM). ``budget_s`` is per function; ``devices``: each function's
    (default: the CPU)."""
    if repeats < 1 or warmup < 0 or budget_s <= 0:
        raise ValueError(f"time_calls: need repeats >= 1, warmup >= 0 and budget_s > 0, got {repeats}, {warmup}, "
                         f"{budget_s}")
    devices = ["cpu"] * len(fns) if devices is None else devices
    start, budget = time.perf_counter(), budget_s * len(fns)
    deadline, warm_until = start + budget, start + budget / 4  # warm-up: at most a quarter of the budget
    for _ in range(warmup):
        if time.perf_counter() >= warm_until:
            break
        for fn in fns:
            fn()
    samples = [[elapsed_ms(fn, device)] for fn, device in zip(fns, devices)]
    while len(samples[0]) < repeats and time.perf_counter() < deadline:
        for timed, fn, device in zip(samples, fns, devices):
            timed.append(elapsed_ms(fn, device))
    return [Latency(statistics.median(timed), len(timed)) for timed in samples]


def model_latency(model: nn.Module, example: Example, *, batch: int = 1, repeats: int = 20,
                  warmup: int = MODEL_WARMUP, budget_s: float = 2.0) -> Latency:
    """Latency of ``model``'s forward on ``batch`` examples on the model's device: a shape of one
    example (C, H, W) stands for zeros of (batch, C, H, W); example tensors are repeated along
    their batch dim to ``batch``. Eval mode under torch.inference_mode; the model's training flag
    is restored afterwards."""
    return models_latency([model], example, batch=batch, repeats=repeats, warmup=warmup, budget_s=budget_s)[0]


def models_latency(models: Sequence[nn.Module], example: Example, *, batch: int = 1, repeats: int = 20,
                   warmup: int = MODEL_WARMUP, budget_s: float = 2.0) -> list[Latency]:
    """``model_latency`` of each of ``models`` on the same example, timed in rounds
    (``time_rounds``): what a comparison of models (a packed model against its float one) needs.
    ``budget_s`` is per model."""
    if batch < 1:
        raise ValueError(f"model_latency: batch must be >= 1, got {batch}")
    inputs = [tuple(t[:1].expand(batch, *t.shape[1:]).contiguous()
                    for t in as_tensors(example, model, "model_latency")) for model in models]
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        with torch.inference_mode():
            return time_rounds([functools.partial(model, *tensors) for model, tensors in zip(models, inputs)],
                               repeats, warmup, [tensors[0].device for tensors in inputs], budget_s)
    finally:
        for model, training in zip(models, was_training):
            model.train(training)
