"""The quantization math that the reference ops, the SBS layers and the packer share: the compute
dtype, the straight-through primitives (``ste_round``, ``ste_gate``), the grid size of a bitwidth
(``levels``) and the clip-and-scale to [0, 1] (``normalize``).

``ste_gate`` and ``normalize`` state their backward in closed form, where the composite's
autograd would turn a NaN or inf input into NaN gradients the math does not have (their comments
say how).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

RoundFn = Callable[[Tensor], Tensor]
GateFn = Callable[[Tensor, Tensor], Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes in: float32 for half types, else the input's."""
    return torch.promote_types(dtype, torch.float32)


def ste_round(t: Tensor) -> Tensor:
    """round() half to even forward, identity backward (the forward value is exactly round(t))."""
    return torch.round(t).detach() + (t - t.detach())


class _SteGate(torch.autograd.Function):
    # Not hard + (soft - soft.detach()): with a NaN residual mean (a NaN anywhere in x) that sum is
    # NaN, and every gated offset, so the whole output, would be NaN instead of the hard gate's 0.
    @staticmethod
    def forward(a: Tensor, alpha: Tensor) -> Tensor:
        return (a > alpha).to(torch.promote_types(a.dtype, alpha.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, alpha = ctx.saved_tensors
        soft = torch.sigmoid(a - alpha)
        return None, (-grad * soft * (1 - soft)).sum_to_size(alpha.shape).to(alpha.dtype)


def ste_gate(a: Tensor, alpha: Tensor) -> Tensor:
    """Hard gate 1[a > alpha] forward (exactly 0 or 1, also for a NaN ``a``), d/d(alpha) of
    sigmoid(a - alpha) backward (NaN for a NaN ``a``).

    ``a`` (the mean |residual|) gets no gradient: none reaches x through the gate.
    """
    return _SteGate.apply(a.detach(), alpha)


def levels(bits: int) -> int:
    """Number of quantization steps of a b-bit grid on [0, 1]: 2^b - 1 (s = 1 / levels)."""
    return (1 << bits) - 1


class _Normalize(torch.autograd.Function):
    # Autograd of the composite would take d z / d v as clamp's gradient (0 outside the range)
    # times x * -(1/v)^2, which overflows for x = +-inf or a tiny v: 0 * inf = NaN, where the
    # closed form (a select, as in the kernels) gives the exact 0.
    @staticmethod
    def forward(x: Tensor, clip: Tensor, signed: bool, zero_point: Tensor | None) -> Tensor:
        t = x * (1.0 / clip)
        if signed:
            return (t.clamp(-1.0, 1.0) + 1.0) * 0.5
        return (t if zero_point is None else t + zero_point).clamp(0.0, 1.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, clip, ctx.signed, zero_point = inputs
        ctx.has_zero_point = zero_point is not None
        ctx.save_for_backward(x, clip, zero_point)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, clip, zero_point = ctx.saved_tensors
        inverse = 1.0 / clip
        t = x * inverse
        u = t + zero_point if ctx.has_zero_point else t
        inside = (u > (-1.0 if ctx.signed else 0.0)) & (u < 1.0)  # open, as torch.clamp's gradient
        slope = grad * 0.5 if ctx.signed else grad  # d z / d t inside
        grad_x = torch.where(inside, slope * inverse, 0.0)
        grad_zero_point = torch.where(inside, slope, 0.0).sum() if ctx.has_zero_point else None
        return grad_x, -torch.where(inside, slope * t, 0.0).sum() * inverse, None, grad_zero_point


def normalize(x: Tensor, clip: Tensor, signed: bool, zero_point: Tensor | None = None) -> Tensor:
    """z in [0, 1]: (clamp(x / v, -1, 1) + 1) / 2 when signed, clamp(x / v + z0, 0, 1) otherwise
    (z0 = ``zero_point``, the asymmetric grid's zero point; None: the plain unsigned grid).

    Gradients: d z / d x = s / v, d z / d v = -s (x / v) / v and d z / d z0 = 1 inside the open clip
    range (s = 1/2 signed, 1 unsigned), 0 outside it (also for x = +-inf and for NaN).
    """
    return _Normalize.apply(x, clip, signed, zero_point)


def zero_point(offset: Tensor, lowest_bits: int, dtype: torch.dtype) -> Tensor:
    """The asymmetric grid's zero point z0 = D(clamp(o, 0, 1), b_1) of a learnable offset o, in dtype.

    D is spelled as every backend spells its quantizer (rint(t * n) * (1 / n)), so that z0 is a
    level of the lowest grid exactly (D(z0, b_1) == z0), and so of every candidate grid: x = 0
    maps to y = 0 exactly. Straight-through in backward: d z0 / d o = 1 (also outside [0, 1], so
    that an offset pushed past a bound can come back).
    """
    o = offset.to(dtype)
    o = o + (o.clamp(0.0, 1.0) - o).detach()
    n = levels(lowest_bits)
    return ste_round(o * n) * (1.0 / n)
