"""What the Triton launchers share: block size and launch options, NaN-poisoned outputs,
converting between the storage types and float32 exactly as torch does, and reading the packed
weight's one index (formats.PackedWeight.code_offsets)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixedprec._extension import TRITON_INTERPRETED, poison_outputs

# Programs are costly under the interpreter; on a GPU 1024 elements per program keep it busy.
BLOCK = 8192 if TRITON_INTERPRETED else 1024
# FMA contraction would change float32 results in the last bit against the other backends.
# 8 warps: with 4, ptxas spilled registers in the elementwise kernels (8 elements per thread)
# and the 64 x 64 convolution tiles (tests/triton_aot.py compiles every launch for sm_80/sm_90).
LAUNCH_OPTIONS = {} if TRITON_INTERPRETED else {"enable_fp_fusion": False, "num_warps": 8}


@triton.jit
def to_float32(v):
    """A loaded value -> float32, exactly. bfloat16 is widened by hand (its bits are float32's
    top half): Triton's interpreter flushes bfloat16 subnormals to zero, the GPU and torch keep them."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def to_storage(v, ptr):
    """float32 -> the pointer's element type, rounding to nearest even. bfloat16 is rounded by
    hand: Triton's interpreter truncates, the GPU rounds; torch rounds."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _popcount8(v):
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


@triton.jit
def packed_code_index(bitmap_ptr, offsets_ptr, f, mask):
    """(kept, k) for int64 flat weight indices f of a sparse packed weight: whether f is kept, and
    the number of kept weights before it, code_offsets[f // 64] plus the kept bits of f's 64-weight
    block before f (as csrc/include/mixedprec/packed_weight.h's kept_before). Reads only bitmap
    bytes up to f's own."""
    byte = tl.load(bitmap_ptr + (f >> 3), mask=mask, other=0).to(tl.int32)
    bit_in_byte = (f & 7).to(tl.int32)
    kept = mask & (((byte >> bit_in_byte) & 1) != 0)
    k = tl.load(offsets_ptr + (f >> 6), mask=mask, other=0)
    for i in tl.static_range(7):  # whole bytes of f's block before f's byte
        b = ((f >> 6) << 3) + i
        k += _popcount8(tl.load(bitmap_ptr + b, mask=mask & (b < (f >> 3)), other=0).to(tl.int32)).to(tl.int64)
    k += _popcount8(byte & ((1 << bit_in_byte) - 1)).to(tl.int64)
    return kept, k


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized output, or a NaN-filled one under MIXEDPREC_POISON_OUTPUTS=1."""
    if poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def output_like(t: Tensor) -> Tensor:
    """An output of t's shape, dtype and strides (t dense: contiguous or channels-last)."""
    y = torch.empty_like(t)
    return y.fill_(float("nan")) if poison_outputs() else y


def grid(n: int) -> tuple[int]:
    return (max(1, triton.cdiv(n, BLOCK)),)
