"""What the two packed-weight ops (lowbit_linear, lut_conv2d) share: the packed weight as kernel
arguments, in one order with one dtype rule, and its round trip through an autograd context."""
from __future__ import annotations

from mixedprec.formats import PackedWeight

# The packed weight in every packed op's schema (csrc/ops/*/ and mixedprec/backends/triton/ read it
# the same way): the format's tensors, its one index (formats.PackedWeight.code_offsets), the
# weight's shape and the code width. Kernels take float32 tables (made once per PackedWeight).
PACKED_SCHEMA = ("Tensor codes, Tensor codebook, Tensor channel_scale, Tensor? keep_bitmap, Tensor? code_offsets, "
                 "int[] weight_shape, int bits")


def kernel_args(packed: PackedWeight) -> tuple:
    return (packed.codes, packed.codebook_float32, packed.channel_scale_float32, packed.keep_bitmap,
            packed.code_offsets, list(packed.shape), packed.bits)


def save(ctx, args: tuple) -> None:
    """Keeps the packed arguments (``kernel_args``' order) for the backward."""
    ctx.save_for_backward(*args[:5])
    ctx.weight_shape, ctx.bits = args[5:]


def saved(ctx) -> tuple:
    return (*ctx.saved_tensors, ctx.weight_shape, ctx.bits)
