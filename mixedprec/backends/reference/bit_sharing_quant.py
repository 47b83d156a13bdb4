"""The SBS bit-sharing fake-quant as a differentiable composite (DESIGN.md "SBS math")."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mixedprec.backends.reference.quant import GateFn, RoundFn, compute_dtype, levels, normalize, ste_gate, ste_round


def _decompose(z: Tensor, bits: Sequence[int], round_fn: RoundFn) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(q_1, [e_2..e_K], [r_2..r_K]) of normalized values z."""
    def quantize(t: Tensor, b: int) -> Tensor:
        n = levels(b)
        return round_fn(t * n) * (1.0 / n)

    q = quantize(z, bits[0])
    base, offsets, residuals = q, [], []
    for b in bits[1:]:
        r = z - q
        e = quantize(r, b)
        residuals.append(r)
        offsets.append(e)
        q = q + e
    return base, offsets, residuals


def bit_sharing_residual_sums(x: Tensor, clip: Tensor, bits: Sequence[int], signed: bool,
                              zero_point: Tensor | None = None) -> Tensor:
    """sum |r_j| over x for j = 2..K, float64 (K-1,): the statistic behind the gates, in a form
    that adds up over the shards of a batch (distributed training)."""
    dtype = compute_dtype(x.dtype)
    z0 = None if zero_point is None else zero_point.detach().to(dtype)
    z = normalize(x.detach().to(dtype), clip.detach().to(dtype), signed, z0)
    _, _, residuals = _decompose(z, bits, torch.round)
    return torch.stack([r.abs().sum(dtype=torch.float64) for r in residuals]) if residuals else \
        torch.zeros(0, dtype=torch.float64, device=x.device)


def bit_sharing_quant(
    x: Tensor,
    clip: Tensor,
    thresholds: Tensor,
    bits: Sequence[int],
    signed: bool,
    *,
    residual_mean: Tensor | None = None,
    zero_point: Tensor | None = None,
    round_fn: RoundFn = ste_round,
    gate_fn: GateFn = ste_gate,
) -> tuple[Tensor, Tensor]:
    """SBS bit-sharing fake-quant. Returns (y, residual_mean).

    q_1 = D(z, s_1); r_j = z - q_{j-1}; e_j = D(r_j, s_j); q_j = q_{j-1} + e_j;
    a_j = mean|r_j|; g_j = 1[a_j > alpha_j];
    z_hat = q_1 + g_2 (e_2 + g_3 (e_3 + ...)); y = v (2 z_hat - 1) or v (z_hat - z0).
    ``zero_point`` (unsigned only): z0 of the asymmetric grid, z = clamp(x / v + z0, 0, 1) (None: 0).
    ``residual_mean`` holds a_2..a_K (shape (K-1,), detached); when given (float32, e.g. the
    means over every rank's batch), the gates take it in place of the means over x.
    """
    dtype = compute_dtype(x.dtype)
    xc, clip_c, thr_c = x.to(dtype), clip.to(dtype), thresholds.to(dtype)
    z0 = None if zero_point is None else zero_point.to(dtype)
    z = normalize(xc, clip_c, signed, z0)
    base, offsets, residuals = _decompose(z, bits, round_fn)
    if residual_mean is None:
        residual_mean = torch.stack([r.detach().abs().mean() for r in residuals]) if residuals else xc.new_zeros(0)
    residual_mean = residual_mean.detach().to(dtype)

    tail = None
    for j in reversed(range(len(offsets))):
        g = gate_fn(residual_mean[j], thr_c[j])
        tail = g * offsets[j] if tail is None else g * (offsets[j] + tail)
    z_hat = base if tail is None else base + tail
    if signed:
        y = clip_c * (2.0 * z_hat - 1.0)
    else:
        y = clip_c * z_hat if z0 is None else clip_c * (z_hat - z0)
    return y.to(x.dtype), residual_mean.to(torch.float32)
