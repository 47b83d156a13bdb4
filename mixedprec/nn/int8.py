"""The int8 path of SBS's packed layers on the CPU: inference as integer convolutions and GEMMs.

An exported SBS layer quantizes its input to a fixed-bit grid (``BitSharingQuantizer``: unsigned,
asymmetric or signed) and decodes a weight whose codebook is a uniform grid. Both are then
integers times a scale, and a PackedConv2d or PackedLinear is one u8 x s8 -> s32 convolution or
GEMM (oneDNN through ``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise``, VNNI dot
products) with a float32 output: 2.5-5x faster than float32 ``conv2d`` on ResNet's and
MobileNetV2's dense layers, and on a 4096x4096 layer as fast as ``lowbit_linear``'s 4-bit GEMV at
batch 1 and 5-20x faster than it from batch 4 on (Zen 4). y comes in x's layout, as F.conv2d's.
Small GEMMs (1x1 convolutions and GEMMs of at most ``GEMM_MACS`` multiply-adds and ``GEMM_OUTPUTS``
outputs; NCHW 1x1 convolutions of any size) skip oneDNN's per-call cost: s8 x s8
``torch._int_mm`` on codes shifted by -128 (exact, added back in int32), then one pass
(``int8_epilogue_``) to float32. The integer sums are exact, so y differs from the float path
(fake-quantized x, float convolution or GEMM) by float32 rounding:

    x_hat = s_x (k - j)           k = the quantizer's code (``bit_sharing_codes``), j its zero level
                                  (a signed grid: s_x (k - j - 1/2), the half step added as a constant)
    W     = d scale_c (c - m) + c0 scale_c    c = the weight code, m = 2^(b-1), c0 = level(m)
    y     = s_x d scale_c conv(k - j, c - m) + c0 scale_c s_x window_sum(sum over channels of k - j)

The second term (the grid's offset; oneDNN's s8 weights have no zero point) comes from the
codes' per-pixel (per-row) channel sums, summed over each output's window by a one-channel
convolution. A NaN input gives a NaN sum there, which reaches exactly the outputs the float
path's NaN reaches.

It applies to dense (no bitmap), single-group layers, calls of at least ``MIN_MACS``
multiply-adds (3x3 stride-1 ones: ``WINOGRAD_MIN_MACS``; convolutions over at least
``MIN_CHANNELS`` input channels; small GEMMs: ``MIN_GEMM_MACS``; GEMMs over pixel rows with at
least ``MIN_ROW_CHANNELS`` input and output channels),
under ``torch.no_grad()`` or ``torch.inference_mode()``, with float32 CPU inputs and no backend
chosen (the layer's ``backend``, ``ops.use_backend``: those run the float path on
that backend), on CPUs with VNNI (elsewhere u8 x s8 products can saturate in int16); every other
call takes the float path. The layer then holds its weight as int8 too (1 byte per weight, per
input shape of a conv, at most ``Int8Weight.MAX_PREPACKED``; and as s8 rows for small GEMMs),
beside the packed bytes. Depths over ``MAX_DEPTH`` (65793 input features) take the float path:
their integer sums could leave int32.
``mixedprec.nn.set_int8`` switches it off.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mixedprec.backends.reference.quant import levels
from mixedprec.ops.backend import selected
from mixedprec.ops.checks import conv_pair
from mixedprec.ops.library import memory_format

_enabled = True


def set_int8(enabled: bool) -> bool:
    """Whether SBS's packed layers run their int8 path where it applies; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def int8_enabled() -> bool:
    """``set_int8``'s setting."""
    return _enabled


