"""lowbit_linear in Triton: tl.dot on weight tiles decoded from the packed format.

forward  y = x W^T:       program (BLOCK_M rows of x, BLOCK_N output channels); per 32-column
                          step it decodes the (BLOCK_N, 32) tile of W into registers and adds
                          x_tile @ W_tile^T. Codes read once per BLOCK_M rows of x.
backward grad_x = g W:    program (BLOCK_M rows, one 32-column group); per BLOCK_N output
                          channels it decodes the (BLOCK_N, 32) tile and adds g_tile @ W_tile.
Decode (csrc/include/mixedprec/lowbit.h): dense code index c * in + i; sparse: row_code_offsets[c]
+ group_code_offsets[c, i // 32] + kept bits before i in its group (an exclusive cumsum).
Tiles are 32 columns wide so that one tile is one group of group_code_offsets.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixedprec.backends.triton.common import new_output

GROUP = 32
BLOCK_M = 16
BLOCK_N = 32


@triton.jit
def _decode_tile(codebook, scale, codes, bitmap, row_offsets, group_offsets, rows, group, OUT, IN, GROUPS,
                 BITS: tl.constexpr, SPARSE: tl.constexpr):
    """W[rows, group*32 : group*32 + 32] as float32 (0 outside W and at pruned weights)."""
    cols = group * 32 + tl.arange(0, 32)
    inside = (rows[:, None] < OUT) & (cols[None, :] < IN)
    pos = rows[:, None].to(tl.int64) * IN + cols[None, :]
    if SPARSE:
        kept = (tl.load(bitmap + (pos >> 3), mask=inside, other=0).to(tl.int32) >> (pos & 7).to(tl.int32)) & 1
        kept = tl.where(inside, kept, 0)
        before = tl.cumsum(kept, axis=1) - kept
        start = tl.load(row_offsets + rows, mask=rows < OUT, other=0) + \
            tl.load(group_offsets + rows.to(tl.int64) * GROUPS + group, mask=rows < OUT, other=0)
        index = start[:, None] + before
        inside = inside & (kept != 0)
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
def _forward_kernel(x, y, codebook, scale, codes, bitmap, row_offsets, group_offsets, M, OUT, IN, GROUPS,
                    BITS: tl.constexpr, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for group in range(0, GROUPS):
        cols = group * 32 + tl.arange(0, 32)
        x_tile = tl.load(x + m[:, None].to(tl.int64) * IN + cols[None, :], mask=(m[:, None] < M) & (cols[None, :] < IN),
                         other=0.0)
        w_tile = _decode_tile(codebook, scale, codes, bitmap, row_offsets, group_offsets, n, group, OUT, IN, GROUPS,
                              BITS, SPARSE)
        acc += tl.dot(x_tile, tl.trans(w_tile), input_precision="ieee")
    tl.store(y + m[:, None].to(tl.int64) * OUT + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < OUT))


@triton.jit
def _backward_kernel(g, grad_x, codebook, scale, codes, bitmap, row_offsets, group_offsets, M, OUT, IN, GROUPS,
                     BITS: tl.constexpr, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = group * 32 + tl.arange(0, 32)
    acc = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        g_tile = tl.load(g + m[:, None].to(tl.int64) * OUT + n[None, :], mask=(m[:, None] < M) & (n[None, :] < OUT),
                         other=0.0)
        w_tile = _decode_tile(codebook, scale, codes, bitmap, row_offsets, group_offsets, n, group, OUT, IN, GROUPS,
                              BITS, SPARSE)
        acc += tl.dot(g_tile, w_tile, input_precision="ieee")
    tl.store(grad_x + m[:, None].to(tl.int64) * IN + cols[None, :], acc, mask=(m[:, None] < M) & (cols[None, :] < IN))


def _output(shape, like: Tensor) -> Tensor:
    return new_output(shape, dtype=torch.float32, device=like.device)


def _tables(codes, keep_bitmap, group_code_offsets):
    """Kernel arguments for the optional sparse tables (a dense weight passes codes as stand-ins)."""
    sparse = keep_bitmap is not None
    return (keep_bitmap if sparse else codes), (group_code_offsets if sparse else codes), sparse


def forward(x: Tensor, codebook: Tensor, channel_scale: Tensor, codes: Tensor, keep_bitmap: Tensor | None,
            row_code_offsets: Tensor, group_code_offsets: Tensor | None, in_features: int, bits: int) -> Tensor:
    m_rows, out = x.shape[0], channel_scale.shape[0]
    y = _output((m_rows, out), x)
    if m_rows == 0:
        return y
    bitmap, groups_table, sparse = _tables(codes, keep_bitmap, group_code_offsets)
    grid = (triton.cdiv(m_rows, BLOCK_M), triton.cdiv(out, BLOCK_N))
    _forward_kernel[grid](x, y, codebook, channel_scale, codes, bitmap, row_code_offsets, groups_table, m_rows, out,
                          in_features, triton.cdiv(in_features, GROUP), BITS=bits, SPARSE=sparse, BLOCK_M=BLOCK_M,
                          BLOCK_N=BLOCK_N)
    return y


def backward(grad_y: Tensor, codebook: Tensor, channel_scale: Tensor, codes: Tensor, keep_bitmap: Tensor | None,
             row_code_offsets: Tensor, group_code_offsets: Tensor | None, in_features: int, bits: int) -> Tensor:
    m_rows, out = grad_y.shape
    grad_x = _output((m_rows, in_features), grad_y)
    if m_rows == 0:
        return grad_x
    bitmap, groups_table, sparse = _tables(codes, keep_bitmap, group_code_offsets)
    grid = (triton.cdiv(m_rows, BLOCK_M), triton.cdiv(in_features, GROUP))
    _backward_kernel[grid](grad_y, grad_x, codebook, channel_scale, codes, bitmap, row_code_offsets, groups_table,
                           m_rows, out, in_features, triton.cdiv(in_features, GROUP), BITS=bits, SPARSE=sparse,
                           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return grad_x
