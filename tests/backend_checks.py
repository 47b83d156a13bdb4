"""Each op's backend against the reference (forward and gradients) with the tolerances its tests
set: shared by the per-op tests and the property tests (tests/test_properties.py).

Elementwise ops (bit_sharing_quant, codebook_quant) spell their arithmetic like the reference and
must agree bit for bit; bit_sharing_quant's clip and threshold gradients are sums over the tensor,
allowed float32 summation's error (float32_sum_tolerance). Dot-product ops (lowbit_linear,
lut_conv2d) accumulate in float32 against a float64 reference: rtol = atol = 1e-4 for float32,
plus one unit in the last place of float16 and bfloat16 outputs (dot_tolerance), atol measured in
units of ``scale`` (inputs scaled by a power of two scale the exact result by it), plus, where
inputs mix wildly different magnitudes, float32 accumulation's worst-case error bound (for the
CPU kernel's Winograd convolutions, that algorithm's bound: winograd_bound).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mixedprec import ops
from mixedprec.backends import reference

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_U32, _ETA32 = 2.0 ** -24, 2.0 ** -149  # float32 unit roundoff, smallest subnormal


def assert_same(actual: Tensor, expected: Tensor) -> None:
    """Bit for bit (so +0 and -0 differ), except that any NaN matches any NaN: torch's float ->
    bfloat16 conversion drops a NaN's sign, the storage conversions of the C++/CUDA kernels keep it."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN at different positions"
    a, e = (t.masked_fill(nan, 0).contiguous().view(_INT_VIEW[expected.dtype]) for t in (actual, expected))
    mismatch = torch.nonzero(a != e)
    assert mismatch.numel() == 0, (f"{len(mismatch)} elements differ, first at {mismatch[0].tolist()}: "
                                   f"{actual[tuple(mismatch[0])].item()!r} != {expected[tuple(mismatch[0])].item()!r}")


def assert_bfloat16_ties(values: Tensor) -> None:
    """Every float32 value lies exactly halfway between two bfloat16 numbers (its low 16 bits are
    0x8000), so storing it as bfloat16 tests the rounding rule for ties."""
    assert values.dtype == torch.float32
    assert ((values.contiguous().view(torch.int32) & 0xFFFF) == 0x8000).all(), values


