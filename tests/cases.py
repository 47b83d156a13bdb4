"""Cases of the property tests (tests/test_properties.py) and the hypothesis strategies that draw them.

Tensors are drawn as small recipes (a kind, a power-of-two exponent, a seed) and built with
torch's generator: examples stay fast, shrink well and print readably. Exponent ranges are per
dtype and per op: elementwise ops take the dtype's whole range (overflow to inf and subnormals
included); dot-product ops keep their float32 sums finite, so that a kernel and the float64
reference can be compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

from mixedprec.backends import reference
from mixedprec.formats import PackedWeight, pack_weight

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def shapes(draw, min_dims: int, max_dims: int, max_numel: int, allow_empty: bool = True) -> tuple[int, ...]:
    """Mostly non-empty shapes with size-1 dims common; one in ten empty when allowed."""
    shape = []
    # 0-dim last: hypothesis draws the first choices (and the low end of integers()) most often
    for _ in range(draw(st.sampled_from(sorted(range(min_dims, max_dims + 1), key=lambda d: d == 0)))):
        budget = max(1, max_numel // max(1, math.prod(shape)))
        shape.append(draw(st.integers(1, budget)))
    if shape and allow_empty and draw(st.sampled_from([False] * 9 + [True])):
        shape[draw(st.integers(0, len(shape) - 1))] = 0
    return tuple(shape)


def exponents(low: int, high: int, unit: int = 4) -> st.SearchStrategy[int]:
    """Half of the draws near unit scale (|e| <= unit), half anywhere in [low, high]."""
    return st.one_of(st.integers(max(low, -unit), min(high, unit)), st.integers(low, high))


def elementwise_exponents(dtype: torch.dtype) -> st.SearchStrategy[int]:
    """The dtype's whole range: from its subnormals to past its largest finite value."""
    info = torch.finfo(dtype)
    return exponents(round(math.log2(info.smallest_normal * info.eps)), round(math.log2(info.max)))


def dot_exponents(dtype: torch.dtype) -> st.SearchStrategy[int]:
    """Input and weight exponents whose products and sums stay finite and normal in float32 (and,
    for float16 outputs, inside float16's range)."""
    return exponents(-7, 2) if dtype == torch.float16 else exponents(-48, 48)


LAYOUTS = ("contiguous", "strided", "reversed")


@dataclass(frozen=True)
class Values:
    """A float tensor: randn * 2**exponent ("scaled"); one such value everywhere ("equal"); scaled
    values with 30% replaced by +-0, +-2**outlier and the dtype's smallest normal and subnormal
    numbers ("mixed"); or with 30% replaced by NaN and +-inf ("nonfinite"). Laid out contiguously,
    as a view of every other element of a buffer ("strided"), or with its strides in reverse order
    ("reversed": a transpose, channels-last-like for 4-D)."""
    kind: str
    exponent: int
    seed: int
    outlier: int = 0
    layout: str = "contiguous"

    def tensor(self, shape, dtype: torch.dtype) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        values = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 ** self.exponent
        if self.kind == "equal":
            values = torch.full(shape, values.flatten()[0].item() if values.numel() else 0.0, dtype=torch.float64)
        elif self.kind in ("mixed", "nonfinite"):
            info = torch.finfo(dtype)
            big, normal, subnormal = 2.0 ** self.outlier, info.smallest_normal, info.smallest_normal * info.eps
            pool = ([0.0, -0.0, big, -big, normal, -normal, subnormal, -subnormal] if self.kind == "mixed"
                    else [math.nan, math.inf, -math.inf])
            special = torch.tensor(pool, dtype=torch.float64)[torch.randint(len(pool), shape, generator=g)]
            values = torch.where(torch.rand(shape, generator=g) < 0.3, special, values)
        values = values.to(dtype)
        if self.layout == "strided":
            return torch.stack([values, torch.zeros_like(values)], dim=-1)[..., 0]
        if self.layout == "reversed":
            dims = tuple(reversed(range(values.dim())))
            return values.permute(dims).contiguous().permute(dims)
        return values

    @property
    def mixes_magnitudes(self) -> bool:
        """Whether a dot product of these values needs float32 accumulation's error bound, not just
        a tolerance in units of 2**exponent (dot_exponents keep the other kinds normal)."""
        return self.kind == "mixed"


