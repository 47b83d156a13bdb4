"""Codebooks of the unified channel-wise quantizer (docs/opq.md, "Codebooks").

Kept normalized weights are u = +-(t + e) with e ~ Exp(1) whatever the threshold t (the
exponential is memoryless). A b-bit codebook is therefore built from 2^{b-1} levels c_i for the
magnitude excess e, mirrored: {-(t + c_i)} U {t + c_i}. Its mean squared error per kept weight,
D_b, does not depend on t and is computed once per (b, kind).

Two kinds of magnitude levels:
- "lloyd": the Lloyd-Max (minimum-MSE) quantizer of Exp(1), solved exactly by a recursion from
  the top cell (memorylessness makes every cell's shape depend only on its width).
- "uniform": levels (i + 1/2) * step, cells [i * step, (i + 1) * step), the top cell open; step
  minimizes the MSE.
Both put decision thresholds half-way between levels, so nearest-level rounding (the
``codebook_quant`` op) realizes exactly the quantizer whose error D_b is predicted here.
"""
from __future__ import annotations

import math
from functools import lru_cache

from mixedprec.opq.laplace import exp_cell_error

LEVEL_KINDS = ("lloyd", "uniform")
MAX_BITS = 8


def _check(bits: int, kind: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")
    if kind not in LEVEL_KINDS:
        raise ValueError(f"levels must be one of {LEVEL_KINDS}, got {kind!r}")


def _centroid_offset(width: float) -> float:
    """Mean of Exp(1) on [a, a + width) minus a: 1 - width / (e^width - 1)."""
    return 1.0 - width / math.expm1(width) if width > 1e-12 else width / 2.0


def _width_for_upper_gap(gap: float) -> float:
    """The cell width whose centroid lies ``gap`` below the cell's upper edge (bisection).

    width - _centroid_offset(width) increases from 0 (slope >= 1/2), so the root is unique and
    lies in (0, 2 gap + 2).
    """
    lo, hi = 0.0, 2.0 * gap + 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid - _centroid_offset(mid) < gap:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _lloyd_max(count: int) -> tuple[float, ...]:
    """Lloyd-Max levels of Exp(1): centroid and midpoint conditions solved from the top down.

    The open top cell [x, inf) has its centroid at x + 1, so the gap from its lower edge to its
    level is 1. The midpoint condition puts the level below at the same gap under that edge;
    the cell below is then the one whose centroid sits that gap under its upper edge, which fixes
    its width and the next gap. The bottom cell starts at 0.
    """
    widths, gap = [], 1.0  # widths of the cells below the top one, from the top down
    for _ in range(count - 1):
        width = _width_for_upper_gap(gap)
        widths.append(width)
        gap = _centroid_offset(width)
    edge, levels = 0.0, []
    for width in reversed(widths):
        levels.append(edge + _centroid_offset(width))
        edge += width
    levels.append(edge + 1.0)
    return tuple(levels)


def _uniform_error(step: float, count: int) -> float:
    return sum(exp_cell_error(i * step, (i + 1) * step if i < count - 1 else math.inf, (i + 0.5) * step)
               for i in range(count))


def _uniform(count: int) -> tuple[float, ...]:
    """Levels (i + 1/2) step with the MSE-optimal step (golden-section search; unimodal)."""
    lo, hi = 1e-4, 4.0
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(120):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _uniform_error(a, count) < _uniform_error(b, count):
            hi = b
        else:
            lo = a
    step = 0.5 * (lo + hi)
    return tuple((i + 0.5) * step for i in range(count))


@lru_cache(maxsize=None)
def magnitude_levels(bits: int, kind: str = "lloyd") -> tuple[float, ...]:
    """The 2^{bits-1} ascending levels for the excess e ~ Exp(1) of kept magnitudes over t."""
    _check(bits, kind)
    count = 1 << (bits - 1)
    return _lloyd_max(count) if kind == "lloyd" else _uniform(count)


@lru_cache(maxsize=None)
def quantization_error(bits: int, kind: str = "lloyd") -> float:
    """D_b: mean squared error per kept weight of nearest-level rounding to ``magnitude_levels``."""
    levels = magnitude_levels(bits, kind)
    edges = [0.0] + [(a + b) / 2.0 for a, b in zip(levels, levels[1:])] + [math.inf]
    return sum(exp_cell_error(edges[i], edges[i + 1], c) for i, c in enumerate(levels))


def layer_codebook(threshold: float, bits: int, kind: str = "lloyd") -> list[float]:
    """The layer's sorted 2^bits levels in normalized units: {-(t + c_i)} U {t + c_i}."""
    positive = [threshold + c for c in magnitude_levels(bits, kind)]
    return [-v for v in reversed(positive)] + positive
