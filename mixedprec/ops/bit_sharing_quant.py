"""bit_sharing_quant: SBS's bit-sharing fake-quant (DESIGN.md "SBS math"): the public function,
its custom ops, fakes and autograd. Kernels: csrc/ops/bit_sharing_quant/,
mixedprec/backends/triton/bit_sharing_quant.py; the oracle: mixedprec/backends/reference/."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mixedprec.backends import reference
from mixedprec.backends.reference.quant import compute_dtype, zero_point as offset_zero_point
from mixedprec.ops import checks
from mixedprec.ops.backend import KERNEL_DTYPES, Backend, kernel, kernels_built, resolve
from mixedprec.ops.library import (cast, custom_op, define, dense, empty_as, memory_format, register_autograd,
                                   through_autograd)

OP = "bit_sharing_quant"
KERNELS_BUILT = kernels_built(OP)


class BitSharingResult(NamedTuple):
    output: Tensor         # y, same shape and dtype as x
    residual_mean: Tensor  # a_2..a_K = mean|r_j| over the tensor, float32 (K-1,), no grad
    gates: Tensor          # hard gates 1[a_j > alpha_j], float32 (K-1,), no grad


# Gets float64 [sum|r_2|, ..., sum|r_K|, element count] of this call's x and returns the same
# layout summed over every participant (e.g. an all_reduce over the ranks of a data-parallel job).
ResidualSumsReducer = Callable[[Tensor], Tensor]


def bit_sharing_quant(
    x: Tensor,
    clip: Tensor,
    thresholds: Tensor,
    bits: Sequence[int] = (2, 4, 8),
    signed: bool = True,
    *,
    backend: str | Backend | None = None,
    reduce_residual_sums: ResidualSumsReducer | None = None,
    offset: Tensor | None = None,
) -> BitSharingResult:
    """SBS bit-sharing fake-quant (DESIGN.md): lowest-bit base plus gated re-assignment offsets.

    x: float tensor of any shape (weights: signed=True; activations after ReLU: signed=False).
    clip: 0-dim float tensor v > 0 (finite, at least float32's smallest normal), learnable.
    thresholds: (len(bits)-1,) finite gate thresholds alpha.
    Gradients: straight-through to x inside [-v, v] (or [0, v]), LSQ-style to clip, and the
    sigmoid straight-through estimate to every threshold.

    offset: the asymmetric grid (signed=False only): a 0-dim finite learnable offset o in
    normalized units. The unsigned grid is shifted by the zero point z0 = D(clamp(o, 0, 1), b_1),
    a level of every candidate grid: z = clamp(x / v + z0, 0, 1), y = v (z_hat - z0), covering
    [-z0 v, (1 - z0) v] with an exact zero level (x = 0 gives y = 0 exactly). None: z0 = 0, the
    plain unsigned grid. Gradient to o straight through D: d y / d z0 = 0 inside the range, -v
    outside (docs/sbs.md, "The asymmetric activation grid").

    reduce_residual_sums: makes the gates global over a batch split across processes. The op
    then runs in two passes: the residual sums of x with its element count go through this
    callable (one call, a float64 tensor of len(bits) values; see ``ResidualSumsReducer``), and
    y is computed with the gates of the reduced means, which ``residual_mean`` returns and the
    thresholds' gradient uses. Not called when len(bits) == 1 (there are no gates).
    Non-finite x: +-inf is clipped like any large value; a NaN gives NaN at its position only
    (the residual means, and so the gradients of clip and thresholds, are NaN; the gates are off).
    """
    op = "bit_sharing_quant"
    checks.tensor(op, "x", x)
    checks.tensor(op, "clip", clip, x.device)
    checks.tensor(op, "thresholds", thresholds, x.device)
    bits = checks.bits(op, bits)
    if clip.dim() != 0:
        raise ValueError(f"{op}: clip must be a 0-dim tensor, got shape {tuple(clip.shape)}")
    if tuple(thresholds.shape) != (len(bits) - 1,):
        raise ValueError(f"{op}: thresholds must have shape ({len(bits) - 1},) for bits={bits}, "
                         f"got {tuple(thresholds.shape)}")
    if not isinstance(signed, bool):
        raise ValueError(f"{op}: signed must be a bool, got {signed!r}")
    if reduce_residual_sums is not None and not callable(reduce_residual_sums):
        raise ValueError(f"{op}: reduce_residual_sums must be callable or None, got {reduce_residual_sums!r}")
    if offset is not None:
        checks.tensor(op, "offset", offset, x.device)
        if offset.dim() != 0:
            raise ValueError(f"{op}: offset must be a 0-dim tensor, got shape {tuple(offset.shape)}")
        if signed:
            raise ValueError(f"{op}: offset (the asymmetric grid) needs signed=False: the signed grid has no offset")
        if not torch.compiler.is_compiling():  # NaN would poison every output, inf would clamp silently
            checks.finite(op, "offset", offset)
    backend = resolve(op, backend, x, KERNELS_BUILT)
    if backend is Backend.REFERENCE and not torch.compiler.is_compiling():
        _check_values(clip, thresholds)
    # z0 in the dtype the backend computes in (kernels: float32); differentiable in the offset
    zero_point = None if offset is None else offset_zero_point(
        offset, bits[0], compute_dtype(x.dtype) if backend is Backend.REFERENCE else torch.float32)
    residual_mean = None
    if reduce_residual_sums is not None and len(bits) > 1:
        residual_mean = _reduced_residual_mean(x, clip, zero_point, bits, signed, backend, reduce_residual_sums)
    if backend is Backend.REFERENCE:  # a differentiable composite: torch's autograd is its backward
        y, residual_mean = reference.bit_sharing_quant(x, clip, thresholds, bits, signed, residual_mean=residual_mean,
                                                       zero_point=zero_point)
    else:  # kernels take float32 parameters; the cast is differentiable
        args = (x, cast(clip, torch.float32), cast(thresholds, torch.float32), list(bits), signed, residual_mean,
                zero_point)
        y, residual_mean = (custom_op(backend, OP)(*args) if through_autograd(x, clip, thresholds, zero_point)
                            else _forward(backend, *args))
    # a comparison carries no gradient; one bitwidth has no gates (an empty float32 tensor: two
    # tensor ops fewer on every call of a fixed quantizer, a packed SBS layer's input)
    gates = (residual_mean > thresholds).float() if len(bits) > 1 else residual_mean
    return BitSharingResult(y, residual_mean, gates)


class FixedGrid(NamedTuple):
    """One bitwidth's grid with its parameters checked once (``fixed_grid``): what a quantizer
    fixed at one bitwidth rounds to (``fixed_quant``; the int8 path's codes, nn/int8.py). In
    float32, the dtype every backend computes float32, float16 and bfloat16 inputs in."""
    bits: int
    signed: bool
    clip: Tensor               # 0-dim float32, detached
    zero_point: Tensor | None  # the asymmetric grid's z0 (0-dim float32, detached), else None
    thresholds: Tensor         # empty float32: one bitwidth has no gates


def fixed_grid(clip: Tensor, bits: int, signed: bool, zero_point: Tensor | None = None) -> FixedGrid:
    """The grid ``bit_sharing_quant(x, clip, thresholds[:0], (bits,), signed, offset=o)`` rounds
    to, its values checked here once (clip finite and > 0, z0 finite: a host read each) rather
    than on every call. zero_point: the asymmetric grid's z0 (``reference.quant.zero_point`` of
    the offset, in float32), or None. The tensors are detached: ``fixed_quant`` passes no
    gradient to them."""
    op = "fixed_grid"
    checks.tensor(op, "clip", clip)
    if clip.dim() != 0:
        raise ValueError(f"{op}: clip must be a 0-dim tensor, got shape {tuple(clip.shape)}")
    checks.bits(op, (bits,))
    if not isinstance(signed, bool):
        raise ValueError(f"{op}: signed must be a bool, got {signed!r}")
    # normal tensors (copies) even of tensors made in inference mode: autograd may save them later
    with torch.inference_mode(False):
        clip = clip.detach().to(torch.float32, copy=True)
        checks.clip(op, clip)
        if zero_point is not None:
            checks.tensor(op, "zero_point", zero_point, clip.device)
            if zero_point.dim() != 0 or signed:
                raise ValueError(f"{op}: zero_point must be a 0-dim tensor of an unsigned grid, got shape "
                                 f"{tuple(zero_point.shape)}, signed={signed}")
            zero_point = zero_point.detach().to(torch.float32, copy=True)
            checks.finite(op, "zero_point", zero_point)
        return FixedGrid(bits, signed, clip, zero_point, clip.new_empty(0))


def fixed_quant(x: Tensor, grid: FixedGrid, *, backend: str | Backend | None = None) -> Tensor:
    """``bit_sharing_quant(...).output`` at one bitwidth on a grid checked once (``fixed_grid``):
    the call of a quantizer fixed at one bitwidth at inference, without the per-call checks of
    the grid's values (a host read: a device sync per call on CUDA) and without the gates. x:
    float32, float16 or bfloat16 on the grid's device. A gradient reaches x (straight through, as
    the op's), none the grid's parameters."""
    return fixed_quant_call(x, grid, backend=backend)(x)


def fixed_quant_call(x: Tensor, grid: FixedGrid, *, backend: str | Backend | None = None) -> Callable[[Tensor], Tensor]:
    """``fixed_quant``'s arguments checked and its backend resolved for x: the call, for x and
    every tensor of its ``backend.call_key`` under the same grad mode (as ``lut_conv2d_call``)."""
    checks.tensor(OP, "x", x)
    if x.device != grid.clip.device:
        raise ValueError(f"fixed_quant: x is on {x.device} but the grid is on {grid.clip.device}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"fixed_quant: x must be float32, float16 or bfloat16 (the grid is float32), got {x.dtype}")
    backend = resolve(OP, backend, x, KERNELS_BUILT)
    if backend is Backend.REFERENCE:
        return lambda x: reference.bit_sharing_quant(x, grid.clip, grid.thresholds, (grid.bits,), grid.signed,
                                                     zero_point=grid.zero_point)[0]
    args = (grid.clip, grid.thresholds, [grid.bits], grid.signed, None, grid.zero_point)
    if through_autograd(x):
        autograd_op = custom_op(backend, OP)
        return lambda x: autograd_op(x, *args)[0]
    forward = kernel(backend, OP, "forward")
    return lambda x: forward(dense(x), *args)[0]  # the grid's values are checked


def _reduced_residual_mean(x: Tensor, clip: Tensor, zero_point: Tensor | None, bits: tuple[int, ...], signed: bool,
                           backend: Backend, reduce: ResidualSumsReducer) -> Tensor:
    """float32 (K-1,) residual means over everything ``reduce`` adds up (no autograd: the
    gates' statistic carries no gradient)."""
    x, clip = x.detach(), clip.detach()
    zero_point = None if zero_point is None else zero_point.detach()
    if backend is Backend.REFERENCE:
        sums = reference.bit_sharing_residual_sums(x, clip, bits, signed, zero_point)
    else:
        sums = custom_op(backend, "bit_sharing_residual_sums")(x, clip.float(), list(bits), signed, zero_point)
    local = torch.cat([sums, sums.new_full((1,), x.numel())])
    total = reduce(local)
    if not isinstance(total, Tensor) or total.shape != local.shape:
        raise ValueError(f"bit_sharing_quant: reduce_residual_sums must return a tensor of shape "
                         f"{tuple(local.shape)}, got {total if not isinstance(total, Tensor) else tuple(total.shape)}")
    return (total[:-1] / total[-1]).float()


def _check_values(clip: Tensor, thresholds: Tensor) -> None:
    checks.clip("bit_sharing_quant", clip)
    checks.finite("bit_sharing_quant", "thresholds", thresholds)


# ---------------------------------------------------------------------------------------------
# the custom ops, one per kernel family (mixedprec/ops/library.py)

def _forward(family: Backend, x: Tensor, clip: Tensor, thresholds: Tensor, bits: list[int], signed: bool,
             residual_mean: Tensor | None = None, zero_point: Tensor | None = None) -> tuple[Tensor, Tensor]:
    _check_values(clip, thresholds)
    return kernel(family, OP, "forward")(dense(x), clip, thresholds, bits, signed, residual_mean, zero_point)


def _residual_sums(family: Backend, x: Tensor, clip: Tensor, bits: list[int], signed: bool,
                   zero_point: Tensor | None = None) -> Tensor:
    # clip is checked by the forward that follows (one host read per call, not two)
    return kernel(family, OP, "stats")(dense(x), clip, bits, signed, zero_point)


def _backward(family: Backend, grad_y: Tensor, x: Tensor, clip: Tensor, thresholds: Tensor, residual_mean: Tensor,
              bits: list[int], signed: bool, zero_point: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    gates = (residual_mean > thresholds).float()
    layout = memory_format(x)
    grad_x, sums = kernel(family, OP, "backward")(grad_y.contiguous(memory_format=layout),
                                                  x.contiguous(memory_format=layout), clip, gates, bits, signed,
                                                  zero_point)
    return grad_x, sums[0].to(clip.dtype), _threshold_grad(sums[1:], residual_mean, thresholds, gates, clip, signed)


def _threshold_grad(tail_sums: Tensor, residual_mean: Tensor, thresholds: Tensor, gates: Tensor,
                    clip: Tensor, signed: bool) -> Tensor:
    """dL/d alpha_j = -sigmoid'(a_j - alpha_j) * dy/dz_hat * prod_{i<j} g_i * sum(grad_y * T_j).

    T_j = e_j + g_{j+1} T_{j+1} is the gated tail that gate j switches on; the kernels return
    sum(grad_y * T_j) so that this epilogue (K-1 scalars) is written once for every backend.
    """
    s = torch.sigmoid(residual_mean - thresholds)
    outer_gates = torch.cat([gates.new_ones(1), gates[:-1]]).cumprod(0)
    dy_dzhat = 2.0 * clip if signed else clip
    return (-s * (1 - s) * dy_dzhat * outer_gates * tail_sums).to(thresholds.dtype)


def _setup_context(ctx, inputs, output):
    x, clip, thresholds, bits, signed, _given_mean, zero_point = inputs
    ctx.save_for_backward(x, clip, thresholds, output[1], zero_point)
    ctx.bits, ctx.signed = bits, signed


def _autograd(family: Backend, ctx, grad_y, _grad_residual_mean):
    x, clip, thresholds, residual_mean, zero_point = ctx.saved_tensors
    grad_x, grad_clip, grad_thresholds = custom_op(family, "bit_sharing_quant_backward")(
        grad_y, x, clip, thresholds, residual_mean, ctx.bits, ctx.signed, zero_point)
    grad_zero_point = None
    if zero_point is not None and ctx.needs_input_grad[6]:
        # d y / d z0 = 0 inside the range, -v outside: dL/dz0 = -v sum(grad_y - grad_x), no kernel
        # output needed (grad_x is grad_y inside and 0 outside, so the difference is exact)
        grad_zero_point = (-clip * (grad_y - grad_x).sum(dtype=torch.float32)).to(zero_point.dtype)
    return grad_x, grad_clip, grad_thresholds, None, None, None, grad_zero_point


# kernels return outputs in x's layout (library.memory_format): an elementwise op on its storage
define(OP, "(Tensor x, Tensor clip, Tensor thresholds, int[] bits, bool signed, Tensor? residual_mean=None, "
       "Tensor? zero_point=None) -> (Tensor, Tensor)", _forward,
       lambda x, clip, thresholds, bits, signed, residual_mean=None, zero_point=None: (
           empty_as(x), x.new_empty(len(bits) - 1, dtype=torch.float32)))
define("bit_sharing_residual_sums", "(Tensor x, Tensor clip, int[] bits, bool signed, Tensor? zero_point=None) -> Tensor",
       _residual_sums, lambda x, clip, bits, signed, zero_point=None: x.new_empty(len(bits) - 1, dtype=torch.float64))
define("bit_sharing_quant_backward", "(Tensor grad_y, Tensor x, Tensor clip, Tensor thresholds, Tensor residual_mean, "
       "int[] bits, bool signed, Tensor? zero_point=None) -> (Tensor, Tensor, Tensor)", _backward,
       lambda grad_y, x, clip, thresholds, residual_mean, bits, signed, zero_point=None: (
           empty_as(x), torch.empty_like(clip), torch.empty_like(thresholds)))
register_autograd(OP, _autograd, _setup_context)