@st.composite
def values(draw, exponent: st.SearchStrategy[int]) -> Values:
    return Values(draw(st.sampled_from(["scaled", "equal", "mixed", "nonfinite"])), draw(exponent), draw(seeds),
                  draw(exponent), draw(st.sampled_from(LAYOUTS)))


# ---------------------------------------------------------------------------------------------
# bit_sharing_quant

GATE_CHOICES = ("below", "above", "zero", "negative", "huge")  # threshold vs the residual mean a


@dataclass(frozen=True)
class BitSharingCase:
    shape: tuple[int, ...]
    dtype: torch.dtype
    x: Values
    bits: tuple[int, ...]
    signed: bool
    clip: float
    gates: tuple[str, ...]  # per threshold, one of GATE_CHOICES
    seed: int

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x, clip, thresholds, grad_y). Thresholds sit at half or 1.5 times the reference's
        residual means (a gate decision far from a tie), at 0, at -1 (on) or at 1e30 (off)."""
        x = self.x.tensor(self.shape, self.dtype)
        clip = torch.tensor(self.clip, dtype=torch.float32)
        _, mean = reference.bit_sharing_quant(x, clip, torch.zeros(len(self.bits) - 1), self.bits, self.signed)
        mean = torch.nan_to_num(mean, nan=0.0)
        factor = {"below": 0.5, "above": 1.5, "zero": 0.0, "negative": 0.0, "huge": 0.0}
        offset = {"below": 0.0, "above": 0.0, "zero": 0.0, "negative": -1.0, "huge": 1e30}
        thresholds = torch.tensor([factor[c] * a + offset[c] for c, a in zip(self.gates, mean.tolist())])
        grad_y = torch.randn(self.shape, generator=torch.Generator().manual_seed(self.seed)).to(self.dtype)
        return x, clip, thresholds.float(), grad_y


# the design's sets and any ascending set of 1 to 8 bitwidths in 1..16 (the op's limits)
bit_sets = st.one_of(st.sampled_from([(2, 4, 8), (2, 4), (1, 2, 4, 8), (4, 8)]),
                     st.lists(st.integers(1, 16), min_size=1, max_size=8, unique=True).map(lambda b: tuple(sorted(b))))
# Clips from float32's smallest normal (the op refuses smaller ones) to 2^64: above, the reference's
# float32 chain rule (2 v grad_y first, then times 1 / v) overflows where the kernels' closed form
# does not.
valid_clips = st.floats(min_value=torch.finfo(torch.float32).smallest_normal, max_value=2.0 ** 64, width=32)


@st.composite
def bit_sharing_cases(draw, max_numel: int) -> BitSharingCase:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    bits = draw(bit_sets)
    clip = draw(st.one_of(st.floats(0.25, 4.0, width=32), valid_clips))
    gates = tuple(draw(st.sampled_from(GATE_CHOICES)) for _ in bits[1:])
    return BitSharingCase(draw(shapes(0, 4, max_numel)), dtype, draw(values(elementwise_exponents(dtype))), bits,
                          draw(st.booleans()), clip, gates, draw(seeds))


# ---------------------------------------------------------------------------------------------
# codebook_quant

@dataclass(frozen=True)
class CodebookCase:
    shape: tuple[int, ...]
    dtype: torch.dtype
    weight: Values
    levels: int
    codebook_kind: str     # "spread": sorted randn * 2**codebook_exponent; "extreme": its ends at
    codebook_exponent: int  # +-float32 max; "adjacent": its top three levels adjacent floats
    scale_exponent: int     # channel scales (1 + U[0, 1)) * 2**e, e within scale_spread of it
    scale_spread: int
    keep: float
    seed: int

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(weight, codebook, channel_scale, keep_mask)."""
        g = torch.Generator().manual_seed(self.seed)
        codebook = torch.unique(torch.randn(self.levels, generator=g) * 2.0 ** self.codebook_exponent)
        if self.codebook_kind == "extreme" and len(codebook) >= 2:
            codebook[0], codebook[-1] = -torch.finfo(torch.float32).max, torch.finfo(torch.float32).max
        elif self.codebook_kind == "adjacent" and len(codebook) >= 4:
            up = torch.tensor(math.inf)
            codebook[-2] = codebook[-3].nextafter(up)
            codebook[-1] = codebook[-2].nextafter(up)
        channels = self.shape[0]
        e = self.scale_exponent + torch.randint(-self.scale_spread, self.scale_spread + 1, (channels,), generator=g)
        scale = (1 + torch.rand(channels, generator=g, dtype=torch.float64)) * 2.0 ** e.clamp(-148, 126).double()
        mask = torch.rand(self.shape, generator=g) < self.keep
        return self.weight.tensor(self.shape, self.dtype), codebook, scale.float(), mask


