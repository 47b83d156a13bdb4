"""SBS bit-sharing fake-quant in Triton (math: csrc/include/mixedprec/bit_sharing.h).

Each program owns BLOCK consecutive elements. Forward: a stats kernel writes per-program sums of
|r_j| (4 B/elem read), torch adds them up in float64, then an apply kernel maps x to y (8 B/elem)
with the gates read from device memory (no host sync); ``residual_sums`` is the first half alone
and ``forward`` given residual means the second (distributed training reduces the sums over
ranks in between). Backward: one kernel writes grad_x and
per-program sums of grad_y * dy/dv and grad_y * T_j (12 B/elem).

Arithmetic is spelled as in the C++ and CUDA kernels: 1/v and 1/n_b come precomputed from the
host (Triton's fp32 division is approximate on GPUs), rounding is half to even, FMA contraction
is off, and the gated offsets are folded from the innermost one outwards (recomputing the
residual chain per level: K <= 8, and the kernel is memory-bound). The unsigned grid's zero
point z0 (the asymmetric grid; 0 when none is given) is read from device memory like the clip.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixedprec.backends.triton.common import BLOCK, LAUNCH_OPTIONS, grid, output_like, to_float32, to_storage


@triton.jit
def _round_half_even(t):
    # Adding and removing 1.5 * 2^23 rounds to an integer, ties to even, for |t| < 2^22
    # (here |t| <= 2^16 - 1); NaN passes through.
    return (t + 12582912.0) - 12582912.0


@triton.jit
def _shift(t, z0, SIGNED: tl.constexpr):
    """u = t (signed) or t + z0 (unsigned): what is clamped, and whose open range passes gradient."""
    if SIGNED:
        return t
    return t + z0


@triton.jit
def _normalize(t, z0, SIGNED: tl.constexpr):
    lo: tl.constexpr = -1.0 if SIGNED else 0.0
    u = _shift(t, z0, SIGNED)
    c = tl.where(u < lo, lo, tl.where(u > 1.0, 1.0, u))  # NaN passes, like torch.clamp
    if SIGNED:
        c = (c + 1.0) * 0.5
    return c


@triton.jit
def _quantize(t, levels_ptr, j: tl.constexpr):
    n = tl.load(levels_ptr + j)
    inv_n = tl.load(levels_ptr + 8 + j)
    return _round_half_even(t * n) * inv_n


@triton.jit
def _offset(z, levels_ptr, J: tl.constexpr):
    """e_{J+1} (0-based J >= 1): runs the residual chain q_1, ..., q_J, then quantizes z - q_J."""
    q = _quantize(z, levels_ptr, 0)
    for j in tl.static_range(1, J):
        q = q + _quantize(z - q, levels_ptr, j)
    return _quantize(z - q, levels_ptr, J)


@triton.jit
def _gated_tail(z, levels_ptr, gates_ptr, tail, J: tl.constexpr, NUM_BITS: tl.constexpr):
    """T_J = e_J + g_J T_{J+1} (0-based J >= 1), the innermost offset alone: folded from the
    innermost outwards, as every backend spells it."""
    t = _offset(z, levels_ptr, J)
    if J < NUM_BITS - 1:
        t = t + tl.load(gates_ptr + J) * tail
    return t


@triton.jit
def _z_hat(z, levels_ptr, gates_ptr, tail, NUM_BITS: tl.constexpr):
    z_hat = _quantize(z, levels_ptr, 0)
    if NUM_BITS > 1:
        z_hat = z_hat + tl.load(gates_ptr) * tail
    return z_hat


@triton.jit
def _unit_output(z_hat, z0, SIGNED: tl.constexpr):
    """y / v: 2 z_hat - 1 on the signed grid, z_hat - z0 otherwise."""
    if SIGNED:
        u = 2.0 * z_hat - 1.0
    else:
        u = z_hat - z0
    return u


@triton.jit
def _stats_kernel(x_ptr, n, inv_clip_ptr, zero_point_ptr, levels_ptr, partial_ptr,
                  NUM_BITS: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = to_float32(tl.load(x_ptr + offs, mask=mask, other=0.0))
    z = _normalize(x * tl.load(inv_clip_ptr), tl.load(zero_point_ptr), SIGNED)
    q = _quantize(z, levels_ptr, 0)
    for j in tl.static_range(1, NUM_BITS):
        r = z - q
        tl.store(partial_ptr + pid * NUM_BITS + j, tl.sum(tl.where(mask, tl.abs(r), 0.0), axis=0))
        q = q + _quantize(r, levels_ptr, j)


@triton.jit
def _apply_kernel(x_ptr, y_ptr, n, clip_ptr, inv_clip_ptr, zero_point_ptr, levels_ptr, gates_ptr,
                  NUM_BITS: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = to_float32(tl.load(x_ptr + offs, mask=mask, other=0.0))
    z0 = tl.load(zero_point_ptr)
    z = _normalize(x * tl.load(inv_clip_ptr), z0, SIGNED)
    tail = tl.zeros_like(z)
    for j in tl.static_range(NUM_BITS - 1, 0, -1):
        tail = _gated_tail(z, levels_ptr, gates_ptr, tail, j, NUM_BITS)
    y = tl.load(clip_ptr) * _unit_output(_z_hat(z, levels_ptr, gates_ptr, tail, NUM_BITS), z0, SIGNED)
    tl.store(y_ptr + offs, to_storage(y, y_ptr), mask=mask)


@triton.jit
def _backward_kernel(grad_y_ptr, x_ptr, grad_x_ptr, n, inv_clip_ptr, zero_point_ptr, levels_ptr, gates_ptr, partial_ptr,
                     NUM_BITS: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = to_float32(tl.load(grad_y_ptr + offs, mask=mask, other=0.0))
    t = to_float32(tl.load(x_ptr + offs, mask=mask, other=0.0)) * tl.load(inv_clip_ptr)
    lo: tl.constexpr = -1.0 if SIGNED else 0.0
    z0 = tl.load(zero_point_ptr)
    u = _shift(t, z0, SIGNED)
    inside = (u > lo) & (u < 1.0)  # open interval, as torch.clamp's gradient
    tl.store(grad_x_ptr + offs, to_storage(tl.where(inside, g, 0.0), grad_x_ptr), mask=mask)
    z = _normalize(t, z0, SIGNED)
    tail = tl.zeros_like(z)
    for j in tl.static_range(NUM_BITS - 1, 0, -1):
        tail = _gated_tail(z, levels_ptr, gates_ptr, tail, j, NUM_BITS)
        tl.store(partial_ptr + pid * NUM_BITS + j, tl.sum(tl.where(mask, g * tail, 0.0), axis=0))
    direct = _unit_output(_z_hat(z, levels_ptr, gates_ptr, tail, NUM_BITS), z0, SIGNED)
    clip_grad = tl.where(inside, direct - t, direct)
    tl.store(partial_ptr + pid * NUM_BITS, tl.sum(tl.where(mask, g * clip_grad, 0.0), axis=0))


def _levels(bits: list[int], device: torch.device) -> Tensor:
    """[n_1..n_8, 1/n_1..1/n_8] in float32 (1/n rounded once, as every backend does)."""
    levels = torch.ones(8, dtype=torch.float32)
    levels[: len(bits)] = torch.tensor([float((1 << b) - 1) for b in bits])
    return torch.cat([levels, 1.0 / levels]).to(device)


def _zero_point(zero_point: Tensor | None, clip: Tensor) -> Tensor:
    """z0 as a 1-element float32 tensor on clip's device (0: the plain unsigned grid)."""
    return clip.new_zeros(1) if zero_point is None else zero_point.reshape(1)


