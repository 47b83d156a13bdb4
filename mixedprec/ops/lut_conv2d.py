"""lut_conv2d: conv2d through a packed codebook weight (mixedprec/formats/): the public function,
its custom ops, fakes and autograd. Kernels: csrc/ops/lut_conv2d/,
mixedprec/backends/triton/lut_conv2d.py; the oracle: mixedprec/backends/reference/."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mixedprec.backends import reference
from mixedprec.ops import checks, packed_args
from mixedprec.ops.backend import Backend, kernel, kernels_built, resolve
from mixedprec.ops.library import custom_op, define, dense, empty_as, memory_format, register_autograd, through_autograd

OP = "lut_conv2d"
KERNELS_BUILT = kernels_built(OP)
_GEOMETRY_SCHEMA = "int[] stride, int[] padding, int[] dilation, int groups"


def lut_conv2d(x: Tensor, packed, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1,
               *, backend: str | Backend | None = None) -> Tensor:
    """conv2d(x, W, bias, stride, padding, dilation, groups) with W decoded from a packed weight.

    x: (N, C_in, H, W) float tensor (float32/float16/bfloat16 for the kernels, float64 too for the
        reference). packed: ``PackedWeight`` of shape (C_out, C_in/groups, kh, kw) on x's device,
        W[c, i] = float(channel_scale[c]) * float(codebook[code]) at kept positions, 0 elsewhere.
    bias: None or a float tensor (C_out,). stride, dilation: ints >= 1 or pairs; padding: int >= 0 or pair.
    Kernels accumulate in float32; the output has x's dtype. GPU kernels decode the codes inside
    an implicit GEMM. The CPU kernel computes 3x3, stride-1, single-group convolutions (8 to 2048
    input channels, 8 or more output channels) through Winograd F(2x2, 3x3), decoding per block
    of output channels into the transformed weight (``set_cpu_winograd`` switches it off: its
    float32 error differs), and the rest by decoding output-channel tiles into a bounded scratch
    (4.7 MB) and convolving each with ATen's float32 convolution (a channels-last 1x1 layer over
    at most 512 output pixels: a GEMM of x's pixel rows with the tile; an NCHW 1x1 layer at
    stride 1 whose channel counts are not both multiples of 16: a GEMM per image, forward and
    backward; a 1x1 layer over fewer than 16 pixels and 64 or more input channels:
    ``lowbit_linear`` on the pixel rows; docs/kernels.md).
    Gradients: grad_x (the transposed convolution through the codebook) and grad_bias; the packed
    weight is constant and takes no gradient. A NaN or inf in x makes every output whose window
    covers it NaN or inf (pruned weights multiply too), as conv2d. A channels-last x gives a
    channels-last output, as conv2d does (the CPU kernel convolves it so, without copies into NCHW
    and back).
    """
    return lut_conv2d_call(x, packed, bias, stride, padding, dilation, groups, backend=backend)(x)


def lut_conv2d_call(x: Tensor, packed, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                    groups: int = 1, *, backend: str | Backend | None = None) -> Callable[[Tensor], Tensor]:
    """``lut_conv2d``'s arguments checked and its backend resolved for x: the call, for x and every
    tensor of its ``backend.call_key`` under the same grad mode. Layers keep one for their inputs
    at inference (nn/packed_module.py), where the checks cost more than a small layer's kernel."""
    op = OP
    checks.tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    checks.packed_weight(op, x, packed, 4, "conv (C_out, C_in/groups, kh, kw)")
    c_out, c_in_per_group, kh, kw = packed.shape
    stride = checks.conv_pair(op, "stride", stride, 1)
    padding = checks.conv_pair(op, "padding", padding, 0)
    dilation = checks.conv_pair(op, "dilation", dilation, 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c_out % groups:
        raise ValueError(f"{op}: groups must be an int >= 1 dividing C_out = {c_out}, got {groups!r}")
    if x.shape[1] != c_in_per_group * groups:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but the packed weight {packed.shape} with "
                         f"groups={groups} expects {c_in_per_group * groups}")
    _, _, out_height, out_width = _output_shape(x.shape, packed.shape, stride, padding, dilation)
    if out_height < 1 or out_width < 1:
        raise ValueError(f"{op}: the output would be empty: x {tuple(x.shape)}, kernel {(kh, kw)}, "
                         f"padding {padding}, dilation {dilation}")
    checks.bias(op, bias, x, c_out)
    backend = resolve(op, backend, x, KERNELS_BUILT)
    if backend is Backend.REFERENCE:
        return lambda x: reference.lut_conv2d(x, packed, bias, stride, padding, dilation, groups)
    args = (*packed_args.kernel_args(packed), bias, stride, padding, dilation, groups)
    if through_autograd(x, bias):
        autograd_op = custom_op(backend, OP)
        return lambda x: autograd_op(x, *args)
    return lambda x: _forward(backend, x, *args)


def _output_shape(x_shape, weight_shape, stride, padding, dilation) -> list[int]:
    n, _, height, width = x_shape
    c_out, _, kh, kw = weight_shape
    return [n, c_out, (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
            (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1]


def _forward(family: Backend, x: Tensor, *args) -> Tensor:
    """y in x's layout (library.memory_format), as F.conv2d: the CPU kernel runs channels-last
    inputs as they are (oneDNN is 2-5x faster on them for depthwise and 1x1 layers); the other
    kernels compute in NCHW and their output is laid out again."""
    y = kernel(family, OP, "forward")(dense(x), *args)
    return y.contiguous(memory_format=memory_format(x))


def _backward(family: Backend, grad_y: Tensor, *args) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_bias = sum of grad_y over batch and pixels, in float32)."""
    grad_y = grad_y.contiguous()
    return kernel(family, OP, "backward")(grad_y, *args), grad_y.sum((0, 2, 3), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, *args = inputs
    packed_args.save(ctx, tuple(args[:7]))
    bias, *ctx.geometry = args[7:]
    ctx.input_shape = list(x.shape)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _autograd(family: Backend, ctx, grad_y):
    grad_x, grad_bias = custom_op(family, f"{OP}_backward")(grad_y, *packed_args.saved(ctx), ctx.input_shape,
                                                             *ctx.geometry)
    grad_bias = None if ctx.bias_dtype is None else grad_bias.to(ctx.bias_dtype)
    return (grad_x,) + (None,) * 7 + (grad_bias,) + (None,) * 4


define(OP, f"(Tensor x, {packed_args.PACKED_SCHEMA}, Tensor? bias, {_GEOMETRY_SCHEMA}) -> Tensor", _forward,
       lambda x, *args: empty_as(x, _output_shape(x.shape, args[5], *args[8:11])))
define(f"{OP}_backward", f"(Tensor grad_y, {packed_args.PACKED_SCHEMA}, int[] input_shape, {_GEOMETRY_SCHEMA}) "
       "-> (Tensor, Tensor)", _backward,
       lambda grad_y, *args: (grad_y.new_empty(args[7]), grad_y.new_empty(args[5][0], dtype=torch.float32)))
register_autograd(OP, _autograd, _setup_context)
