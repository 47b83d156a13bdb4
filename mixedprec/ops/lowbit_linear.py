"""lowbit_linear: a linear layer through a packed low-bit weight (mixedprec/formats/): the public
function, its custom ops, fakes and autograd. Kernels: csrc/ops/lowbit_linear/,
mixedprec/backends/triton/lowbit_linear.py; the oracle: mixedprec/backends/reference/."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mixedprec.backends import reference
from mixedprec.ops import checks, packed_args
from mixedprec.ops.backend import Backend, kernel, kernels_built, resolve
from mixedprec.ops.library import cast, custom_op, define, register_autograd, through_autograd

OP = "lowbit_linear"
KERNELS_BUILT = kernels_built(OP)


def lowbit_linear(x: Tensor, packed, bias: Tensor | None = None, *, backend: str | Backend | None = None) -> Tensor:
    """y = x W^T + bias with W (out, in) decoded from ``packed`` inside the kernel,
    never materialized.

    x: float tensor (..., in), float32/float16/bfloat16 (float64 with backend='reference'), any
    strides. packed: a 2-D ``formats.PackedWeight`` on x's device. bias: None or a float (out,).
    Kernels compute in float32 (W[c, i] = float(channel_scale[c]) * float(codebook[code])) and
    return x's dtype. Gradients reach x (grad_y W, through the codebook, no materialized W) and
    bias; none reach the packed tensors. A NaN or inf in a row of x makes that row's outputs NaN or
    inf (pruned and zero weights multiply too: inf * 0 = NaN), as in x @ W.T.
    """
    return lowbit_linear_call(x, packed, bias, backend=backend)(x)


def lowbit_linear_call(x: Tensor, packed, bias: Tensor | None = None, *,
                       backend: str | Backend | None = None) -> Callable[[Tensor], Tensor]:
    """``lowbit_linear``'s arguments checked and its backend resolved for x: the call, for x and
    every tensor of its ``backend.call_key`` under the same grad mode (as ``lut_conv2d_call``)."""
    checks.tensor(OP, "x", x)
    checks.packed_weight(OP, x, packed, 2, "2-D (out, in)")
    out_features, in_features = packed.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{OP}: x must have last dim {in_features} (the weight's in features), got shape {tuple(x.shape)}")
    checks.bias(OP, bias, x, out_features)
    backend = resolve(OP, backend, x, KERNELS_BUILT)
    if backend is Backend.REFERENCE:
        return lambda x: reference.lowbit_linear(x, packed, bias)
    args = packed_args.kernel_args(packed)
    autograd = through_autograd(x)
    autograd_op = custom_op(backend, OP) if autograd else None
    # Without autograd y is the kernel's fresh output: add the bias into it (no second output tensor).
    in_place = not (autograd or through_autograd(bias))

    def call(x: Tensor) -> Tensor:
        y = autograd_op(x, *args) if autograd else _forward(backend, x, *args)
        if bias is None:
            return y
        return y.add_(cast(bias, y.dtype)) if in_place else y + cast(bias, y.dtype)
    return call


def _flat_call(family: Backend, role: str, t: Tensor, args: tuple, features: int) -> Tensor:
    """Runs a kernel on t flattened to (M, its features) float32, back in t's shape and dtype."""
    flat = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])  # a no-op reshape still costs a dispatch
    y = kernel(family, OP, role)(cast(flat, torch.float32).contiguous(), *args)
    return cast(y if flat is t else y.reshape(*t.shape[:-1], features), t.dtype)


def _forward(family: Backend, x: Tensor, *args) -> Tensor:
    return _flat_call(family, "forward", x, args, args[5][0])


def _backward(family: Backend, grad_y: Tensor, *args) -> Tensor:
    return _flat_call(family, "backward", grad_y, args, args[5][1])


def _setup_context(ctx, inputs, output):
    packed_args.save(ctx, inputs[1:])  # x is not needed for grad_x


def _autograd(family: Backend, ctx, grad_y):
    return (custom_op(family, f"{OP}_backward")(grad_y, *packed_args.saved(ctx)),) + (None,) * 7


define(OP, f"(Tensor x, {packed_args.PACKED_SCHEMA}) -> Tensor", _forward,
       lambda x, *args: x.new_empty(*x.shape[:-1], args[5][0]))
define(f"{OP}_backward", f"(Tensor grad_y, {packed_args.PACKED_SCHEMA}) -> Tensor", _backward,
       lambda grad_y, *args: grad_y.new_empty(*grad_y.shape[:-1], args[5][1]))
register_autograd(OP, _autograd, _setup_context)
