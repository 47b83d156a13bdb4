"""lut_conv2d: every backend against the float64 reference (forward, grad_x, grad_bias) on odd
geometries, every bitwidth and sparsity; the op's registration (opcheck, torch.compile);
argument checks; PackedConv2d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixedprec import ops
from mixedprec.backends import reference
from mixedprec.formats import pack_weight
from mixedprec.nn import PackedConv2d
from mixedprec.ops import packed_args
from backend_checks import accumulation_bound, lut_conv2d_check, winograd_bound
from conftest import custom_op, needs_avx512, require_backend


def make_packed(weight_shape, bits, sparsity=0.0, seed=0, scale_dtype=torch.float32, device="cpu",
                codebook_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, weight_shape, generator=g)
    codebook = torch.sort(torch.randn(1 << bits, generator=g)).values
    channel_scale = (0.5 + torch.rand(weight_shape[0], generator=g)).to(scale_dtype)
    keep = torch.rand(weight_shape, generator=g) >= sparsity
    return pack_weight(codes, codebook, channel_scale, bits, keep, codebook_dtype=codebook_dtype).to(device)


def assert_matches_reference(backend, device, x_shape, weight_shape, bits=4, sparsity=0.0, dtype=torch.float32,
                             with_bias=True, seed=0, strided_x=False, channels_last=False, mixed=False,
                             codebook_dtype=torch.float16, **conv):
    g = torch.Generator().manual_seed(seed)
    packed = make_packed(weight_shape, bits, sparsity, seed, codebook_dtype=codebook_dtype)
    if strided_x:  # every other column of a twice-as-wide buffer: not contiguous
        x = torch.randn(*x_shape[:3], 2 * x_shape[3], generator=g)[..., ::2].to(dtype)
        assert not x.is_contiguous()
    else:
        x = torch.randn(x_shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    bias = torch.randn(weight_shape[0], generator=g) if with_bias else None
    grad_y = torch.randn(reference.lut_conv2d(x, packed, bias, **conv).shape, generator=g).to(dtype)
    lut_conv2d_check(backend, device, x, packed, bias, grad_y, conv, mixed=mixed)


def assert_nonfinite_where_reference_is(y, want):
    """y is NaN or inf exactly where the reference is, and close to it (float32) elsewhere."""
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(y), finite)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-4, atol=1e-4)


BACKENDS = ["cpu", "simt", "triton", "cuda"]

# (x shape, weight shape, conv arguments): small enough for the SIMT emulation and the Triton interpreter
GEOMETRIES = [
    ((1, 3, 5, 7), (4, 3, 3, 3), {}),
    ((2, 5, 9, 8), (7, 5, 3, 3), dict(padding=1)),
    ((2, 4, 11, 10), (6, 4, 3, 2), dict(stride=(2, 3), padding=(1, 2))),
    ((1, 3, 9, 9), (5, 3, 3, 3), dict(dilation=2, padding=2)),
    ((2, 6, 7, 6), (9, 2, 3, 3), dict(groups=3, padding=1, stride=2)),
    ((3, 5, 6, 7), (5, 1, 3, 3), dict(groups=5, padding=1)),  # depthwise
    ((2, 8, 5, 5), (3, 8, 1, 1), {}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(GEOMETRIES)))
def test_geometries(backend, case):
    device = require_backend(backend)
    x_shape, weight_shape, conv = GEOMETRIES[case]
    assert_matches_reference(backend, device, x_shape, weight_shape, sparsity=0.3, seed=case, **conv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_bitwidth_and_sparsity(backend):
    """The full product on the cpu kernel; each bitwidth with two of the sparsities (all four
    covered twice) on the emulated/interpreted backends, which are slow here."""
    device = require_backend(backend)
    sparsities = (0.0, 0.5, 0.9, 1.0)
    slow = backend in ("simt", "triton") and device.type == "cpu"
    for bits in range(1, 9):
        for sparsity in (sparsities[bits % 4], sparsities[(bits + 2) % 4]) if slow else sparsities:
            assert_matches_reference(backend, device, (2, 3, 5, 6), (5, 3, 3, 3), bits=bits, sparsity=sparsity,
                                     seed=bits, padding=1, with_bias=bits % 2 == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(backend, dtype):
    device = require_backend(backend)
    assert_matches_reference(backend, device, (2, 4, 6, 5), (3, 4, 3, 3), dtype=dtype, padding=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_codebook(backend):
    """Levels that float16 would round (SBS packs its uniform grid, offset by the weights' mean, in
    float32): every kernel reads them in float32, through the CPU's Winograd and direct paths."""
    device = require_backend(backend)
    packed = make_packed((9, 9, 3, 3), 4, 0.3, seed=5, codebook_dtype=torch.float32)
    assert packed.codebook.dtype == torch.float32 and not torch.equal(packed.codebook.half().float(), packed.codebook)
    assert_matches_reference(backend, device, (2, 9, 6, 5), (9, 9, 3, 3), sparsity=0.3, seed=5, padding=1,
                             codebook_dtype=torch.float32)
    assert_matches_reference(backend, device, (1, 9, 7, 6), (9, 9, 3, 3), sparsity=0.3, seed=5, stride=2,
                             codebook_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x(backend):
    device = require_backend(backend)
    assert_matches_reference(backend, device, (2, 3, 6, 5), (4, 3, 3, 3), strided_x=True, padding=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_x(backend):
    """A channels-last x (what a model moved to channels_last feeds every layer) gives the same
    results and a channels-last output: depthwise, 1x1, strided, grouped and padded 3x3 layers,
    in float32 and bfloat16."""
    device = require_backend(backend)
    slow = backend in ("simt", "triton") and device.type == "cpu"
    for case in (1, 4, 5, 6) if slow else range(len(GEOMETRIES)):
        x_shape, weight_shape, conv = GEOMETRIES[case]
        assert_matches_reference(backend, device, x_shape, weight_shape, bits=case + 2, sparsity=0.3, seed=case,
                                 channels_last=True, **conv)
    assert_matches_reference(backend, device, (2, 4, 6, 5), (3, 4, 3, 3), dtype=torch.bfloat16, channels_last=True,
                             padding=1)


def test_cpu_larger_shapes():
    """The CPU kernel's output-channel tiles (at most 256 * 512 * 9 decoded floats each): one tile
    (133 x 70 x 3 x 3), two of a dense layer (40 x 1024 x 6 x 6: 32 channels, then 8), two of
    whole groups (2 groups of 32 x 1024 x 6 x 6, one per tile), a 1x1 layer over
    two tiles (700 x 2048: 352 channels, then 348; x strided), and fp16 scales."""
    device = require_backend("cpu")
    assert_matches_reference("cpu", device, (3, 70, 13, 11), (133, 70, 3, 3), bits=4, sparsity=0.5, padding=1)
    # sums of 36864 and 18432 terms: also allowed float32 accumulation's bound (1e-4 alone failed
    # on an AVX2 build: 2.8e-4 off at |y| = 1.44)
    assert_matches_reference("cpu", device, (1, 1024, 6, 7), (40, 1024, 6, 6), bits=3, sparsity=0.2, padding=2,
                             mixed=True)
    assert_matches_reference("cpu", device, (1, 2048, 6, 6), (64, 1024, 6, 6), bits=4, groups=2, stride=2, padding=3,
                             mixed=True)
    assert_matches_reference("cpu", device, (1, 33, 30, 29), (17, 33, 5, 5), bits=8, dilation=(1, 2), padding=(2, 3))
    assert_matches_reference("cpu", device, (2, 2048, 3, 5), (700, 2048, 1, 1), bits=5, sparsity=0.3, strided_x=True,
                             mixed=True)
    assert_matches_reference("cpu", device, (2, 2048, 3, 5), (700, 2048, 1, 1), bits=5, sparsity=0.3,
                             channels_last=True, mixed=True)
    packed = make_packed((16, 8, 3, 3), 4, 0.2, scale_dtype=torch.float16)
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(ops.lut_conv2d(x, packed, padding=1, backend="cpu"),
                               reference.lut_conv2d(x, packed, padding=1), rtol=1e-4, atol=1e-4)


def test_cpu_pointwise_few_pixels_take_lowbit_linear():
    """1x1 layers over fewer than 16 output pixels with 64 or more input channels (squeeze-and-
    excitation layers on 1 x 1 maps) run as lowbit_linear on the pixel rows, in both layouts:
    every bitwidth dense and sparse, with and without bias, strided, a batch of 15 and 2 x 2 maps,
    bfloat16; the output keeps x's layout and F.conv2d's strides; no ATen convolution or GEMM
    runs; 16 pixels, or 63 input channels, take the convolution again. Non-finite x reaches
    exactly its pixel's outputs."""
    device = require_backend("cpu")
    for bits in range(1, 9):
        for x_shape, channels_last in (((1, 70, 1, 1), False), ((1, 70, 2, 3), False), ((1, 70, 2, 3), True)):
            assert_matches_reference("cpu", device, x_shape, (33, 70, 1, 1), bits=bits, sparsity=0.5 * (bits % 2),
                                     seed=bits, channels_last=channels_last, with_bias=bits % 3 != 0)
    assert_matches_reference("cpu", device, (15, 64, 1, 1), (24, 64, 1, 1), bits=4)
    for channels_last in (False, True):
        assert_matches_reference("cpu", device, (2, 67, 3, 4), (11, 67, 1, 1), bits=3, sparsity=0.3, stride=2,
                                 channels_last=channels_last)
        assert_matches_reference("cpu", device, (1, 65, 2, 2), (9, 65, 1, 1), dtype=torch.bfloat16,
                                 channels_last=channels_last)
    for shape, linear in (((3, 64, 1, 1), True), ((1, 64, 3, 5), True), ((16, 64, 1, 1), False),
                          ((3, 63, 1, 1), False)):
        packed = make_packed((24, shape[1], 1, 1), 4, 0.3)
        for channels_last in (False, True):
            x = torch.randn(shape)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.profiler.profile() as prof:
                y = ops.lut_conv2d(x, packed, backend="cpu")
            names = {e.name for e in prof.events()}
            assert (not names & {"aten::convolution", "aten::mm", "aten::addmm", "aten::bmm"}) == linear, (shape, names)
            assert y.stride() == F.conv2d(x, packed.decode()).stride(), (shape, channels_last)
    packed = make_packed((24, 64, 1, 1), 4, 0.3)
    x = torch.randn(4, 64, 1, 1)
    x[1, 3], x[2, 7] = float("inf"), float("nan")
    y, want = ops.lut_conv2d(x, packed, backend="cpu"), reference.lut_conv2d(x, packed)
    assert torch.equal(torch.isfinite(y), torch.isfinite(want)) and torch.isfinite(want[[0, 3]]).all()
    torch.testing.assert_close(y[[0, 3]], want[[0, 3]], rtol=1e-4, atol=1e-4)


def test_cpu_pointwise_gemm():
    """Channels-last 1x1 layers over at most 512 output pixels go through sgemm: strides 1, 2 and
    (2, 3) (the strided pixels gathered), with and without bias, two tiles (1024 x 1400 over 144
    pixels, each written into y in place), every bitwidth dense and sparse, bfloat16; 513 pixels
    keep the convolution. Non-finite x reaches exactly the outputs of its pixel, as conv2d."""
    device = require_backend("cpu")
    for stride in (1, 2, (2, 3)):
        assert_matches_reference("cpu", device, (2, 19, 7, 8), (11, 19, 1, 1), bits=3, sparsity=0.3,
                                 channels_last=True, stride=stride, with_bias=stride != 2)
    for bits in range(1, 9):
        assert_matches_reference("cpu", device, (1, 40, 5, 6), (24, 40, 1, 1), bits=bits, sparsity=0.5 * (bits % 2),
                                 seed=bits, channels_last=True)
    assert_matches_reference("cpu", device, (1, 1024, 24, 24), (1400, 1024, 1, 1), bits=4, channels_last=True,
                             stride=2, mixed=True)
    assert_matches_reference("cpu", device, (1, 12, 7, 5), (9, 12, 1, 1), dtype=torch.bfloat16, channels_last=True)
    assert_matches_reference("cpu", device, (1, 8, 27, 19), (5, 8, 1, 1), channels_last=True)  # 513 pixels
    for x_shape, gemm in (((2, 8, 16, 16), True), ((1, 8, 27, 19), False)):  # NCHW: test_cpu_nchw_pointwise_gemm
        x = torch.randn(x_shape).contiguous(memory_format=torch.channels_last)
        with torch.profiler.profile() as prof:
            ops.lut_conv2d(x, make_packed((5, 8, 1, 1), 4), backend="cpu")
        assert any(e.name in ("aten::mm", "aten::addmm") for e in prof.events()) == gemm, x_shape
    packed = make_packed((6, 8, 1, 1), 4, 0.5)
    x = torch.randn(2, 8, 5, 4).contiguous(memory_format=torch.channels_last)
    x[1, 3, 2, 1], x[0, 5, 4, 3] = float("inf"), float("nan")
    y, want = ops.lut_conv2d(x, packed, backend="cpu"), reference.lut_conv2d(x, packed)
    assert not torch.isfinite(want[1, :, 2, 1]).any()
    assert_nonfinite_where_reference_is(y, want)


def test_cpu_row_blocks():
    """1x1 layers over fewer than 128 output pixels with at least 2^14 weights, channels-last or
    NCHW at batch 1, run in blocks of decoded rows, each decoded and multiplied on one thread into
    its channels of y: every bitwidth dense and sparse, with and without bias, stride 2 (NCHW: over
    x's columns), more blocks than output channels (3 x 6000: blocks with no rows), a batch of 2
    (channels-last), NCHW 1 x 1 maps at batch 20, bfloat16. Single-group layers of 2^18+ weights
    there take the blocks over x's columns (im2col): 3x3 at strides 2 and (2, 3), dilation 2, a
    5x5 kernel, bfloat16, and a 3x3 stride-1 layer whose x holds a NaN (which Winograd leaves to
    them: the NaN reaches exactly the outputs whose window holds it). Under inference mode (the
    tasks write an inference tensor); the same bits whatever the thread count (blocks by shape).
    128 pixels take one sgemm over all of them."""
    device = require_backend("cpu")
    for bits in range(1, 9):
        for channels_last in (False, True):
            assert_matches_reference("cpu", device, (1, 200, 5, 7), (90 + bits, 200, 1, 1), bits=bits,
                                     sparsity=0.5 * (bits % 2), seed=bits, channels_last=channels_last,
                                     with_bias=bits % 3 != 0)
    for channels_last in (False, True):
        assert_matches_reference("cpu", device, (1, 6000, 2, 3), (3, 6000, 1, 1), bits=4, sparsity=0.3,
                                 channels_last=channels_last)
        assert_matches_reference("cpu", device, (1, 128, 6, 5), (130, 128, 1, 1), bits=5, stride=2,
                                 channels_last=channels_last, with_bias=False)
        assert_matches_reference("cpu", device, (1, 130, 3, 3), (131, 130, 1, 1), dtype=torch.bfloat16,
                                 channels_last=channels_last)
    assert_matches_reference("cpu", device, (2, 160, 7, 7), (1024, 160, 1, 1), bits=6, sparsity=0.4, channels_last=True)
    assert_matches_reference("cpu", device, (20, 200, 1, 1), (90, 200, 1, 1), bits=3, sparsity=0.3)  # NCHW 1 x 1 maps
    for channels_last in (False, True):
        assert_matches_reference("cpu", device, (1, 64, 9, 9), (480, 64, 3, 3), bits=4, sparsity=0.3, stride=2,
                                 padding=1, channels_last=channels_last, mixed=True)
        assert_matches_reference("cpu", device, (1, 40, 11, 10), (800, 40, 3, 3), bits=6, stride=(2, 3), dilation=2,
                                 padding=2, channels_last=channels_last, with_bias=False, mixed=True)
        assert_matches_reference("cpu", device, (1, 24, 8, 9), (500, 24, 5, 5), bits=3, sparsity=0.5, padding=2,
                                 channels_last=channels_last, mixed=True)
        assert_matches_reference("cpu", device, (1, 32, 7, 7), (1000, 32, 3, 3), dtype=torch.bfloat16, stride=2,
                                 channels_last=channels_last)
    packed = make_packed((480, 64, 3, 3), 5, 0.2)
    x = torch.randn(1, 64, 7, 7)
    x[0, 5, 3, 4] = float("nan")
    y, want = ops.lut_conv2d(x, packed, padding=1, backend="cpu"), reference.lut_conv2d(x, packed, padding=1)
    assert not torch.isfinite(want[0, :, 2:5, 3:6]).any()
    assert_nonfinite_where_reference_is(y, want)
    bias = torch.randn(700)
    for weight, pixels, blocks, conv in (((700, 300, 1, 1), (7, 7), True, {}), ((700, 300, 1, 1), (8, 16), False, {}),
                                         ((700, 48, 3, 3), (13, 13), True, dict(stride=2))):
        packed = make_packed(weight, 3, 0.3)
        for channels_last in (False, True):
            x = torch.randn(1, weight[1], *pixels)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.profiler.profile() as prof:
                ops.lut_conv2d(x, packed, bias, backend="cpu", **conv)
            gemms = sum(e.name in ("aten::mm", "aten::addmm") for e in prof.events())
            assert (gemms > 1) == blocks, (weight, pixels, channels_last, gemms)
            threads = torch.get_num_threads()
            try:
                with torch.inference_mode():
                    y = ops.lut_conv2d(x, packed, bias, backend="cpu", **conv)
                torch.set_num_threads(1)
                y_one = ops.lut_conv2d(x, packed, bias, backend="cpu", **conv)
            finally:
                torch.set_num_threads(threads)
            assert torch.equal(y, y_one), (weight, pixels, channels_last)
            assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            torch.testing.assert_close(y, reference.lut_conv2d(x, packed, bias, **conv), rtol=1e-4, atol=1e-4)


def test_cpu_nchw_pointwise_gemm():
    """NCHW 1x1 layers at stride 1 go through a GEMM per image at batch 1, and where their channel
    counts are not both multiples of 16 (oneDNN's NCHW convolution is several times slower on
    such counts) on maps of 128 pixels or more: batches 1 and 3, with and without bias, every
    bitwidth dense and sparse, two tiles (1400 x 1030 over 132 pixels, each written into y in
    place), bfloat16, a strided x, and 1 x 1 maps at batches 5 and 16 (one GEMM over x's rows);
    the backward to x likewise, with W^T. Counts that are both multiples of 16 at batch 2, stride
    2, and batches of smaller maps keep the convolution; the output is NCHW. Non-finite x reaches
    exactly the outputs of its pixel."""
    device = require_backend("cpu")
    for bits in range(1, 9):
        x_shape = (3, 40, 12, 11) if bits % 2 else (1, 40, 5, 6)
        assert_matches_reference("cpu", device, x_shape, (23 + bits, 40, 1, 1), bits=bits, sparsity=0.5 * (bits % 2),
                                 seed=bits, with_bias=bits % 3 != 0)
    assert_matches_reference("cpu", device, (1, 1030, 12, 11), (1400, 1030, 1, 1), bits=4, sparsity=0.3, mixed=True)
    assert_matches_reference("cpu", device, (1, 1024, 12, 12), (1400, 1024, 1, 1), bits=5, with_bias=False)
    assert_matches_reference("cpu", device, (1, 12, 7, 5), (9, 12, 1, 1), dtype=torch.bfloat16)
    assert_matches_reference("cpu", device, (2, 13, 12, 11), (9, 13, 1, 1), strided_x=True)
    for x_shape in ((5, 40, 1, 1), (16, 70, 1, 1)):
        assert_matches_reference("cpu", device, x_shape, (24, x_shape[1], 1, 1), bits=3, sparsity=0.3)
    for in_channels, out_channels, stride, gemm, maps in ((8, 5, 1, True, (1, 9, 7)), (16, 40, 1, True, (2, 16, 8)),
                                                          (40, 16, 1, True, (1, 9, 7)), (16, 32, 1, True, (1, 9, 7)),
                                                          (16, 32, 1, False, (2, 16, 8)),
                                                          (8, 5, 2, False, (1, 9, 7)), (8, 5, 1, False, (2, 9, 7))):
        x = torch.randn(maps[0], in_channels, *maps[1:], requires_grad=True)
        with torch.profiler.profile() as prof:  # the backward takes the same route
            y = ops.lut_conv2d(x, make_packed((out_channels, in_channels, 1, 1), 4), stride=stride, backend="cpu")
            y.sum().backward()
        names = {e.name for e in prof.events()}
        assert ("aten::convolution" not in names) == gemm, (in_channels, out_channels, stride, names)
        assert y.is_contiguous()
    packed = make_packed((6, 8, 1, 1), 4, 0.5)
    x = torch.randn(1, 8, 5, 4)
    x[0, 3, 2, 1], x[0, 5, 4, 3] = float("inf"), float("nan")
    y, want = ops.lut_conv2d(x, packed, backend="cpu"), reference.lut_conv2d(x, packed)
    assert not torch.isfinite(want[0, :, 2, 1]).any()
    assert_nonfinite_where_reference_is(y, want)


# The CPU kernel's depthwise path (one input and one output channel per group), direct in both
# layouts: NCHW rows in blocks of four vectors (outputs wider than 64, a masked rest), strides 1,
# 2 (even lanes of two vectors) and 3 (lane by lane), dilation, asymmetric padding, padding past
# the kernel's reach (edge outputs that are the bias alone), a kernel wider than x; channels-last
# pixels inside x in blocks of 8 and the edge pixels around them (up to 8 of them), 70 channels (four vectors and a
# masked rest), 5x5 and 5x7 kernels.
DEPTHWISE_GEOMETRIES = [
    ((2, 5, 6, 7), (3, 3), dict(padding=1)),
    ((1, 3, 9, 150), (3, 3), dict(padding=(1, 2), stride=2)),
    ((2, 70, 11, 37), (5, 5), dict(padding=2)),
    ((1, 6, 13, 29), (3, 3), dict(stride=3, dilation=2, padding=3)),
    ((1, 4, 5, 6), (3, 3), dict(padding=4)),
    ((1, 17, 4, 3), (5, 7), dict(padding=(2, 3))),
    ((3, 33, 20, 21), (3, 3), dict(stride=(2, 1), padding=(0, 1))),
    ((1, 21, 5, 17), (3, 3), dict(padding=1)),  # inside x: columns 1..15, a block of 8 and 7 edge pixels
    ((1, 21, 5, 18), (3, 3), dict(padding=1)),  # columns 1..16: two blocks of 8
    ((2, 40, 7, 7), (7, 7), dict(padding=3)),  # ConvNeXt's last stage: no pixel has its taps inside x
    ((1, 19, 9, 21), (7, 7), dict(padding=(3, 2))),  # 19 outputs a row, 15 inside x: a block of 8
    ((1, 5, 6, 4), (5, 5), dict(padding=(1, 3))),  # 6 outputs a row, none inside x
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", range(len(DEPTHWISE_GEOMETRIES)))
def test_cpu_depthwise_geometries(case, channels_last):
    device = require_backend("cpu")
    x_shape, kernel, conv = DEPTHWISE_GEOMETRIES[case]
    assert_matches_reference("cpu", device, x_shape, (x_shape[1], 1, *kernel), bits=1 + case % 8, sparsity=0.3,
                             seed=case, with_bias=case % 3 != 1, channels_last=channels_last, groups=x_shape[1], **conv)


def test_cpu_depthwise_inputs():
    """Every bitwidth and sparsity, fp16/bf16 and strided x; both layouts give the same bits and
    NaN and inf where the reference has them; no ATen convolution runs."""
    device = require_backend("cpu")
    for bits in range(1, 9):
        for sparsity in (0.0, 0.5, 1.0):
            assert_matches_reference("cpu", device, (1, 20, 9, 8), (20, 1, 3, 3), bits=bits, sparsity=sparsity,
                                     seed=bits, padding=1, stride=1 + bits % 2, groups=20)
    for dtype in (torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            assert_matches_reference("cpu", device, (2, 19, 6, 5), (19, 1, 3, 3), dtype=dtype, padding=1, groups=19,
                                     channels_last=channels_last)
    assert_matches_reference("cpu", device, (2, 7, 6, 5), (7, 1, 3, 3), strided_x=True, padding=1, groups=7)
    packed = make_packed((40, 1, 3, 3), 4, 0.3)
    bias = torch.randn(40)
    x = torch.randn(2, 40, 9, 30)
    x[1, 3, 2, 1], x[0, 35, 4, 20] = float("inf"), float("nan")
    want = reference.lut_conv2d(x, packed, bias, padding=1, groups=40)
    with torch.profiler.profile() as prof:
        y = ops.lut_conv2d(x, packed, bias, padding=1, groups=40, backend="cpu")
    assert not any("conv" in e.name for e in prof.events() if e.name.startswith("aten::")), "an ATen convolution ran"
    y_cl = ops.lut_conv2d(x.contiguous(memory_format=torch.channels_last), packed, bias, padding=1, groups=40,
                          backend="cpu")
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.equal(torch.isinf(y), torch.isinf(want))
    assert torch.isinf(want).any() and torch.isnan(want).any()
    finite = torch.isfinite(want)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(y.nan_to_num(), y_cl.nan_to_num()) and torch.equal(y.isnan(), y_cl.isnan())


# The CPU kernel's Winograd F(2x2, 3x3) path (3x3, stride 1, dilation 1, one group, 8 to 2048
# input channels, 8 or more output channels): tiles straddling rows and images, odd and 1x1
# outputs, asymmetric padding, a partial output-channel block, two weight decode spans (64 input
# channels each), several input chunks (64 tiles each at 1024 channels).
WINOGRAD_GEOMETRIES = [
    ((2, 8, 5, 7), (8, 8, 3, 3), dict(padding=1)),
    ((3, 9, 3, 3), (13, 9, 3, 3), {}),
    ((2, 16, 6, 11), (20, 16, 3, 3), dict(padding=(2, 0))),
    ((1, 24, 20, 37), (17, 24, 3, 3), dict(padding=1)),
    ((2, 70, 7, 6), (133, 70, 3, 3), dict(padding=(0, 1))),
    ((1, 1024, 17, 18), (9, 1024, 3, 3), dict(padding=1)),
]


@needs_avx512
@pytest.mark.parametrize("case", range(len(WINOGRAD_GEOMETRIES)))
def test_cpu_winograd_geometries(case):
    device = require_backend("cpu")
    x_shape, weight_shape, conv = WINOGRAD_GEOMETRIES[case]
    # sums of 9216 terms at 1024 channels: also allowed float32 accumulation's bound
    assert_matches_reference("cpu", device, x_shape, weight_shape, bits=3 + case, sparsity=0.3, seed=case,
                             mixed=weight_shape[1] >= 1024, **conv)


@needs_avx512
@pytest.mark.parametrize("case", range(len(WINOGRAD_GEOMETRIES)))
def test_cpu_winograd_channels_last_is_the_nchw_path_bit_for_bit(case):
    """A channels-last x runs the Winograd path in NHWC (channels in the vector lanes, no copy into
    NCHW and back) with every sum in the NCHW path's order: y channels-last and equal bit for bit."""
    require_backend("cpu")
    x_shape, weight_shape, conv = WINOGRAD_GEOMETRIES[case]
    g = torch.Generator().manual_seed(case)
    packed = make_packed(weight_shape, 3 + case, sparsity=0.3, seed=case)
    x, bias = torch.randn(x_shape, generator=g), torch.randn(weight_shape[0], generator=g)
    y = ops.lut_conv2d(x, packed, bias if case % 2 else None, backend="cpu", **conv)
    y_cl = ops.lut_conv2d(x.contiguous(memory_format=torch.channels_last), packed, bias if case % 2 else None,
                          backend="cpu", **conv)
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(y_cl, y)


@needs_avx512
def test_cpu_winograd_every_bitwidth_and_sparsity():
    """Codes decoded in spans of 64 input channels (576 weights) that start mid-byte and, with a
    bitmap, mid-word; x as fp16, bf16 and a strided view."""
    device = require_backend("cpu")
    for bits in range(1, 9):
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            assert_matches_reference("cpu", device, (1, 70, 5, 6), (10, 70, 3, 3), bits=bits, sparsity=sparsity,
                                     seed=bits, padding=1, with_bias=bits % 2 == 0)
    for dtype in (torch.float16, torch.bfloat16):
        assert_matches_reference("cpu", device, (2, 12, 6, 5), (9, 12, 3, 3), dtype=dtype, padding=1)
    assert_matches_reference("cpu", device, (2, 12, 6, 5), (9, 12, 3, 3), strided_x=True, padding=1)
    assert_matches_reference("cpu", device, (2, 24, 20, 37), (17, 24, 3, 3), channels_last=True, padding=1)


@needs_avx512
def test_cpu_winograd_keeps_no_weight_between_calls():
    """Its buffers stay with their threads between calls; the transformed weight must not."""
    require_backend("cpu")
    x = torch.randn(2, 16, 9, 9)
    first, second = make_packed((16, 16, 3, 3), 4, seed=1), make_packed((16, 16, 3, 3), 4, seed=2)
    for packed in (first, second, first, make_packed((40, 32, 3, 3), 2, 0.5, seed=3)):
        x_ = x if packed.shape[1] == 16 else torch.randn(1, 32, 12, 12)
        torch.testing.assert_close(ops.lut_conv2d(x_, packed, padding=1, backend="cpu"),
                                   reference.lut_conv2d(x_, packed, padding=1), rtol=1e-4, atol=1e-4)


@needs_avx512
def test_cpu_winograd_non_finite_x_goes_direct():
    """An inf in x would come out NaN through the transform's differences; such calls go direct
    and give conv2d's infinities."""
    require_backend("cpu")
    packed = make_packed((8, 8, 3, 3), 4)
    x = torch.randn(1, 8, 6, 6)
    x[0, 3, 2, 4] = float("inf")
    x[0, 5, 0, 0] = float("nan")
    y, want = ops.lut_conv2d(x, packed, padding=1, backend="cpu"), reference.lut_conv2d(x, packed, padding=1)
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.equal(torch.isinf(y), torch.isinf(want))
    assert torch.isinf(want).any()
    finite = torch.isfinite(want)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-4, atol=1e-4)


@needs_avx512
def test_cpu_winograd_switch_and_error_bounds():
    """An outlier under a pruned tap adds nothing to that output's direct sum, but Winograd mixes
    it into its tile's transformed values and rounds there: the direct path meets the direct
    sum's worst-case bound, the Winograd path only its own (backend_checks.winograd_bound).
    set_cpu_winograd(False) gives the direct path."""
    require_backend("cpu")
    packed = make_packed((16, 16, 3, 3), 4, sparsity=0.5, seed=4)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    x[0, 3, 4, 5] = 2.0 ** 12
    weight = packed.decode(torch.float64)
    want = reference.lut_conv2d(x.double(), packed, padding=1)
    winograd = ops.lut_conv2d(x, packed, padding=1, backend="cpu").double()
    previous = ops.set_cpu_winograd(False)
    try:
        direct = ops.lut_conv2d(x, packed, padding=1, backend="cpu").double()
    finally:
        ops.set_cpu_winograd(previous)
    direct_bound = accumulation_bound(packed.row_length, torch.nn.functional.conv2d(x.double().abs(), weight.abs(),
                                                                                  padding=1))
    assert ((direct - want).abs() <= direct_bound).all()
    assert ((winograd - want).abs() <= winograd_bound(x, weight, 1)).all()
    assert ((winograd - want).abs() > direct_bound).any()


@needs_avx512
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_cpu_simd_decode_matches_scalar_twin(bits, sparsity):
    """The CPU kernel's AVX-512 decode against its scalar twin, bit for bit (forward and grad_x):
    rows of 27 weights start mid-byte, rows of 40 on a byte, rows of 90 through the Winograd path."""
    require_backend("cpu")
    for weight_shape in ((7, 3, 3, 3), (6, 10, 2, 2), (9, 10, 3, 3)):
        packed = make_packed(weight_shape, bits, sparsity)
        x = torch.randn(2, weight_shape[1], 8, 7)
        grad_y = torch.randn(reference.lut_conv2d(x, packed, padding=1).shape)
        results = []
        for simd in (True, False):
            previous = ops.set_cpu_simd(simd)
            try:
                x_ = x.clone().requires_grad_()
                y = ops.lut_conv2d(x_, packed, padding=1, backend="cpu")
                results.append((y.detach(), *torch.autograd.grad(y, x_, grad_y)))
            finally:
                ops.set_cpu_simd(previous)
        (y0, gx0), (y1, gx1) = results
        assert torch.equal(y0, y1) and torch.equal(gx0, gx1)


def test_reference_is_conv_of_decoded_weight():
    packed = make_packed((6, 2, 3, 3), 5, 0.5)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    want = torch.nn.functional.conv2d(x, packed.decode(torch.float64), stride=2, groups=2)
    assert torch.equal(reference.lut_conv2d(x, packed, stride=2, groups=2), want)
    assert (packed.decode() == 0).float().mean() > 0.3


def test_fully_pruned_weight_gives_bias():
    packed = make_packed((4, 3, 3, 3), 2, sparsity=1.0)
    assert packed.keep_bitmap is not None and packed.kept == 0
    bias = torch.randn(4)
    y = ops.lut_conv2d(torch.randn(2, 3, 5, 5), packed, bias)
    assert torch.equal(y, bias.reshape(1, 4, 1, 1).expand(2, 4, 3, 3))


# ---------------------------------------------------------------------------------------------
# registration: opcheck and torch.compile

@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("sparse", [False, True])
def test_opcheck(backend, sparse):
    require_backend(backend)
    packed = make_packed((4, 3, 3, 3), 3, 0.5 if sparse else 0.0)
    x = torch.randn(2, 3, 6, 5, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    for x_in in (x, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()):
        torch.library.opcheck(custom_op(backend, "lut_conv2d").default,
                              (x_in, *packed_args.kernel_args(packed), bias, [1, 2], [1, 0], [1, 1], 1))
    pointwise = make_packed((4, 3, 1, 1), 3, 0.5 if sparse else 0.0)  # the CPU kernel's GEMM, strided
    torch.library.opcheck(custom_op(backend, "lut_conv2d").default,
                          (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),
                           *packed_args.kernel_args(pointwise), bias, [2, 1], [0, 0], [1, 1], 1))


def test_torch_compile_fullgraph_matches_eager():
    require_backend("cpu")
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    layer = PackedConv2d.from_float(conv, make_packed((6, 4, 3, 3), 4, 0.5))

    def model(x):
        return torch.relu(layer(x)) * 2

    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 4, 7, 7)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, comp = model(x_eager), compiled(x_comp)
    torch.testing.assert_close(eager, comp)
    grad_y = torch.randn_like(eager)
    torch.testing.assert_close(torch.autograd.grad(eager, x_eager, grad_y)[0],
                               torch.autograd.grad(comp, x_comp, grad_y)[0])


# ---------------------------------------------------------------------------------------------
# PackedConv2d

def test_packed_conv2d_module():
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
    packed = make_packed((8, 3, 3, 3), 4, 0.25)
    layer = PackedConv2d.from_float(conv, packed)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert {"codes", "codebook", "channel_scale", "keep_bitmap"} <= set(layer.state_dict())
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), reference.lut_conv2d(x, packed, conv.bias, 2, 1, 1, 2), rtol=1e-4, atol=1e-4)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 2.0 * 5 * 5))
    assert layer.packed_weight().decode().equal(packed.decode())
    layer.channel_scale.requires_grad_()
    with pytest.raises(ValueError, match="channel_scale requires grad"):
        layer(x)
    with pytest.raises(ValueError, match="shape"):
        PackedConv2d.from_float(torch.nn.Conv2d(6, 8, 5), packed)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_packed_conv2d_from_float_keeps_the_padding_mode(padding_mode):
    """from_float takes nn.Conv2d's padding (numbers, "valid", symmetric "same") and padding mode:
    y and grad_x as the float conv's with the decoded weight; "same" with one more on the right
    is refused by name."""
    packed = make_packed((8, 3, 3, 5), 4, 0.25)
    x = torch.randn(2, 6, 7, 9)
    for padding in ((1, 2), "same", "valid"):
        conv = torch.nn.Conv2d(6, 8, (3, 5), padding=padding, groups=2, padding_mode=padding_mode).double()
        layer = PackedConv2d.from_float(conv, packed)
        assert layer.padding_mode == padding_mode and (padding_mode in repr(layer)) == (padding_mode != "zeros")
        with torch.no_grad():
            conv.weight.copy_(packed.decode().double())
        x_layer, x_conv = x.clone().requires_grad_(), x.double().requires_grad_()
        y, want = layer(x_layer), conv(x_conv)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(x_layer.grad.double(), x_conv.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pads one side more than the other"):
        PackedConv2d.from_float(torch.nn.Conv2d(6, 8, (3, 4), padding="same", groups=2), packed)


# ---------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("overrides, match", [
    (dict(x=torch.randn(3, 5, 5)), "x must be 4-D"),
    (dict(x=torch.randint(0, 3, (1, 3, 5, 5))), "x must be a floating-point tensor"),
    (dict(x=torch.randn(1, 4, 5, 5)), "x has 4 channels"),
    (dict(packed=torch.randn(4, 3, 3, 3)), "packed must be a mixedprec.formats.PackedWeight"),
    (dict(stride=0), "stride must be an int >= 1"),
    (dict(stride=(1, 2, 3)), "stride must be"),
    (dict(padding=-1), "padding must be an int >= 0"),
    (dict(padding="same"), "padding must be"),
    (dict(dilation=(1, 0)), "dilation must be"),
    (dict(groups=3), "groups must be an int >= 1 dividing C_out"),
    (dict(groups=True), "groups must be"),
    (dict(bias=torch.randn(5)), r"bias must have shape \(4,\)"),
    (dict(x=torch.randn(1, 3, 2, 2)), "the output would be empty"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_bad_arguments(overrides, match):
    args = dict(x=torch.randn(1, 3, 5, 5), packed=make_packed((4, 3, 3, 3), 2), bias=None, stride=1, padding=0,
                dilation=1, groups=1, backend=None)
    args.update(overrides)
    with pytest.raises(ValueError, match=match):
        ops.lut_conv2d(**args)


def test_kernel_op_checks_arguments():
    require_backend("cpu")
    packed = make_packed((4, 3, 3, 3), 2)
    args = [torch.randn(1, 3, 5, 5), packed.codes, packed.codebook.float(), packed.channel_scale.float(), None, None,
            [4, 3, 3, 3], 2, None, [1, 1], [0, 0], [1, 1], 1]
    for index, value, match in [(7, 3, "codebook must be float32 of shape"), (2, packed.codebook, "codebook must be float32"), (1, packed.codes[:3], "codes hold 3 bytes"),
                                (10, [0, -1], "padding must be two ints"), (6, [4, 3, 3], "weight_shape")]:
        bad = list(args)
        bad[index] = value
        with pytest.raises(RuntimeError, match=match):
            torch.ops.mixedprec.lut_conv2d_fwd(*bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inference_calls_match_the_autograd_op(backend, dtype):
    """Without a gradient to track the kernel is called directly (no custom-op dispatch): the
    same result, bit for bit, as through the registered op."""
    device = require_backend(backend)
    packed = make_packed((6, 2, 3, 3), 4, 0.3, device=device)
    x, bias = torch.randn(2, 4, 6, 5).to(device, dtype), torch.randn(6).to(device, dtype)
    tracked = ops.lut_conv2d(x.clone().requires_grad_(), packed, bias, padding=1, groups=2, backend=backend)
    with torch.no_grad():
        direct = ops.lut_conv2d(x, packed, bias, padding=1, groups=2, backend=backend)
    assert tracked.dtype == direct.dtype == dtype and torch.equal(tracked.detach(), direct)
