"""The analytical pieces of OPQ against numerical integration and sampling: the Laplace pruning
error, the Lloyd-Max and uniform codebooks of the exponential, and memorylessness."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mixedprec.opq import codebooks, laplace
from mixedprec.opq.codebooks import layer_codebook, magnitude_levels, quantization_error

GRID = np.linspace(0.0, 40.0, 400_001)  # |u| ~ Exp(1): the mass beyond 40 is e^-40


def integrate(values):
    return np.trapezoid(values * np.exp(-GRID), GRID)


def nearest_level_error(levels):
    """MSE of nearest-level rounding of e ~ Exp(1), by quadrature (independent of codebooks.py)."""
    levels = np.asarray(levels)
    q = levels[np.abs(GRID[:, None] - levels[None, :]).argmin(1)] if len(levels) < 64 else \
        levels[np.clip(np.searchsorted((levels[1:] + levels[:-1]) / 2, GRID), 0, len(levels) - 1)]
    return integrate((GRID - q) ** 2)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 6.0])
def test_pruning_error_and_keep_fraction_match_quadrature(t):
    assert laplace.pruning_error(t) == pytest.approx(integrate(GRID**2 * (GRID < t)), rel=1e-3, abs=1e-9)  # the cut costs h/2
    assert laplace.keep_fraction(t) == pytest.approx(integrate((GRID >= t).astype(float)), rel=1e-3)
    assert laplace.pruning_error_for_keep(laplace.keep_fraction(t)) == pytest.approx(laplace.pruning_error(t))


def test_pruning_everything_costs_the_whole_second_moment():
    assert laplace.pruning_error_for_keep(0.0) == 2.0


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", codebooks.LEVEL_KINDS)
def test_predicted_quantization_error_matches_quadrature(bits, kind):
    levels = magnitude_levels(bits, kind)
    assert len(levels) == 1 << (bits - 1) and all(a < b for a, b in zip(levels, levels[1:]))
    assert quantization_error(bits, kind) == pytest.approx(nearest_level_error(levels), rel=1e-3)


@pytest.mark.parametrize("bits", range(1, 9))
def test_lloyd_max_levels_are_centroids_of_midpoint_cells(bits):
    levels = np.array(magnitude_levels(bits, "lloyd"))
    edges = np.concatenate([[0.0], (levels[1:] + levels[:-1]) / 2, [np.inf]])
    for lo, hi, level in zip(edges, edges[1:], levels):
        inside = (GRID >= lo) & (GRID < hi)
        centroid = integrate(GRID * inside) / integrate(inside.astype(float))
        assert centroid == pytest.approx(level, abs=1e-4 + 1e-3 * (hi - lo if np.isfinite(hi) else 1))


@pytest.mark.parametrize("bits", range(1, 9))
def test_lloyd_max_beats_uniform_and_uniform_step_is_optimal(bits):
    assert quantization_error(bits, "lloyd") <= quantization_error(bits, "uniform") + 1e-12
    levels = np.array(magnitude_levels(bits, "uniform"))
    step = 2 * levels[0]
    best = nearest_level_error(levels)
    for factor in (0.97, 1.03):
        assert nearest_level_error((np.arange(len(levels)) + 0.5) * step * factor) > best


def test_each_bit_cuts_the_error_by_about_four_at_high_resolution():
    errors = [quantization_error(b) for b in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert all(0.2 < b / a < 0.3 for a, b in zip(errors[4:], errors[5:]))


@pytest.mark.parametrize("t", [0.2, 1.5])
@pytest.mark.parametrize("bits", [1, 3, 6])
def test_kept_weights_error_does_not_depend_on_the_threshold(t, bits):
    """Memorylessness: on Laplace samples, the codebook +-(t + c_i) quantizes kept weights with
    error D_b whatever t is."""
    rng = np.random.default_rng(bits)
    u = rng.laplace(size=2_000_000)
    kept = u[np.abs(u) >= t]
    codebook = np.array(layer_codebook(t, bits))
    q = codebook[np.searchsorted((codebook[1:] + codebook[:-1]) / 2, kept)]
    assert np.mean((kept - q) ** 2) == pytest.approx(quantization_error(bits), rel=0.03)


def test_layer_codebook_is_symmetric_sorted_and_starts_at_the_threshold():
    codebook = layer_codebook(0.8, 3)
    assert len(codebook) == 8 and codebook == sorted(codebook)
    assert codebook == [-v for v in reversed(codebook)]
    assert min(v for v in codebook if v > 0) == pytest.approx(0.8 + magnitude_levels(3)[0])


def test_bad_bits_or_kind_are_refused():
    with pytest.raises(ValueError, match="bits"):
        magnitude_levels(9)
    with pytest.raises(ValueError, match="levels"):
        magnitude_levels(2, "log")


def test_exp_cell_error_of_the_whole_line_is_the_second_moment_about_the_level():
    assert laplace.exp_cell_error(0.0, math.inf, 1.0) == pytest.approx(1.0)  # variance of Exp(1)
