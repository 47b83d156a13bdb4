"""OPQ codebook fake-quant in Triton (math: csrc/include/mixedprec/codebook.h).

One kernel, one pass: each program owns BLOCK consecutive elements of the flat weight, reads
them and their keep_mask bytes and writes y (4 + 1 + 4 B/elem in fp32). Element i belongs to
channel i // inner. The nearest level is a branch-free binary lower-bound search over the
midpoints padded with +inf to 2^STEPS - 1 entries: STEPS = ceil(log2 L) table reads per element.

Arithmetic is spelled as in mixedprec/backends/reference/ and the C++/CUDA kernels: 1 / channel_scale and the
midpoints come precomputed from the host with torch's float32 ops (Triton's fp32 division is
approximate on GPUs), FMA contraction is off, and `w - w` carries NaN for non-finite weights.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixedprec.backends.triton.common import BLOCK, LAUNCH_OPTIONS, grid, output_like, to_float32, to_storage


@triton.jit
def _codebook_quant_kernel(weight_ptr, keep_ptr, y_ptr, n, inner, scale_ptr, inv_scale_ptr, codebook_ptr,
                           midpoints_ptr, last_level, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = to_float32(tl.load(weight_ptr + offs, mask=mask, other=0.0))
    keep = tl.load(keep_ptr + offs, mask=mask, other=0) != 0
    channel = offs // inner
    z = w * tl.load(inv_scale_ptr + channel, mask=mask, other=1.0)
    # torch.searchsorted(midpoints, z, side="left"): advance past a block of `step` midpoints
    # unless its last one is >= z; a z on a midpoint stays at the lower level, a NaN z runs on.
    index = tl.zeros([BLOCK], dtype=tl.int32)
    for s in tl.static_range(STEPS):
        step = 1 << (STEPS - 1 - s)
        m = tl.load(midpoints_ptr + (step - 1) + index)
        index = tl.where(m >= z, index, index + step)
    level = tl.load(codebook_ptr + tl.minimum(index, last_level))
    y = tl.load(scale_ptr + channel, mask=mask, other=1.0) * level + (w - w)
    tl.store(y_ptr + offs, to_storage(tl.where(keep, y, 0.0), y_ptr), mask=mask)


def _search_table(codebook: Tensor) -> tuple[Tensor, int]:
    """The midpoints (c_j + c_{j+1}) * 0.5, padded with +inf to 2^steps - 1 >= L - 1 entries."""
    steps = math.ceil(math.log2(codebook.numel())) if codebook.numel() > 1 else 0
    table = torch.full((max(1, (1 << steps) - 1),), float("inf"), dtype=torch.float32, device=codebook.device)
    table[: codebook.numel() - 1] = (codebook[:-1] + codebook[1:]) * 0.5
    return table, steps


def forward(weight: Tensor, codebook: Tensor, channel_scale: Tensor, keep_mask: Tensor) -> Tensor:
    """y = codebook_quant(weight, ...) for contiguous weight, float32 codebook and channel_scale."""
    y = output_like(weight)
    n = weight.numel()
    if n == 0:
        return y
    midpoints, steps = _search_table(codebook)
    _codebook_quant_kernel[grid(n)](weight, keep_mask.view(torch.uint8), y, n, n // weight.shape[0], channel_scale,
                                    1.0 / channel_scale, codebook, midpoints, codebook.numel() - 1,
                                    STEPS=steps, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return y