def residual_sums(x: Tensor, clip: Tensor, bits: list[int], signed: bool,
                  zero_point: Tensor | None = None) -> Tensor:
    """sum |r_j| over x for j = 2..K, float64 (K-1,)."""
    n, k = x.numel(), len(bits)
    if k == 1:
        return torch.zeros(0, dtype=torch.float64, device=x.device)
    partial = torch.zeros(grid(n)[0], k, dtype=torch.float32, device=x.device)
    _stats_kernel[grid(n)](x, n, (1.0 / clip).reshape(1), _zero_point(zero_point, clip), _levels(bits, x.device),
                           partial, NUM_BITS=k, SIGNED=signed, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return partial[:, 1:].sum(0, dtype=torch.float64)


def forward(x: Tensor, clip: Tensor, thresholds: Tensor, bits: list[int], signed: bool,
            residual_mean: Tensor | None = None, zero_point: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(y, residual_mean); given residual means, the gates come from them (returned as a copy)."""
    n, k = x.numel(), len(bits)
    if residual_mean is None:
        residual_mean = (residual_sums(x, clip, bits, signed, zero_point) / n).float()
    else:
        residual_mean = residual_mean.clone()
    y = output_like(x)
    gates = (residual_mean > thresholds).float()
    _apply_kernel[grid(n)](x, y, n, clip.reshape(1), (1.0 / clip).reshape(1), _zero_point(zero_point, clip),
                           _levels(bits, x.device), gates, NUM_BITS=k, SIGNED=signed, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return y, residual_mean


def backward(grad_y: Tensor, x: Tensor, clip: Tensor, gates: Tensor, bits: list[int], signed: bool,
             zero_point: Tensor | None = None) -> tuple[Tensor, Tensor]:
    n, k = x.numel(), len(bits)
    grad_x = output_like(x)
    partial = torch.empty(grid(n)[0], k, dtype=torch.float32, device=x.device)
    _backward_kernel[grid(n)](grad_y, x, grad_x, n, (1.0 / clip).reshape(1), _zero_point(zero_point, clip),
                               _levels(bits, x.device), gates, partial, NUM_BITS=k, SIGNED=signed, BLOCK=BLOCK,
                               **LAUNCH_OPTIONS)
    return grad_x, partial.sum(0, dtype=torch.float64).float()
