"""What the Triton launchers share: block size and launch options, NaN-poisoned outputs, and
converting between the storage types and float32 exactly as torch does."""
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


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized output, or a NaN-filled one under MIXEDPREC_POISON_OUTPUTS=1."""
    if poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def output_like(t: Tensor) -> Tensor:
    return new_output(t.shape, dtype=t.dtype, device=t.device)


def grid(n: int) -> tuple[int]:
    return (max(1, triton.cdiv(n, BLOCK)),)