def int8_available() -> bool:
    """oneDNN's quantized convolution and GEMM are in this torch build and the CPU has VNNI."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")
            and hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch, "_int_mm")
            and is_vnni is not None and bool(is_vnni()))


_AVAILABLE = int8_available()
# layer -> its Int8Weight, off the module so that copies and saved files never hold oneDNN's
# opaque tensors; rebuilt when the layer's packed weight changes
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# A call through oneDNN costs ~80 us more than the float path's before its arithmetic (the codes,
# oneDNN's call, the offset term), and its code leaves the caches cold for the layers after it
# (the BatchNorm after it took 21 us instead of 10). Timed in a chain (a float conv, BatchNorm,
# ReLU, then the SBS layer, BatchNorm, ReLU; 2-core Zen 4, batch 1 unless named), 3x3 stride-2
# layers of 2.4M multiply-adds ran 1.05x slower as int8, 7.2M and 9.4M 0.89-0.91x faster. Below
# MIN_MACS such calls take the float path.
MIN_MACS = 1 << 22
# 3x3 stride-1 layers, whose float path is lut_conv2d's Winograd F(2x2, 3x3), ran 1.03-1.26x
# slower as int8 from 2.4M up to 18.9M multiply-adds (16 to 128 channels, batch 1 to 8: every
# 3x3 layer of a CIFAR ResNet at batch 1 and 8), even at 37.7M (64 channels at 32x32: 1.00x), and
# 0.86-0.89x faster from 28.9M (128 channels at 14x14) and 116M (64 at 56x56, 128 at 28x28).
WINOGRAD_MIN_MACS = 1 << 25
# oneDNN's int8 convolution over an RGB stem (3 input channels) in channels-last ran at 0.25-0.9x
# the float path (MobileNetV2's 3x3 stride-2 stem 0.96 against 0.35 ms at batch 1, ResNet-18's 7x7
# 1.55 against 1.38): convolutions over fewer input channels than this take the float path. (NCHW
# stems kept the int8 path while its output was channels-last whatever x's layout, for the
# layout it moved the network to; its output now follows x's, as every conv's.)
MIN_CHANNELS = 4

# GEMMs (PackedLinear, 1x1 convolutions) of at most GEMM_MACS multiply-adds and GEMM_OUTPUTS
# outputs run as torch._int_mm on unpacked s8 weights, then one pass to float32: oneDNN's quantized
# convolution and GEMM cost ~30-40 us a call more. Larger ones go through oneDNN, whose prepacked
# (blocked) weight and fused output then win (2-core Zen 4; ms in docs/kernels.md), except NCHW
# 1x1 convolutions: oneDNN's channels-last output would need a transposing copy.
GEMM_MACS = 1 << 26
GEMM_OUTPUTS = 1 << 20
# Smaller GEMMs take the float path: timed after a float nn.Linear at batch 1, int8 ran at
# 0.96-1.01x from 128 x 10 to 1024 x 1024 (8 rows of 256 x 256: 0.93x), and in the demo's SBS
# model its 128 -> 10 classifier took 54 us as int8 against 39 us (and its first layer 8-12 us
# more) once the float path's quantizer stopped checking its grid on every call.
MIN_GEMM_MACS = 1 << 16
# GEMMs over pixel rows (channels-last 1x1 convolutions, linear layers) with fewer input or output
# channels than this take the float path: their sums are cheap next to the extra pass over y (the
# grid-offset term) and the codes, and torch._int_mm runs narrow shapes slowly. MobileNetV2's
# 24 -> 12 and 12 -> 72 layers at 112 x 112 took 0.24 and 0.33 ms as int8 against 0.15 and 0.22 on
# the float path at batch 1, 1.29 and 2.86 against 0.83 and 2.05 at batch 8; its 24 -> 108,
# 72 -> 24 and 108 -> 24 layers ran 0.66-0.9x faster as int8. (NCHW 1x1 layers, per image W times
# the codes, ran as fast or faster as int8 at both sizes.)
MIN_ROW_CHANNELS = 16
# Sums of k - 128 times c - m (and the offset term) stay in int32 up to this depth: 255 * 128 each.
MAX_DEPTH = (2**31 - 1) // (255 * 128)

GRID_TOLERANCE = 8  # float32 eps of the largest level: SBS's grids, computed in float32, are within 2


def uniform_grid(codebook: Tensor) -> bool:
    """Whether the levels are a + d k for k = 0 .. 2^b - 1 (the int8 path computes with that fit)
    within the float32 rounding of computing each level (Lloyd-Max grids are 1e-3 or more off)."""
    grid = codebook.double()
    k = torch.arange(grid.numel(), dtype=torch.float64)
    step = (grid[-1] - grid[0]) / (grid.numel() - 1)
    tolerance = GRID_TOLERANCE * torch.finfo(torch.float32).eps * grid.abs().max()
    return bool(step != 0) and bool(((grid - (grid[0] + step * k)).abs() <= tolerance).all())


class Prepacked(NamedTuple):
    weight: Tensor | None  # oneDNN's s8 weight; None for a small GEMM (torch._int_mm on Int8Weight.rows)
    factor: Tensor         # s_x d scale_c (C,): the small GEMM's sums to y
    offset: Tensor         # (128 - j) sum_k (c - m) (C,), int32: the small GEMM multiplies k - 128
    window_factor: Tensor  # c0 scale_c s_x (C,): multiplies each output's window sum of k - j
    shift: Tensor | None   # signed grids: (C,) added to the bias, or (1, C, H_out, W_out) with padding


class Int8Weight:
    """A layer's weight for the int8 path: whether it qualifies (one group, no bitmap, a uniform
    grid), its scales and grid offset, and oneDNN's prepacked s8 weights (``prepacked``)."""

    MAX_PREPACKED = 4  # input shapes and activation grids a layer keeps prepacked weights for

    def __init__(self, layer):
        self.packed = packed = layer.packed_weight()
        self.conv = len(packed.shape) == 4
        self.applies = (_AVAILABLE and getattr(layer, "groups", 1) == 1 and packed.keep_bitmap is None
                        and packed.row_length <= MAX_DEPTH and uniform_grid(packed.codebook))
        if not self.applies:
            return
        grid = packed.codebook.double()
        self.mid = grid.numel() // 2
        step = (grid[-1] - grid[0]) / (grid.numel() - 1)
        scale = packed.channel_scale.double()
        self.step_scale = step * scale
        self.scales = self.step_scale.float()
        self.zeros = torch.zeros(scale.numel(), dtype=torch.int64)
        self.grid_offset = (grid[0] + step * self.mid) * scale  # c0 scale_c
        self.pointwise = True  # a GEMM: a linear layer, or a 1x1 convolution without padding
        if self.conv:
            self.window = torch.ones(1, 1, *layer.kernel_size)
            # the padding the convolution applies (a padding_mode other than zeros padded x already)
            self.geometry = [conv_pair("PackedConv2d", name, value, minimum) for name, value, minimum in
                             (("stride", layer.stride, 1), ("padding", layer.conv_padding, 0),
                              ("dilation", layer.dilation, 1))]
            self.pointwise = tuple(layer.kernel_size) == (1, 1) and not any(self.geometry[1])
        # the float path's geometry for Winograd F(2x2, 3x3) (lut_conv2d's CPU kernel; see WINOGRAD_MIN_MACS)
        self.winograd = (self.conv and tuple(layer.kernel_size) == (3, 3) and self.geometry[0] == [1, 1]
                         and self.geometry[2] == [1, 1] and 8 <= packed.shape[1] <= 2048 and packed.shape[0] >= 8)
        # c - m as (C, K) s8 rows: the small GEMMs' weight (x W^T through this view for one row)
        self.rows = None
        if self.pointwise:
            self.rows = (packed.code_values() - self.mid).reshape(scale.numel(), -1).to(torch.int8)
        self._columns = None
        self._prepacked: dict = {}

    def columns(self) -> Tensor:
        """W^T (K, C) contiguous, made at the first use: X W^T on more than one pixel row (49 x 2048
        by 2048 x 384: 0.13 ms, 0.24 through the transposed view of ``rows``, which is faster for a
        single row: 0.05 against 0.15 ms at 2048 x 2048)."""
        if self._columns is None:
            self._columns = self.rows.t().contiguous()
        return self._columns

    def prepacked(self, x_shape: tuple[int, ...], x_scale: float, x_zero: int, signed: bool,
                  gemm: bool) -> Prepacked:
        """The terms for this activation grid, with oneDNN's weight for this input shape unless the
        call is a small GEMM (``gemm``, whose terms serve every shape): its layout follows the
        shape (a weight packed for another one is reordered on every call, 10-30 ms on 3x3
        layers)."""
        key = (None if gemm else x_shape, x_scale, x_zero, signed)
        if key not in self._prepacked:
            if len(self._prepacked) >= self.MAX_PREPACKED:
                self._prepacked.clear()
            codes = self.packed.code_values() - self.mid
            if gemm:
                weight = None
            elif self.conv:
                weight = torch.ops.onednn.qconv_prepack(codes.to(torch.int8), self.scales, x_scale, x_zero,
                                                        *self.geometry, 1, list(x_shape))
            else:
                weight = torch.ops.onednn.qlinear_prepack(codes.to(torch.int8), list(x_shape))
            shift = None
            if signed:  # x_hat = s_x (k - j - 1/2): add -s_x / 2 conv(1 where x is, W)
                w = codes.double() * self.step_scale.view(-1, *[1] * (codes.dim() - 1))
                w = w + self.grid_offset.view(-1, *[1] * (codes.dim() - 1))
                if self.conv:
                    ones = torch.ones((1,) + tuple(x_shape[1:]), dtype=torch.float64)
                    shift = (-0.5 * x_scale * F.conv2d(ones, w, None, *self.geometry)).float()
                    if not any(self.geometry[1]):  # no padding: a constant per channel, folded into the bias
                        shift = shift[0, :, 0, 0].contiguous()
                else:
                    shift = (-0.5 * x_scale * w.sum(1)).float()
            offset = (128 - x_zero) * codes.reshape(codes.shape[0], -1).sum(1)
            self._prepacked[key] = Prepacked(weight, (x_scale * self.step_scale).float(), offset.to(torch.int32),
                                             (self.grid_offset * x_scale).float(), shift)
        return self._prepacked[key]

    def strided(self, t: Tensor) -> Tensor:
        """A 1x1 convolution's pixels of t (N, ., H, W): every stride-th (no slicing at stride 1)."""
        (sh, sw) = self.geometry[0]
        return t if sh == sw == 1 else t[:, :, ::sh, ::sw]

    def window_sums(self, sums: Tensor) -> Tensor:
        """(N, 1, H_out, W_out): the per-pixel sums summed over each output's window."""
        if self.pointwise:  # the window is the pixel
            return self.strided(sums)
        return F.conv2d(sums, self.window, None, *self.geometry)


