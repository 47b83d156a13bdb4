"""lowbit_linear in Triton: tl.dot on weight tiles decoded from the packed format.

forward  y = x W^T:       program (BLOCK_M rows of x, BLOCK_N output channels); per 32-column
                          step it decodes the (BLOCK_N, 32) tile of W into registers and adds
                          x_tile @ W_tile^T. Codes read once per BLOCK_M rows of x.
backward grad_x = g W:    program (BLOCK_M rows, one 32-column group); per BLOCK_N output
                          channels it decodes the (BLOCK_N, 32) tile and adds g_tile @ W_tile.
Decode (csrc/include/mixedprec/packed_weight.h): dense code index f = c * in + i; sparse: the
packed weight's one index, code_offsets[f // 64] + kept bits of f's 64-weight block before f
(mixedprec.backends.triton.common.packed_code_index). Tiles are 32 columns wide.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixedprec.backends.triton.common import new_output, packed_code_index

GROUP = 32
BLOCK_M = 16
BLOCK_N = 32


@triton.jit
def _decode_tile(codebook, scale, codes, bitmap, code_offsets, rows, group, OUT, IN,
                 BITS: tl.constexpr, SPARSE: tl.constexpr):
    """W[rows, group*32 : group*32 + 32] as float32 (0 outside W and at pruned weights)."""
    cols = group * 32 + tl.arange(0, 32)
    inside = (rows[:, None] < OUT) & (cols[None, :] < IN)
    pos = rows[:, None].to(tl.int64) * IN + cols[None, :]
    if SPARSE:
        inside, index = packed_code_index(bitmap, code_offsets, pos, inside)
    else:
        index = pos
    bit = index * BITS
    byte = bit >> 3
    shift = (bit & 7).to(tl.int32)
    low = tl.load(codes + byte, mask=inside, other=0).to(tl.int32)
    high = tl.load(codes + byte + 1, mask=inside & (shift + BITS > 8), other=0).to(tl.int32)
    code = ((low | (high << 8)) >> shift) & ((1 << BITS) - 1)
    level = tl.load(codebook + code, mask=inside, other=0.0)
    return level * tl.load(scale + rows, mask=rows < OUT, other=0.0)[:, None]


@triton.jit
def _forward_kernel(x, y, codebook, scale, codes, bitmap, code_offsets, M, OUT, IN, GROUPS,
                    BITS: tl.constexpr, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for group in range(0, GROUPS):
        cols = group * 32 + tl.arange(0, 32)
        x_tile = tl.load(x + m[:, None].to(tl.int64) * IN + cols[None, :], mask=(m[:, None] < M) & (cols[None, :] < IN),
                         other=0.0)
        w_tile = _decode_tile(codebook, scale, codes, bitmap, code_offsets, n, group, OUT, IN, BITS, SPARSE)
        acc += tl.dot(x_tile, tl.trans(w_tile), input_precision="ieee")
    tl.store(y + m[:, None].to(tl.int64) * OUT + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < OUT))


@triton.jit
def _backward_kernel(g, grad_x, codebook, scale, codes, bitmap, code_offsets, M, OUT, IN, GROUPS,
                     BITS: tl.constexpr, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = group * 32 + tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        g_tile = tl.load(g + m[:, None].to(tl.int64) * OUT + n[None, :], mask=(m[:, None] < M) & (n[None, :] < OUT),
                         other=0.0)
        w_tile = _decode_tile(codebook, scale, codes, bitmap, code_offsets, n, group, OUT, IN, BITS, SPARSE)
        acc += tl.dot(g_tile, w_tile, input_precision="ieee")
    tl.store(grad_x + m[:, None].to(tl.int64) * IN + cols[None, :], acc, mask=(m[:, None] < M) & (cols[None, :] < IN))


def _run(kernel, t: Tensor, columns: int, codes: Tensor, codebook: Tensor, channel_scale: Tensor,
         keep_bitmap: Tensor | None, code_offsets: Tensor | None, weight_shape: list[int], bits: int) -> Tensor:
    """One of the kernels on t (M, its features) into a float32 (M, columns), one program per
    BLOCK_M rows and per block of output columns (BLOCK_N channels forward, a GROUP backward)."""
    out, in_features = weight_shape
    result = new_output((t.shape[0], columns), dtype=torch.float32, device=t.device)
    if t.shape[0] == 0:
        return result
    sparse = keep_bitmap is not None  # a dense weight passes codes as stand-ins for the sparse tables
    block = BLOCK_N if kernel is _forward_kernel else GROUP
    kernel[(triton.cdiv(t.shape[0], BLOCK_M), triton.cdiv(columns, block))](
        t, result, codebook, channel_scale, codes, keep_bitmap if sparse else codes, code_offsets if sparse else codes,
        t.shape[0], out, in_features, triton.cdiv(in_features, GROUP), BITS=bits, SPARSE=sparse, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N)
    return result


def forward(x: Tensor, *packed) -> Tensor:
    """y = x W^T (x float32 (M, in)); ``packed``: the op's packed-weight arguments (ops/packed_args.py)."""
    return _run(_forward_kernel, x, packed[5][0], *packed)


def backward(grad_y: Tensor, *packed) -> Tensor:
    """grad_x = grad_y W (grad_y float32 (M, out))."""
    return _run(_backward_kernel, grad_y, packed[5][1], *packed)
