"""What the benchmark scripts share: wall-clock timing for their tables (the package's,
``mixedprec.metrics.latency``; pytest-benchmark times the rest) and the backends a table compares
on a device."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mixedprec import ops
from mixedprec.metrics.latency import elapsed_ms, time_calls  # noqa: F401 (elapsed_ms: bench_qat_step, bench_e2e)

# Per device type, the backends whose kernels a table times; the first one is "ours", the one
# the ratios are taken against.
TABLE_BACKENDS = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def our_backend(device: torch.device | str) -> str:
    return TABLE_BACKENDS[torch.device(device).type][0]


def table_backends(device: torch.device | str) -> list[str]:
    """TABLE_BACKENDS of the device that can run here, in that order."""
    device = torch.device(device)
    usable = ops.available_backends(device)
    return [b for b in TABLE_BACKENDS[device.type] if b in usable]


def time_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 2, device: torch.device | str = "cpu") -> float:
    """Median wall time of one call of ``fn`` in milliseconds (``mixedprec.metrics.latency``)."""
    return time_calls(fn, repeats, warmup, device).median_ms


def device_ms(fn: Callable[[], object], repeats: int = 20, device: torch.device | str = "cuda") -> float:
    """Time a CUDA device spends running kernels per call of ``fn`` (summed by the profiler), in
    milliseconds: what a kernel's achieved bandwidth is computed from, without the host's
    launch overhead between kernels. ``fn`` is warmed up once first."""
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize(device)
    kernel_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    if kernel_us <= 0:
        raise RuntimeError("device_ms: the profiler recorded no CUDA kernel (is CUPTI available?)")
    return kernel_us / repeats / 1e3