def assert_equal_nan(actual: Tensor, expected: Tensor, what: str = "output") -> None:
    """Equal values (+0 equals -0) with NaN at the same positions."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN at different positions"
    differ = actual.masked_fill(nan, 0) != expected.masked_fill(nan, 0)
    assert not differ.any(), (f"{what}: {int(differ.sum())} elements differ, max |diff| "
                              f"{(actual.float() - expected.float())[differ].abs().max()}")


# ---------------------------------------------------------------------------------------------
# bit_sharing_quant

def bit_sharing_run(backend, x, clip, thresholds, grad_y, bits, signed, offset=None):
    """Forward result and gradients (x, clip, thresholds, and offset when given) through the
    public op (the reference composite itself without an offset)."""
    inputs = [t.detach().requires_grad_() for t in (x, clip, thresholds) + (() if offset is None else (offset,))]
    if offset is not None:
        y, residual_mean = ops.bit_sharing_quant(*inputs[:3], bits, signed, backend=backend, offset=inputs[3])[:2]
    elif backend == "reference":
        y, residual_mean = reference.bit_sharing_quant(*inputs, bits, signed)
    else:
        y, residual_mean = ops.bit_sharing_quant(*inputs, bits, signed, backend=backend)[:2]
    grads = torch.autograd.grad(y, inputs, grad_y, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, inputs)]
    return y.detach(), residual_mean, grads


def bit_sharing_term_magnitudes(x, clip, thresholds, grad_y, bits, signed, zero_point=None) -> tuple[Tensor, Tensor]:
    """Per element, a bound on each term of the sums behind dL/dv and dL/d alpha_j (float64, on the
    CPU): for dL/dv, |grad_y| (|y| / v + |x / v| inside the clip range), the two parts the reference
    adds up separately and the kernels as one difference (d y / d v = y / v - x / v inside); for
    dL/d alpha_j (shape (K-1, *x.shape)), the reference's own terms: thresholds given per element
    (expanded to x's shape) take the same gates forward and keep each element's gradient apart."""
    x, clip, grad_y = x.detach().cpu().float(), clip.detach().cpu().float(), grad_y.cpu().float()
    per_element = thresholds.detach().cpu().float().reshape(-1, *[1] * x.dim()).expand(-1, *x.shape)
    per_element = per_element.clone().requires_grad_()
    y, _ = reference.bit_sharing_quant(x, clip, per_element, bits, signed, zero_point=zero_point)
    # (one bitwidth: no thresholds, y does not depend on them)
    threshold_terms = torch.autograd.grad(y, per_element, grad_y)[0] if y.requires_grad else per_element.detach()
    t = x * (1.0 / clip)  # as every backend computes x / v
    u = t if zero_point is None else t + zero_point
    inside = (u > (-1.0 if signed else 0.0)) & (u < 1.0)
    clip_terms = grad_y.abs() * (y.abs() / clip + torch.where(inside, t.abs(), 0.0))
    return clip_terms.double(), threshold_terms.double().abs()


def float32_sum_tolerance(magnitudes: Tensor, sums: int) -> float:
    """How far apart ``sums`` float32 sums of the same N terms (|term_i| <= magnitudes_i), each
    adding them up in its own order (a kernel's chunks, lanes and trees; torch's cascade), may
    lie. Each addition rounds its partial sum s_k by a factor 1 + delta_k, |delta_k| <= u: a sum's
    error is sum_k delta_k s_k over its N - 1 additions. The terms carry grad_y's random signs
    (randn, independent of the order), so E[s_k^2] <= sum_i magnitudes_i^2, and with independent
    roundings (Higham and Mary's probabilistic model) the error's standard deviation is at most
    u sqrt(N / 3) ||magnitudes||_2. Allowed: 6 u sqrt(N) ||magnitudes||_2 per sum (ten standard
    deviations; for N <= 7 also the worst case, whatever the signs), plus 16 u sum(magnitudes)
    for the terms themselves (each rounded up to 8 times, differently, in a kernel and in the
    reference). It grows like sqrt(N) times the terms, as the sums themselves do; a bound linear
    in N let a wrong gradient of a large tensor pass."""
    m = magnitudes[torch.isfinite(magnitudes)].double()  # a non-finite term makes every sum NaN
    return sums * 6 * _U32 * math.sqrt(m.numel()) * m.norm().item() + 16 * _U32 * m.sum().item()


def assert_bit_sharing_matches(backend, x, clip, thresholds, grad_y, bits, signed, offset=None):
    """``backend`` against the reference: forward bit-exact, gradients within float32 sum
    tolerances; ``offset``: the asymmetric grid (its gradient checked too). Returns the
    reference's output."""
    y, residual_mean, (gx, gclip, gthr, *goffset) = bit_sharing_run(backend, x, clip, thresholds, grad_y, bits, signed,
                                                                    offset)
    cpu = [t.cpu() for t in (x, clip, thresholds, grad_y)]
    ry, rmean, (rgx, rgclip, rgthr, *rgoffset) = bit_sharing_run("reference", *cpu, bits, signed,
                                                                 None if offset is None else offset.cpu())
    # Every backend spells the arithmetic like the reference: the forward is bit-exact.
    assert_equal_nan(y.cpu(), ry, f"{backend} output")
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        assert y.is_contiguous(memory_format=torch.channels_last), f"{backend}: a channels-last x gives a channels-last y"
    torch.testing.assert_close(residual_mean.cpu(), rmean, rtol=1e-5, atol=1e-7, equal_nan=True)
    # grad_x is grad_y inside the clip range (the reference multiplies by v * (1/v) ~ 1 + ulp).
    torch.testing.assert_close(gx.cpu(), rgx, equal_nan=True)
    # Sums over the tensor in float32, in another order than the reference's: dL/dv is one sum in
    # the kernels and two in the reference; dL/d alpha_j one in each. rtol: the residual means
    # (a_j <= 1/2, equal to 1e-5 and 1e-7 above) enter alpha_j's factor sigmoid'(a_j - alpha_j),
    # whose relative change is at most |da_j| < 1e-5.
    zero_point = None if offset is None else reference.quant.zero_point(offset.cpu(), bits[0], torch.float32)
    clip_terms, threshold_terms = bit_sharing_term_magnitudes(*cpu, bits, signed, zero_point)
    if offset is not None:  # dL/dz0 = -v sum over the outside of grad_y (two sums in the reference)
        offset_terms = (clip.detach().cpu().double() * grad_y.cpu().double().abs()).flatten()
        torch.testing.assert_close(goffset[0].cpu(), rgoffset[0], rtol=0, atol=float32_sum_tolerance(offset_terms, 3),
                                   equal_nan=True, msg=lambda m: f"{backend} grad offset: {m}")
    torch.testing.assert_close(gclip.cpu(), rgclip, rtol=0, atol=float32_sum_tolerance(clip_terms, 3),
                               equal_nan=True, msg=lambda m: f"{backend} grad clip: {m}")
    for j, terms in enumerate(threshold_terms):
        torch.testing.assert_close(gthr[j].cpu(), rgthr[j], rtol=1e-5, atol=float32_sum_tolerance(terms, 2),
                                   equal_nan=True, msg=lambda m: f"{backend} grad thresholds[{j}]: {m}")
    return ry


# ---------------------------------------------------------------------------------------------
# codebook_quant

def codebook_check(backend, device, weight, codebook, scale, mask, grad=True):
    """The backend's output on ``device`` against the reference's on the CPU, bit for bit; returns
    the backend's. ``grad``: also the gradient, straight-through at kept weights and +0 at pruned
    ones. No kernel computes it (every backend shares the op's one select in Python): this checks
    that the backend's route keeps the op's autograd registration."""
    w = weight.detach().to(device).requires_grad_(grad)
    y = ops.codebook_quant(w, codebook.to(device), scale.to(device), mask.to(device), backend=backend)
    assert_same(y.detach().cpu(), reference.codebook_quant(weight, codebook, scale, mask))
    if grad:
        grad_y = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(weight.dtype)
        y.backward(grad_y.to(device))
        assert_same(w.grad.cpu(), torch.where(mask, grad_y, torch.zeros((), dtype=grad_y.dtype)))
    return y.detach().cpu()


# ---------------------------------------------------------------------------------------------
# lowbit_linear and lut_conv2d: float32-accumulated dot products

def accumulation_bound(terms: int, abs_products: Tensor) -> Tensor:
    """Worst-case error of a float32 sum of ``terms`` products, each of a weight decoded in float32
    (one more rounding): (terms + 2) u sum|x w| plus an underflow of eta per operation."""
    return (terms + 2) * _U32 * abs_products + 2 * terms * _ETA32


# Winograd F(2x2, 3x3): y = A^T [sum_c (G g G^T) . (B^T d B)] A per 2x2 output tile
_BT = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)


def _cpu_has_avx512() -> bool:
    """Whether this CPU has the AVX-512 subsets that the CPU kernels' SIMD code decode and Winograd
    path are compiled for (csrc/cpu/code_decode.h, MP_DECODE_AVX512)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(flags)


CPU_HAS_AVX512 = _cpu_has_avx512()


def takes_winograd(backend: str, weight_shape, conv: dict) -> bool:
    """Whether the CPU kernel computes this convolution through Winograd F(2x2, 3x3)
    (csrc/ops/lut_conv2d/winograd_conv3x3.h, winograd_conv3x3_applies; AVX-512 builds only)."""
    c_out, c_in, kh, kw = weight_shape
    pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)  # noqa: E731
    return (backend == "cpu" and CPU_HAS_AVX512 and (kh, kw) == (3, 3) and pair(conv.get("stride", 1)) == (1, 1)
            and pair(conv.get("dilation", 1)) == (1, 1) and conv.get("groups", 1) == 1 and 8 <= c_in <= 2048
            and c_out >= 8)


def winograd_bound(x: Tensor, weight: Tensor, padding) -> Tensor:
    """Worst-case float32 error of Winograd F(2x2, 3x3) (to first order): every rounding of the
    transforms, the products, the sum over C_in channels and the output transform, (C_in + 12) u,
    times the same computation on |x|, |W| and the transforms' absolute values. Its error follows
    the tile's magnitudes, not sum |x w| as a direct sum's: an outlier meeting a zero weight
    still rounds what it is added to (Barabasz et al., "Error analysis and improving the accuracy
    of Winograd convolution for deep neural networks", 2020)."""
    n, c, h, w = x.shape
    ph, pw = padding if isinstance(padding, (list, tuple)) else (padding, padding)
    oh, ow = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = (oh + 1) // 2, (ow + 1) // 2
    xp = torch.nn.functional.pad(x.double().abs(), (pw, 2 * tw + 2 - w - pw, ph, 2 * th + 2 - h - ph))
    d = xp.unfold(2, 4, 2).unfold(3, 4, 2)  # (N, C, TH, TW, 4, 4)
    bt, g, at = _BT.abs(), _G.abs(), _AT.abs()
    v = torch.einsum("ij,nchwjk,lk->nchwil", bt, d, bt)
    u = torch.einsum("ij,ocjk,lk->ocil", g, weight.double().abs(), g)
    m = torch.einsum("ocij,nchwij->nohwij", u, v)
    y = torch.einsum("ij,nohwjk,lk->nohwil", at, m, at)  # (N, O, TH, TW, 2, 2)
    y = y.permute(0, 1, 2, 4, 3, 5).reshape(n, weight.shape[0], 2 * th, 2 * tw)[:, :, :oh, :ow]
    return (c + 12) * _U32 * y + 2 * (16 * c + 30) * _ETA32


def dot_tolerance(x_dtype: torch.dtype) -> float:
    """rtol = atol (in units of scale) of a dot product's output in ``x_dtype``: 1e-4 for the float32
    accumulation, plus, where the output is narrower than float32, its rounding: the kernel rounds
    its float32 result, the reference its float64 one, each by at most half a unit in the last
    place, so they differ by at most eps |y| more (eps = 2^-10 for float16, 2^-7 for bfloat16;
    float16's subnormal spacing 2^-24 is eps * 2^-14, and float16 cases keep scale >= 2^-14)."""
    return 1e-4 + (0.0 if x_dtype == torch.float32 else torch.finfo(x_dtype).eps)


def assert_dot_close(actual: Tensor, expected: Tensor, what: str, tol: float, scale: float = 1.0,
                     bound: Tensor | None = None) -> None:
    """|actual - expected| <= tol * (scale + |expected|) + bound, the same NaN and infinities."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    nan = torch.isnan(e)
    assert torch.equal(torch.isnan(a), nan), f"{what}: NaN at different positions"
    infinite = torch.isinf(e) | torch.isinf(a)
    assert torch.equal(a[infinite], e[infinite]), f"{what}: infinities differ"
    allowed = tol * scale + tol * e.abs()
    if bound is not None:
        allowed = allowed + bound.cpu().double()
    bad = ~nan & ~infinite & ((a - e).abs() > allowed)
    if bad.any():
        i = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off, first at {list(i)}: "
                             f"{a[i].item()!r} vs {e[i].item()!r} (allowed {allowed[i].item():.3g})")


def _forward_backward(fn, x, bias, grad_y):
    x = x.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = fn(x, bias)
    inputs = (x,) if bias is None else (x, bias)
    return (y.detach(), *torch.autograd.grad(y, inputs, grad_y.to(y.device)))


def _assert_results(backend, got, want, tol, scales, bound):
    """(y, grad_x[, grad_bias]) of a backend vs the reference's; returns the backend's y."""
    assert_dot_close(got[0], want[0], f"{backend} y", tol, scales[0], bound)
    assert_dot_close(got[1], want[1], f"{backend} grad_x", tol, scales[1])
    if len(got) > 2:
        assert_dot_close(got[2], want[2], f"{backend} grad_bias", tol)
    return got[0]


def lowbit_check(backend, device, packed, x, bias=None, grad_y=None, *, scales=(1.0, 1.0), mixed=False):
    """Forward and grads (x, bias) of a backend vs the reference; returns the backend's y.
    ``scales``: the power-of-two scales of y and of grad_x (grad_bias is in grad_y's units);
    ``mixed``: x mixes magnitudes, so y is also allowed float32 accumulation's bound."""
    out_features, in_features = packed.shape
    if grad_y is None:
        grad_y = torch.randn(*x.shape[:-1], out_features, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    got = _forward_backward(lambda x_, b: ops.lowbit_linear(x_, packed.to(device), b, backend=backend),
                            x.to(device), None if bias is None else bias.to(device), grad_y)
    want = _forward_backward(lambda x_, b: reference.lowbit_linear(x_, packed.to("cpu"), b), x.cpu(),
                             None if bias is None else bias.cpu(), grad_y.cpu())
    bound = None
    if mixed:
        weight = packed.to("cpu").decode(torch.float64)
        bound = accumulation_bound(in_features, x.cpu().double().abs() @ weight.abs().T)
    return _assert_results(backend, got, want, dot_tolerance(x.dtype), scales, bound)


def lut_conv2d_check(backend, device, x, packed, bias, grad_y, conv: dict, *, scales=(1.0, 1.0), mixed=False):
    """lowbit_check for lut_conv2d with conv arguments ``conv`` (stride, padding, dilation, groups)."""
    got = _forward_backward(lambda x_, b: ops.lut_conv2d(x_, packed.to(device), b, backend=backend, **conv),
                            x.to(device), None if bias is None else bias.to(device), grad_y)
    want = _forward_backward(lambda x_, b: reference.lut_conv2d(x_, packed.to("cpu"), b, **conv), x.cpu(),
                             None if bias is None else bias.cpu(), grad_y.cpu())
    bound = None
    if mixed:
        weight = packed.to("cpu").decode(torch.float64)
        abs_products = torch.nn.functional.conv2d(x.cpu().double().abs(), weight.abs(), None, **conv)
        bound = accumulation_bound(packed.row_length, abs_products)
        if takes_winograd(backend, packed.shape, conv):
            bound = torch.maximum(bound, winograd_bound(x.cpu(), weight, conv.get("padding", 0)))
    assert got[0].dtype == x.dtype and got[1].dtype == x.dtype
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        assert got[0].is_contiguous(memory_format=torch.channels_last), "a channels-last x gives a channels-last y"
    return _assert_results(backend, got, want, dot_tolerance(x.dtype), scales, bound)
