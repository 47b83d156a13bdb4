"""The Laplace model of channel-normalized weights (docs/opq.md, "Model").

A layer's weights are divided by their output channel's scale (``channels.py``); the normalized
weights u are modelled as Laplace(0, 1), so |u| ~ Exp(1) and E[u^2] = 2. Errors are mean squared
errors per weight in these normalized units.
"""
from __future__ import annotations

import math

import numpy as np


def keep_fraction(threshold):
    """P(|u| >= t) = e^{-t}: the share of weights that pruning |u| < t keeps."""
    return np.exp(-np.asarray(threshold, dtype=np.float64))


def threshold_for_keep(keep):
    """The threshold t with keep_fraction(t) = keep (0 < keep <= 1)."""
    return -np.log(np.asarray(keep, dtype=np.float64))


def pruning_error(threshold):
    """E[u^2 1{|u| < t}] = 2 - e^{-t} (t^2 + 2t + 2): the error of zeroing |u| < t, per weight."""
    t = np.asarray(threshold, dtype=np.float64)
    return 2.0 - np.exp(-t) * (t * t + 2.0 * t + 2.0)


def pruning_error_for_keep(keep):
    """pruning_error(threshold_for_keep(keep)), also for keep = 0 (everything pruned: error 2)."""
    keep = np.asarray(keep, dtype=np.float64)
    t = -np.log(np.maximum(keep, np.finfo(np.float64).tiny))
    return np.where(keep > 0, pruning_error(t), 2.0)


def exp_cell_error(lower: float, upper: float, level: float) -> float:
    """int_lower^upper (x - level)^2 e^{-x} dx: one quantizer cell's share of the error on Exp(1).

    An antiderivative of (x - c)^2 e^{-x} is -e^{-x} ((x - c)^2 + 2 (x - c) + 2); upper may be inf.
    """
    def antiderivative(x: float) -> float:
        if math.isinf(x):
            return 0.0
        y = x - level
        return -math.exp(-x) * (y * y + 2.0 * y + 2.0)

    return antiderivative(upper) - antiderivative(lower)