keep_fractions = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))


@st.composite
def codebook_cases(draw, max_numel: int) -> CodebookCase:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    return CodebookCase(draw(shapes(1, 4, max_numel)), dtype, draw(values(elementwise_exponents(dtype))),
                        draw(st.integers(1, 256)), draw(st.sampled_from(["spread", "extreme", "adjacent"])),
                        draw(exponents(-120, 120)), draw(exponents(-148, 126)), draw(st.integers(0, 8)),
                        draw(keep_fractions), draw(seeds))


# ---------------------------------------------------------------------------------------------
# packed weights (lowbit_linear, lut_conv2d, the format itself)

@dataclass(frozen=True)
class PackedCase:
    """codes uniform in [0, 2**bits); codebook randn * 2**codebook_exponent (stored as float16);
    channel scales (0.5 + U[0, 1)) * 2**scale_exponent; weights pruned with probability sparsity
    (sparsity 0 passes an all-True mask, which is stored as no bitmap)."""
    shape: tuple[int, ...]
    bits: int
    sparsity: float
    codebook_exponent: int
    scale_exponent: int
    scale_dtype: torch.dtype
    seed: int

    def inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """pack_weight's arguments: (codes, codebook, channel_scale, keep_mask)."""
        g = torch.Generator().manual_seed(self.seed)
        codes = torch.randint(0, 1 << self.bits, self.shape, generator=g)
        codebook = torch.randn(1 << self.bits, generator=g) * 2.0 ** self.codebook_exponent
        scale = ((0.5 + torch.rand(self.shape[0], generator=g)) * 2.0 ** self.scale_exponent).to(self.scale_dtype)
        keep = torch.rand(self.shape, generator=g) >= self.sparsity
        return codes, codebook, scale, keep

    def packed(self) -> PackedWeight:
        codes, codebook, scale, keep = self.inputs()
        return pack_weight(codes, codebook, scale, self.bits, keep)

    @property
    def scale(self) -> float:
        """The power of two the decoded weights are measured in."""
        return 2.0 ** (self.codebook_exponent + self.scale_exponent)


@st.composite
def packed_cases(draw, shape: tuple[int, ...], weight_exponent: st.SearchStrategy[int] = st.just(0)) -> PackedCase:
    """A PackedCase of ``shape`` whose weights are measured in 2**(a draw of weight_exponent)."""
    total = draw(weight_exponent)
    codebook_exponent = draw(st.integers(-8, 8))  # float16 levels: randn * 2**8 stays well inside its range
    scale_exponent = total - codebook_exponent
    fp16_fits = -14 <= scale_exponent <= 14
    scale_dtype = draw(st.sampled_from([torch.float32, torch.float16] if fp16_fits else [torch.float32]))
    sparsity = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    return PackedCase(shape, draw(st.integers(1, 8)), sparsity, codebook_exponent, scale_exponent, scale_dtype,
                      draw(seeds))


