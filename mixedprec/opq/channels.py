"""Unified channel-wise quantization: per-output-channel scales and normalized weights.

Each output channel c is divided by its Laplace scale fit b_c = mean|w_c| (the maximum-likelihood
scale of a zero-mean Laplace), after which every channel of the layer follows the same
Laplace(0, 1) and can share one codebook. The scale is stored in fp16 when every channel's scale
is a normal fp16 number, else in fp32; the value used for quantizing is the stored one.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FP16 = torch.finfo(torch.float16)


def channel_scales(weight: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """(scales as float32 (C,), |u| = |w| * (1 / scale_c) as float32, the scales' storage dtype).

    All-zero channels get the layer's smallest positive scale (their weights are zero: the scale
    only has to be valid). |w| * (1 / s) is bitwise |w * (1 / s)|, the op's z, as s > 0.
    """
    magnitude = weight.detach().float().abs()
    scale = magnitude.reshape(magnitude.shape[0], -1).mean(1)
    positive = scale[scale > 0]
    scale = torch.where(scale > 0, scale, positive.min() if positive.numel() else scale.new_ones(()))
    fits_fp16 = bool(((scale >= _FP16.tiny) & (scale <= _FP16.max)).all())
    dtype = torch.float16 if fits_fp16 else torch.float32
    scale = scale.to(dtype).float()
    return scale, normalized_magnitude(magnitude, scale), dtype


def normalized_magnitude(weight: Tensor, channel_scale: Tensor) -> Tensor:
    """|u| = |w * (1 / scale_c)|, float32, spelled as the codebook_quant op spells z."""
    channel_shape = (-1,) + (1,) * (weight.dim() - 1)
    return (weight.detach().float() * (1.0 / channel_scale).reshape(channel_shape)).abs_()


def keep_mask(magnitude: Tensor, threshold: float, dense: bool) -> Tensor:
    """Kept iff |u| >= threshold; a dense layer (no bitmap stored) keeps everything."""
    if dense:
        return torch.ones_like(magnitude, dtype=torch.bool)
    return magnitude >= threshold


def threshold_keeping(magnitude: Tensor, kept: int) -> float:
    """The threshold that keeps the ``kept`` largest |u| (ties at it are kept too; zeros never)."""
    flat = magnitude.reshape(-1)
    if kept <= 0:
        return float(torch.nextafter(flat.max(), torch.tensor(float("inf"))))
    t = float(torch.kthvalue(flat, flat.numel() - kept + 1).values)
    if t == 0.0:  # pruning an exact zero costs nothing: keep only nonzero weights
        t = float(torch.nextafter(torch.tensor(0.0), torch.tensor(1.0)))
    return t