class Call(NamedTuple):
    cache: Int8Weight
    grid: object      # the input quantizer's FixedGrid
    x_scale: float    # s_x
    x_zero: int       # j
    gemm: bool        # a small GEMM (GEMM_MACS, GEMM_OUTPUTS): torch._int_mm
    nchw: bool        # a 4-D x laid out NCHW (or not dense: made so), y laid out alike


def _prepare(layer, x: Tensor, dims: int) -> Call | None:
    """How the int8 path runs this call, or None where it does not qualify."""
    fixed_grid = getattr(layer.input_quant, "fixed_grid", None)
    if (not _enabled or fixed_grid is None or torch.is_grad_enabled() or not x.is_cpu
            or x.dtype != torch.float32 or x.dim() < dims or (dims == 4 and x.dim() != 4) or x.numel() == 0
            or layer.backend is not None or selected() is not None):  # a backend chosen: its kernels
        return None
    weight_shape = layer.weight_shape
    if x.shape[1 if dims == 4 else -1] != weight_shape[1]:
        return None  # the float path names the mismatch
    cache = _WEIGHTS.get(layer)
    if cache is None or cache.packed is not layer.packed_weight():
        cache = _WEIGHTS[layer] = Int8Weight(layer)
    if not cache.applies:
        return None
    macs = x.numel() * weight_shape[0]
    if dims == 4:  # per input pixel and tap, over the stride's share of the pixels
        macs = macs * math.prod(weight_shape[2:]) // math.prod(cache.geometry[0])
    # NCHW 1x1 layers of any size: oneDNN's channels-last y would need a transposing copy (_small_gemm)
    nchw = dims == 4 and memory_format(x) is torch.contiguous_format
    gemm = cache.pointwise and (nchw or macs <= GEMM_MACS and macs <= GEMM_OUTPUTS * math.prod(weight_shape[1:]))
    if gemm and macs < MIN_GEMM_MACS or cache.pointwise and not nchw and min(weight_shape[:2]) < MIN_ROW_CHANNELS:
        return None
    few_channels = weight_shape[1] < MIN_CHANNELS  # RGB stems (see MIN_CHANNELS)
    if not gemm and (macs < (WINOGRAD_MIN_MACS if cache.winograd else MIN_MACS) or few_channels):
        return None
    grid = fixed_grid()  # after the size checks: it costs a few microseconds, a small layer's call
    if grid is None:
        return None
    n, clip = levels(grid.bits), float(grid.clip)
    if grid.signed:  # levels v (2 k / n - 1) = s_x (k - j - 1/2), j = (n - 1) / 2
        return Call(cache, grid, 2.0 * clip / n, (n - 1) // 2, gemm, nchw)
    # levels v (k / n - z0) = s_x (k - j), j = z0 n
    return Call(cache, grid, clip / n, 0 if grid.zero_point is None else round(float(grid.zero_point) * n), gemm,
                nchw)


def takes_int8(layer, x: Tensor) -> bool:
    """Whether ``int8_conv2d`` (a 4-D x into a conv layer) or ``int8_linear`` would run x."""
    return _prepare(layer, x, 4 if len(layer.weight_shape) == 4 else 1) is not None


def _bias(layer, packed: Prepacked) -> Tensor | None:
    bias = None if layer.bias is None else layer.bias.detach()
    if packed.shift is not None and packed.shift.dim() == 1:
        return packed.shift if bias is None else bias + packed.shift
    return bias


def _eager(fn):
    """fn, run as it is under torch.compile: a graph break (compiled = eager results; fullgraph=True
    on an SBS model needs set_int8(False)); in eager mode called directly (torch.compiler.disable's
    wrapper costs ~25 us a call). Layers without an input quantizer do not call it."""
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(layer, x: Tensor) -> Tensor | None:
        return disabled(layer, x) if torch.compiler.is_compiling() else fn(layer, x)
    return call


def _small_gemm(call: Call, packed: Prepacked, q: Tensor, bias: Tensor | None, window_sums: Tensor) -> Tensor:
    """y of a 1x1 convolution (q (N, K, H_out, W_out), its pixels picked from x's) or a GEMM (q
    (M, K, 1, 1)) through torch._int_mm on q = k - 128 (``bit_sharing_codes``' centered codes; the
    shift is added back as ``offset`` in int32), in x's layout: for an NCHW x (``call.nchw``) per image
    W (C, K) times its codes (K, H W); else pixel rows times W^T, channels-last. (Pixel rows from
    NCHW codes, and their y laid out back, cost two transposing copies: 3x the GEMM at 144 output
    channels and 56 x 56, 6.5x at 256.) Then one pass (``int8_epilogue_``) to float32 s_x d
    scale_c (sums + offset) + bias + the offset term, written over the sums."""
    n, k, h, w = q.shape
    if call.nchw and h * w > 1:
        q = q.contiguous()
        acc = torch.empty(n, call.cache.rows.shape[0], h * w, dtype=torch.int32)
        for image in range(n):
            torch._int_mm(call.cache.rows, q[image].view(k, h * w), out=acc[image])
        acc = acc.view(n, -1, h, w)
    else:
        pixels = q.permute(0, 2, 3, 1).reshape(-1, k)  # a view of channels-last codes, else one copy
        weight = call.cache.rows.t() if pixels.shape[0] == 1 else call.cache.columns()
        acc = torch._int_mm(pixels, weight).view(n, h, w, -1).permute(0, 3, 1, 2)
    torch.ops.mixedprec.int8_epilogue_(acc, packed.offset, packed.factor, bias, window_sums.contiguous(),
                                       packed.window_factor)
    return acc.view(torch.float32)  # y, written over the sums


@_eager
def int8_conv2d(layer, x: Tensor) -> Tensor | None:
    """y of ``layer`` (a PackedConv2d) on x through the int8 convolution, or None where the call
    does not qualify (the caller then takes the float path). The layer's ``input_quant`` names
    its grid through ``fixed_grid()`` (``mixedprec.sbs.BitSharingQuantizer``)."""
    call = _prepare(layer, x, 4)
    if call is None:
        return None
    cache, grid = call.cache, call.grid
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    packed = cache.prepacked(tuple(x.shape), call.x_scale, call.x_zero, grid.signed, call.gemm)
    # oneDNN's convolution takes channels-last codes (it copied NCHW ones so, slowly); small GEMMs, x's layout
    codes, sums = torch.ops.mixedprec.bit_sharing_codes(x, grid.clip, grid.bits, grid.signed, grid.zero_point,
                                                        call.gemm, not call.gemm)
    if call.gemm:
        return _small_gemm(call, packed, cache.strided(codes), _bias(layer, packed), cache.window_sums(sums))
    y = torch.ops.onednn.qconv2d_pointwise(codes, call.x_scale, call.x_zero, packed.weight, cache.scales,
                                           cache.zeros, _bias(layer, packed), *cache.geometry, 1, 1.0, 0,
                                           torch.float32, "none", [], "")
    window_sums = cache.window_sums(sums)
    shift = packed.shift if packed.shift is not None and packed.shift.dim() > 1 else None
    if call.nchw:
        # oneDNN's layout is channels-last; y takes x's, as F.conv2d's does: an NCHW model stays
        # NCHW (a channels-last y broke models that .view() a conv's output). One pass lays it out
        # and adds the terms: torch's transposing copy took 4-16x a plain copy's time.
        return torch.ops.mixedprec.int8_nchw_epilogue(y, window_sums, packed.window_factor, shift)
    y.addcmul_(window_sums, packed.window_factor.view(1, -1, 1, 1))
    return y if shift is None else y.add_(shift)


@_eager
def int8_linear(layer, x: Tensor) -> Tensor | None:
    """y of ``layer`` (a PackedLinear) on x (..., in_features) through the int8 GEMM, or None
    where the call does not qualify (as ``int8_conv2d``)."""
    call = _prepare(layer, x, 1)
    if call is None:
        return None
    cache, grid = call.cache, call.grid
    rows = x.reshape(-1, x.shape[-1]).contiguous()[:, :, None, None]  # (M, K, 1, 1): a row per pixel
    # oneDNN packed it alike for every M tried (1..256 rows of a 2048x2048 layer, each as fast on
    # every packing), so one packing serves every batch and sequence length
    packed = cache.prepacked((1, x.shape[-1]), call.x_scale, call.x_zero, grid.signed, call.gemm)
    codes, sums = torch.ops.mixedprec.bit_sharing_codes(rows, grid.clip, grid.bits, grid.signed, grid.zero_point,
                                                        call.gemm)
    if call.gemm:
        y = _small_gemm(call, packed, codes, _bias(layer, packed), sums).view(rows.shape[0], -1)
    else:
        y = torch.ops.onednn.qlinear_pointwise(codes.view(rows.shape[0], -1), call.x_scale, call.x_zero,
                                               packed.weight, cache.scales, cache.zeros, _bias(layer, packed), 1.0, 0,
                                               torch.float32, "none", [], "")
        y.addcmul_(sums.view(-1, 1), packed.window_factor)
    return y.view(*x.shape[:-1], -1)