def _bias(features: int, scale: float, dtype: torch.dtype, g: torch.Generator) -> Tensor:
    return (torch.randn(features, generator=g, dtype=torch.float64) * scale).to(dtype)


class _DotProductCase:
    x: Values
    packed: PackedCase

    @property
    def scales(self) -> tuple[float, float]:
        """The powers of two y and grad_x are measured in (grad_y is unit-scale)."""
        return 2.0 ** self.x.exponent * self.packed.scale, self.packed.scale


@dataclass(frozen=True)
class LinearCase(_DotProductCase):
    packed: PackedCase
    batch: tuple[int, ...]
    dtype: torch.dtype
    x: Values
    bias: bool
    seed: int

    def tensors(self) -> tuple[Tensor, PackedWeight, Tensor | None, Tensor]:
        """(x, packed, bias, grad_y); bias in y's units."""
        out_features, in_features = self.packed.shape
        g = torch.Generator().manual_seed(self.seed)
        x = self.x.tensor(self.batch + (in_features,), self.dtype)
        bias = _bias(out_features, self.scales[0], self.dtype, g) if self.bias else None
        grad_y = torch.randn(self.batch + (out_features,), generator=g).to(self.dtype)
        return x, self.packed.packed(), bias, grad_y


@st.composite
def linear_cases(draw, max_features: int, max_batch_numel: int) -> LinearCase:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = (draw(st.integers(1, max_features)), draw(st.integers(1, max_features)))
    return LinearCase(draw(packed_cases(shape, dot_exponents(dtype))), draw(shapes(1, 3, max_batch_numel)), dtype,
                      draw(values(dot_exponents(dtype))), draw(st.booleans()), draw(seeds))


@dataclass(frozen=True)
class ConvCase(_DotProductCase):
    packed: PackedCase  # shape (C_out, C_in / groups, kh, kw)
    input_shape: tuple[int, int, int, int]
    conv: dict
    dtype: torch.dtype
    x: Values
    bias: bool
    seed: int

    def tensors(self) -> tuple[Tensor, PackedWeight, Tensor | None, Tensor]:
        """(x, packed, bias, grad_y); bias in y's units."""
        g = torch.Generator().manual_seed(self.seed)
        x = self.x.tensor(self.input_shape, self.dtype)
        packed = self.packed.packed()
        bias = _bias(packed.shape[0], self.scales[0], self.dtype, g) if self.bias else None
        out_shape = torch.nn.functional.conv2d(torch.empty(self.input_shape, device="meta"),
                                               torch.empty(packed.shape, device="meta"), None, **self.conv).shape
        return x, packed, bias, torch.randn(out_shape, generator=g).to(self.dtype)


@st.composite
def conv_cases(draw, max_channels: int, max_extent: int, winograd: bool = False) -> ConvCase:
    """Any geometry with a non-empty output: groups, stride, padding, dilation, batch 0 to 2.
    ``winograd``: only what the CPU kernel's Winograd path takes (3x3, stride 1, dilation 1, one
    group, 8 channels or more in and out), which the general draw almost never gives."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    groups = 1 if winograd else draw(st.integers(1, 3))
    c_in, c_out = (groups * draw(st.integers(8 if winograd else 1, max_channels)) for _ in range(2))
    kernel = [3, 3] if winograd else [draw(st.integers(1, 3)) for _ in range(2)]
    stride, padding, dilation = ([draw(st.integers(lo, hi)) for _ in range(2)] for lo, hi in ((1, 3), (0, 2), (1, 2)))
    if winograd:
        stride, dilation = [1, 1], [1, 1]
    extent = []
    for k, p, d in zip(kernel, padding, dilation):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)  # the input extent that gives one output pixel
        extent.append(draw(st.integers(smallest, smallest + max_extent)))
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    packed = draw(packed_cases((c_out, c_in // groups, *kernel), dot_exponents(dtype)))
    return ConvCase(packed, (draw(st.integers(0, 2)), c_in, *extent), conv, dtype, draw(values(dot_exponents(dtype))),
                    draw(st.booleans()), draw(seeds))
