"""Pure-PyTorch composite version of every op: the test oracle and the fallback backend.

Each function is written the way the papers state the math (DESIGN.md), out of differentiable
torch ops, so that autograd of the composite *is* the reference backward. Straight-through
pieces are expressed by two primitives, ``ste_round`` and ``ste_gate`` (hard value forward,
surrogate gradient backward); a float64 gradcheck swaps them for smooth twins with the same
derivatives (tests/test_bit_sharing.py). ``ste_gate`` and ``normalize`` state their backward in
closed form, where the composite's autograd would turn a NaN or inf input into NaN gradients
the math does not have (their comments say how).

Arithmetic is spelled exactly as the kernels spell it (``x * (1 / clip)``, ``rint(z * n) * (1 / n)``,
the gated sum folded from the innermost offset outwards) so that a float32 kernel and this
composite in float32 agree bit for bit; float16/bfloat16 inputs are computed in float32.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

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
    def forward(x: Tensor, clip: Tensor, signed: bool) -> Tensor:
        t = x * (1.0 / clip)
        if signed:
            return (t.clamp(-1.0, 1.0) + 1.0) * 0.5
        return t.clamp(0.0, 1.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, clip, ctx.signed = inputs
        ctx.save_for_backward(x, clip)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, clip = ctx.saved_tensors
        inverse = 1.0 / clip
        t = x * inverse
        inside = (t > (-1.0 if ctx.signed else 0.0)) & (t < 1.0)  # open, as torch.clamp's gradient
        slope = grad * 0.5 if ctx.signed else grad  # d z / d t inside
        grad_x = torch.where(inside, slope * inverse, 0.0)
        return grad_x, -torch.where(inside, slope * t, 0.0).sum() * inverse, None


def normalize(x: Tensor, clip: Tensor, signed: bool) -> Tensor:
    """z in [0, 1]: (clamp(x / v, -1, 1) + 1) / 2 when signed, clamp(x / v, 0, 1) otherwise.

    Gradients: d z / d x = s / v and d z / d v = -s (x / v) / v inside the open clip range (s = 1/2
    signed, 1 unsigned), 0 outside it (also for x = +-inf and for NaN).
    """
    return _Normalize.apply(x, clip, signed)


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


def bit_sharing_residual_sums(x: Tensor, clip: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """sum |r_j| over x for j = 2..K, float64 (K-1,): the statistic behind the gates, in a form
    that adds up over the shards of a batch (distributed training)."""
    dtype = compute_dtype(x.dtype)
    z = normalize(x.detach().to(dtype), clip.detach().to(dtype), signed)
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
    round_fn: RoundFn = ste_round,
    gate_fn: GateFn = ste_gate,
) -> tuple[Tensor, Tensor]:
    """SBS bit-sharing fake-quant. Returns (y, residual_mean).

    q_1 = D(z, s_1); r_j = z - q_{j-1}; e_j = D(r_j, s_j); q_j = q_{j-1} + e_j;
    a_j = mean|r_j|; g_j = 1[a_j > alpha_j];
    z_hat = q_1 + g_2 (e_2 + g_3 (e_3 + ...)); y = v (2 z_hat - 1) or v z_hat.
    ``residual_mean`` holds a_2..a_K (shape (K-1,), detached); when given (float32, e.g. the
    means over every rank's batch), the gates take it in place of the means over x.
    """
    dtype = compute_dtype(x.dtype)
    xc, clip_c, thr_c = x.to(dtype), clip.to(dtype), thresholds.to(dtype)
    z = normalize(xc, clip_c, signed)
    base, offsets, residuals = _decompose(z, bits, round_fn)
    if residual_mean is None:
        residual_mean = torch.stack([r.detach().abs().mean() for r in residuals]) if residuals else xc.new_zeros(0)
    residual_mean = residual_mean.detach().to(dtype)

    tail = None
    for j in reversed(range(len(offsets))):
        g = gate_fn(residual_mean[j], thr_c[j])
        tail = g * offsets[j] if tail is None else g * (offsets[j] + tail)
    z_hat = base if tail is None else base + tail
    y = clip_c * (2.0 * z_hat - 1.0) if signed else clip_c * z_hat
    return y.to(x.dtype), residual_mean.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# codebook_quant (OPQ)

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


# ---------------------------------------------------------------------------------------------
# lowbit_linear (packed low-bit weights)

def lowbit_linear(x: Tensor, packed, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b with W = packed.decode() in float64 (the oracle; materializes W).

    Differentiable in x and bias; the packed weight gets no gradient. Output in x's dtype.
    """
    weight = packed.decode(torch.float64).reshape(packed.out_channels, -1)
    y = x.to(torch.float64) @ weight.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# lut_conv2d (packed codebook convolution)

def lut_conv2d(x: Tensor, packed, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
               groups: int = 1) -> Tensor:
    """conv2d(x, W) + bias with W = packed.decode() taken in float64, the result in x's dtype.

    ``packed`` is a ``mixedprec.formats.PackedWeight`` of shape (C_out, C_in/groups, kh, kw).
    Autograd of this composite gives grad_x (the transposed convolution) and grad_bias; the packed
    weight is constant.
    """
    weight = packed.decode(torch.float64)
    y = torch.nn.functional.conv2d(x.to(torch.float64), weight, None if bias is None else bias.to(torch.float64),
                                   stride, padding, dilation, groups)
    return y.to(x.dtype)
