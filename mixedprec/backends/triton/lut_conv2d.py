"""lut_conv2d in Triton: implicit GEMM with tl.dot on tiles decoded through the codebook
(weight decode: csrc/include/mixedprec/packed_weight.h; the CUDA kernel has the same tiling).

One kernel, C (M x N) = A (M x K) . B (K x N) per group (program_id 2), in two directions:
  forward   M = C_out/G, K = C_in/G kh kw, N = batch OH OW; A = W decoded, B = x gathered
            (implicit im2col), C -> y (+ bias)
  backward  M = C_in/G, K = C_out/G kh kw, N = batch H W; A[ci, (co, kh, kw)] = W[co, ci, kh, kw],
            B = grad_y at oh = (ih + p - kh d) / s where exact and in range; C -> grad_x
Each program decodes a BLOCK_M x BLOCK_K weight tile per step (code stream read at bits/8 B per
weight, the kept index found from formats.PackedWeight.code_offsets plus popcounts) and gathers a
BLOCK_K x BLOCK_N activation tile; tl.dot accumulates in float32 (IEEE, no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mixedprec.backends.triton.common import LAUNCH_OPTIONS, new_output, packed_code_index, to_float32, to_storage

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 16
# Left to itself, ptxas aims at 64-128 registers for these 8-warp programs and spills a few;
# allowed 255 it uses up to ~245 and spills none (tests/triton_aot.py compiles every launch).
MAX_REGISTERS = 255


@triton.jit
def _weight(codes_ptr, levels_ptr, scale_ptr, bitmap_ptr, offsets_ptr, c, f, mask, BITS: tl.constexpr,
            SPARSE: tl.constexpr):
    """W at flat index f of channel c (int64 tensors of one shape): scale[c] * levels[code], 0 if pruned."""
    if SPARSE:
        kept, k = packed_code_index(bitmap_ptr, offsets_ptr, f, mask)
    else:
        kept = mask
        k = f
    bit = k * BITS
    shift = (bit & 7).to(tl.int32)
    lo = tl.load(codes_ptr + (bit >> 3), mask=kept, other=0).to(tl.int32)
    hi = tl.load(codes_ptr + (bit >> 3) + 1, mask=kept & (shift + BITS > 8), other=0).to(tl.int32)
    code = ((lo >> shift) | (hi << (8 - shift))) & ((1 << BITS) - 1)
    w = tl.load(scale_ptr + c, mask=kept, other=0.0) * tl.load(levels_ptr + code, mask=kept, other=0.0)
    return tl.where(kept, w, 0.0)


@triton.jit
def _lut_gemm_kernel(src_ptr, dst_ptr, bias_ptr, codes_ptr, levels_ptr, scale_ptr, bitmap_ptr, offsets_ptr,
                     N, C_IN, H, W, C_OUT, OH, OW, GROUPS,
                     KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                     PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                     BITS: tl.constexpr, SPARSE: tl.constexpr, HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    group = tl.program_id(2).to(tl.int64)
    cin_g, cout_g = C_IN // GROUPS, C_OUT // GROUPS
    R = cin_g * KH * KW
    if BACKWARD:
        M, K, NCOLS = cin_g, cout_g * KH * KW, N * H * W
    else:
        M, K, NCOLS = cout_g, R, N * OH * OW
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok, n_ok = offs_m < M, offs_n < NCOLS
    # pixel coordinates of the columns: (n, oh, ow) forward, (n, ih, iw) backward
    if BACKWARD:
        plane_h, plane_w = H, W
    else:
        plane_h, plane_w = OH, OW
    img = offs_n // (plane_h * plane_w)
    pixel = (offs_n % (plane_h * plane_w)).to(tl.int32)  # in-plane indices fit int32: less address arithmetic
    row = pixel // plane_w
    col = pixel % plane_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # int32: K = C/groups kh kw
        k_ok = offs_k < K
        k_channel = offs_k // (KH * KW)
        tap = offs_k % (KH * KW)
        kh = tap // KW
        kw = tap % KW
        a_mask = m_ok[:, None] & k_ok[None, :]
        if BACKWARD:
            c = group * cout_g + k_channel[None, :]
            f = c * R + offs_m[:, None] * (KH * KW) + tap[None, :]
            th = row[None, :] + PH - kh[:, None] * DH
            tw = col[None, :] + PW - kw[:, None] * DW
            oh, ow = th // SH, tw // SW
            b_mask = (k_ok[:, None] & n_ok[None, :] & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0)
                      & (oh < OH) & (ow < OW))
            channel = group * cout_g + k_channel[:, None]
            b_ptrs = src_ptr + ((img[None, :] * C_OUT + channel) * OH + oh) * OW + ow
        else:
            c = group * cout_g + offs_m[:, None]
            f = c * R + offs_k[None, :]
            ih = row[None, :] * SH - PH + kh[:, None] * DH
            iw = col[None, :] * SW - PW + kw[:, None] * DW
            b_mask = k_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            channel = group * cin_g + k_channel[:, None]
            b_ptrs = src_ptr + ((img[None, :] * C_IN + channel) * H + ih) * W + iw
        a = _weight(codes_ptr, levels_ptr, scale_ptr, bitmap_ptr, offsets_ptr, c + 0 * f, f, a_mask, BITS, SPARSE)
        b = to_float32(tl.load(b_ptrs, mask=b_mask, other=0.0))
        acc += tl.dot(a, b, input_precision="ieee")
    if BACKWARD:
        dst = dst_ptr + (img[None, :] * C_IN + group * cin_g + offs_m[:, None]) * (H * W) + offs_n[None, :] % (H * W)
    else:
        channel = group * cout_g + offs_m[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + channel, mask=m_ok[:, None], other=0.0)
        dst = dst_ptr + (img[None, :] * C_OUT + channel) * (OH * OW) + offs_n[None, :] % (OH * OW)
    tl.store(dst, to_storage(acc, dst_ptr), mask=m_ok[:, None] & n_ok[None, :])


def _launch(src, dst, bias, codes, codebook, channel_scale, keep_bitmap, code_offsets, bits, weight_shape, input_shape,
            stride, padding, dilation, groups, backward):
    n, c_in, h, w = input_shape
    c_out, _, kh, kw = weight_shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    rows, cols = (c_in // groups, n * h * w) if backward else (c_out // groups, n * oh * ow)
    if dst.numel() == 0:
        return dst
    sparse = keep_bitmap is not None
    grid = (triton.cdiv(cols, BLOCK_N), triton.cdiv(rows, BLOCK_M), groups)
    _lut_gemm_kernel[grid](
        src, dst, bias if bias is not None else dst, codes, codebook.float(), channel_scale.float(),
        keep_bitmap if sparse else codes, code_offsets if sparse else codes, n, c_in, h, w, c_out, oh, ow, groups,
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        BITS=bits, SPARSE=sparse, HAS_BIAS=bias is not None, BACKWARD=backward,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, maxnreg=MAX_REGISTERS, **LAUNCH_OPTIONS)
    return dst


def _output(shape, like: Tensor) -> Tensor:
    return new_output(shape, dtype=like.dtype, device=like.device)


def forward(x, codes, codebook, channel_scale, keep_bitmap, code_offsets, weight_shape, bits, bias, stride, padding,
            dilation, groups):
    n, _, h, w = x.shape
    oh = (h + 2 * padding[0] - dilation[0] * (weight_shape[2] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (weight_shape[3] - 1) - 1) // stride[1] + 1
    y = _output((n, weight_shape[0], oh, ow), x)
    bias = None if bias is None else bias.float().contiguous()
    return _launch(x.contiguous(), y, bias, codes, codebook, channel_scale, keep_bitmap, code_offsets, bits,
                   weight_shape, list(x.shape), stride, padding, dilation, groups, backward=False)


def backward(grad_y, codes, codebook, channel_scale, keep_bitmap, code_offsets, weight_shape, bits, input_shape, stride,
             padding, dilation, groups):
    grad_x = _output(tuple(input_shape), grad_y)
    return _launch(grad_y.contiguous(), grad_x, None, codes, codebook, channel_scale, keep_bitmap, code_offsets, bits,
                   weight_shape, input_shape, stride, padding, dilation, groups, backward=True)
