"""Wall-clock timing shared by the benchmark scripts' tables (pytest-benchmark times the rest)."""
from __future__ import annotations

import time
from collections.abc import Callable


def time_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time of one call of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2] * 1e3
