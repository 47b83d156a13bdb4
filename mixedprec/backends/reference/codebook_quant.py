"""OPQ's codebook fake-quant as a differentiable composite."""
from __future__ import annotations

import torch
from torch import Tensor

from mixedprec.backends.reference.quant import compute_dtype


def codebook_quant(weight: Tensor, codebook: Tensor, channel_scale: Tensor, keep_mask: Tensor) -> Tensor:
    """Masked nearest-level quantization to a sorted codebook with one scale per output channel.

    The semantics every backend follows are written out in ``mixedprec.ops.codebook_quant``.
    Codebook and scales are frozen: no gradient reaches them.
    """
    dtype = compute_dtype(weight.dtype)
    w = weight.to(dtype)
    levels = codebook.detach().to(dtype)
    inv_scale = 1.0 / channel_scale.detach().to(dtype)
    channel_shape = (-1,) + (1,) * (weight.dim() - 1)
    z = w.detach() * inv_scale.reshape(channel_shape)
    midpoints = (levels[:-1] + levels[1:]) * 0.5
    index = torch.searchsorted(midpoints, z.contiguous(), side="left")  # #{j : midpoint_j < z}
    q = channel_scale.detach().to(dtype).reshape(channel_shape) * levels[index]
    # Forward exactly q (NaN where w is not finite), gradient 1 to the latent weight; then the
    # mask zeroes both the value and the gradient of pruned weights.
    y = q + (w - w.detach())
    return torch.where(keep_mask, y, torch.zeros((), dtype=dtype, device=w.device)).to(weight.dtype)
