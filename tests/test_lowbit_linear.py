"""lowbit_linear: every backend against the float64 reference (bits 1..8, sparsity 0..100%,
odd shapes, batch 1 and larger, fp16/bf16, strided x), gradients, opcheck, torch.compile,
the CPU kernel's SIMD decode against its scalar twin, and argument errors."""
from __future__ import annotations

import pytest
import torch

from mixedprec import ops
from mixedprec.backends import reference
from mixedprec.formats import pack_weight
from mixedprec.ops import packed_args
from backend_checks import lowbit_check
from conftest import custom_op, needs_avx512, require_backend

SLOW = ("simt", "triton")  # emulated: small shapes only


def make_packed(out, inp, bits, sparsity, device="cpu", seed=0, codebook_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g)
    keep = torch.rand(out, inp, generator=g) >= sparsity if sparsity > 0 else None
    packed = pack_weight(codes, torch.randn(1 << bits, generator=g), torch.rand(out, generator=g) + 0.5, bits, keep,
                         codebook_dtype=codebook_dtype)
    return packed.to(device)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_backends_match_reference(kernel_backend, bits, sparsity):
    backend, device = kernel_backend
    out, inp, batch = (7, 45, 3) if backend in SLOW else (37, 203, 5)
    packed = make_packed(out, inp, bits, sparsity, device, seed=bits)
    lowbit_check(backend, device, packed, torch.randn(batch, inp), torch.randn(out))


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_float32_codebook(kernel_backend, sparsity):
    """Levels that float16 would round (as SBS packs them): every kernel reads them in float32."""
    backend, device = kernel_backend
    packed = make_packed(9, 70, 4, sparsity, device, seed=3, codebook_dtype=torch.float32)
    assert not torch.equal(packed.codebook.half().float(), packed.codebook)
    lowbit_check(backend, device, packed, torch.randn(3, 70), torch.randn(9))


@pytest.mark.parametrize("batch", [(1,), (2, 3, 1), (70,)])
def test_batch_shapes(kernel_backend, batch):
    backend, device = kernel_backend
    if backend in SLOW and batch == (70,):
        batch = (9,)
    packed = make_packed(11, 66, 4, 0.5, device)
    lowbit_check(backend, device, packed, torch.randn(*batch, 66))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_and_strided_x(kernel_backend, dtype):
    backend, device = kernel_backend
    packed = make_packed(9, 40, 2, 0.3, device)
    x = torch.randn(4, 80)[:, ::2].to(dtype)  # non-contiguous
    lowbit_check(backend, device, packed, x, torch.randn(9).to(dtype))


@needs_avx512
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
@pytest.mark.parametrize("in_features", [333, 336, 600])
@pytest.mark.parametrize("batch", [3, 6])
@pytest.mark.parametrize("codebook_dtype", [torch.float16, torch.float32])
def test_cpu_simd_decode_matches_scalar_twin(bits, sparsity, in_features, batch, codebook_dtype):
    """333: rows start mid-byte. 336 and 600, dense 1-, 2- and 4-bit: byte-aligned rows run in
    the interleaved column order of 32-bit lanes (whole 64-byte blocks, then a tail); the other
    rows of up to 5 bits in that of 64 codes a byte each (AVX-512 VBMI2),
    register-decoded at batch 3 (and at batch 6 for dense 1-, 2- and 4-bit rows on a byte, in
    groups of 4 and 2), through the decode tile at batch 6 otherwise; 7- and 8-bit codes
    are looked up 64 at a time in byte planes, float16 and float32 levels alike. Every path must
    equal the scalar twin bit for bit, and the reference within float32 tolerance."""
    require_backend("cpu")
    packed = make_packed(19, in_features, bits, sparsity, codebook_dtype=codebook_dtype)
    x = torch.randn(batch, in_features)
    results = []
    for simd in (True, False):
        previous = ops.set_cpu_simd(simd)
        try:
            x_ = x.clone().requires_grad_()
            y = ops.lowbit_linear(x_, packed, backend="cpu")
            y.sum().backward()
            results.append((y.detach(), x_.grad))
        finally:
            ops.set_cpu_simd(previous)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], reference.lowbit_linear(x, packed), rtol=1e-4, atol=1e-4)


def test_no_gradient_to_packed_tensors():
    packed = make_packed(5, 16, 4, 0.5)
    x = torch.randn(2, 16, requires_grad=True)
    y = ops.lowbit_linear(x, packed, backend=ops.available_backends("cpu")[-1])
    y.sum().backward()
    assert packed.codebook.grad is None and packed.channel_scale.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 40), (2, 3, 40)])
def test_bias_added_in_place_without_autograd_gives_the_autograd_result(kernel_backend, dtype, shape):
    """Without autograd the bias is added in place on the kernel's fresh output: bit for bit the
    sum autograd records, and x and bias are left as they were."""
    backend, device = kernel_backend
    packed = make_packed(6, 40, 4, 0.5, device)
    bias = torch.randn(6, device=device, requires_grad=True)
    x = torch.randn(shape, device=device).to(dtype)
    recorded = ops.lowbit_linear(x.clone().requires_grad_(), packed, bias, backend=backend)
    assert recorded.grad_fn is not None
    x_before, bias_before = x.clone(), bias.detach().clone()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = ops.lowbit_linear(x, packed, bias, backend=backend)
        assert y.dtype == dtype and torch.equal(y, recorded.detach()), mode.__name__
    assert torch.equal(x, x_before) and torch.equal(bias.detach(), bias_before)


def _op_args(packed, x):
    return (x, *packed_args.kernel_args(packed))


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_opcheck(kernel_backend, sparsity):
    backend, device = kernel_backend
    packed = make_packed(6, 40, 3, sparsity, device)
    x = torch.randn(3, 40, device=device, requires_grad=True)
    torch.library.opcheck(custom_op(backend, "lowbit_linear").default, _op_args(packed, x))


@pytest.mark.parametrize("backend", ["cpu", "cuda"])  # the emulated backends share this op plumbing
def test_torch_compile_fullgraph(backend):
    device = require_backend(backend)
    packed = make_packed(6, 40, 4, 0.5, device)
    bias = torch.randn(6, device=device)

    def f(x):
        return torch.relu(ops.lowbit_linear(x, packed, bias, backend=backend)) * 2

    x = torch.randn(3, 40, device=device)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_argument_errors():
    packed = make_packed(4, 8, 2, 0.0)
    with pytest.raises(ValueError, match="x must have last dim 8"):
        ops.lowbit_linear(torch.randn(2, 9), packed)
    with pytest.raises(ValueError, match="packed must be a mixedprec.formats.PackedWeight"):
        ops.lowbit_linear(torch.randn(2, 8), packed.decode())
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.lowbit_linear(torch.randn(2, 8), packed, torch.randn(5))
    with pytest.raises(ValueError, match="x must be a floating-point"):
        ops.lowbit_linear(torch.ones(2, 8, dtype=torch.int32), packed)
    with pytest.raises(ValueError, match="2-D"):
        ops.lowbit_linear(torch.randn(2, 8), make_packed(4, 8, 2, 0.0).__class__(
            (4, 2, 4), 2, packed.codebook, packed.channel_scale, packed.codes))


def test_kernel_op_checks_name_the_argument():
    require_backend("cpu")
    packed = make_packed(4, 8, 2, 0.5)
    args = [torch.randn(2, 8), packed.codes, packed.codebook.double(), packed.channel_scale.float(),
            packed.keep_bitmap, packed.code_offsets, list(packed.shape), packed.bits]
    with pytest.raises(RuntimeError, match="lowbit_linear_fwd: codebook must be float32"):
        torch.ops.mixedprec.lowbit_linear_fwd(*args)
    args[2] = args[2].float()
    args[5] = args[5][:-1]
    with pytest.raises(RuntimeError, match="code_offsets must be int64 of shape"):
        torch.ops.mixedprec.lowbit_linear_fwd(*args)


@pytest.mark.parametrize("x_shape", [(0, 40), (2, 0, 40)])
def test_empty_batches(kernel_backend, x_shape):
    """An empty batch (a detector's zero proposals) gives an empty y and an empty grad_x, with and
    without a gradient to track, as F.linear does; no kernel runs on it."""
    backend, device = kernel_backend
    packed = make_packed(9, 40, 4, 0.3, device)
    x = torch.randn(x_shape, device=device, requires_grad=True)
    bias = torch.randn(9, device=device, requires_grad=True)
    y = ops.lowbit_linear(x, packed, bias, backend=backend)
    assert y.shape == (*x_shape[:-1], 9)
    y.sum().backward()
    assert x.grad.shape == x_shape and torch.equal(bias.grad, torch.zeros_like(bias))
    with torch.inference_mode():
        assert ops.lowbit_linear(x.detach(), packed, backend=backend).shape == (*x_shape[:-1], 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_calls_match_the_autograd_op(kernel_backend, dtype):
    """Without a gradient to track the kernel is called directly (no custom-op dispatch): the
    same result, bit for bit, as through the registered op."""
    backend, device = kernel_backend
    packed = make_packed(9, 40, 4, 0.3, device)
    x = torch.randn(2, 3, 40).to(device, dtype)
    tracked = ops.lowbit_linear(x.clone().requires_grad_(), packed, backend=backend)
    with torch.inference_mode():
        direct = ops.lowbit_linear(x, packed, backend=backend)
    assert tracked.dtype == direct.dtype == dtype and torch.equal(tracked.detach(), direct)


GEMM_BATCH = 16  # csrc/ops/lowbit_linear/lowbit_linear_cpu.cpp: kGemmBatch
TILE_BATCH = 512  # and kTileBatch


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("batch", [1, 3, 4, 5, 70, 512])
@pytest.mark.parametrize("shape", [(37, 203), (9, 276)])
def test_cpu_kernel_grid(bits, sparsity, batch, shape):
    """The CPU kernel at every bits and sparsity on odd shapes (rows neither 8- nor 64-weight
    aligned, a column tail; 276 columns: 2- and 4-bit rows start on a byte, so AVX-512 builds take
    the interleaved order, 1 or 2 blocks then a 16-lane step and a tail; the other rows of up to 5
    bits that of 64 codes a byte each, 3 or 4 blocks; 7- and 8-bit rows decode
    64 codes at a time, past the row's and the stream's end), batch 1 (GEMV), 3 and 4 (rows
    decoded in registers: 4 is the AVX-512 register-blocked limit, 3 the AVX2 one), 5 (decode
    tile), 70 (decoded blocks through sgemm) and 512 (the whole weight decoded, one sgemm):
    forward and backward against the reference with the SIMD decode on and off, the two
    bit-identical, and below the sgemm batches every batch row equal to the same row in a batch
    of two and to the row run alone."""
    require_backend("cpu")
    out, in_features = shape
    packed = make_packed(out, in_features, bits, sparsity, seed=10 * bits + batch)
    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(bits))
    bias = torch.randn(out)
    results = []
    for simd in (True, False):
        previous = ops.set_cpu_simd(simd)
        try:
            y = lowbit_check("cpu", "cpu", packed, x, bias)
            with torch.inference_mode():
                pair = ops.lowbit_linear(x[-1:].repeat(2, 1), packed, bias, backend="cpu")
                alone = ops.lowbit_linear(x[-1:], packed, bias, backend="cpu")
            results.append(y.detach())
        finally:
            ops.set_cpu_simd(previous)
        if batch < GEMM_BATCH:  # sgemm's blocking depends on the batch: rows differ in the last bits
            assert torch.equal(pair[0], pair[1])
            if batch > 1:
                assert torch.equal(y.detach()[-1], pair[0])
            assert torch.equal(y.detach()[-1:], alone)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_cpu_sparse_rows_still_meet_non_finite_x_at_pruned_columns(batch, bad):
    """An inf or NaN of x at a column every row prunes must make its row's outputs NaN (inf * 0),
    as x @ W.T and the reference do, though the decode follows the kept codes, and leave the other
    rows as they are in a batch without it, with the SIMD decode on and off."""
    require_backend("cpu")
    packed = make_packed(21, 70, 4, 0.5, seed=batch)
    mask = packed.keep_mask()
    mask[:, 33] = False
    packed = pack_weight(packed.code_values(), packed.codebook, packed.channel_scale, packed.bits, mask)
    x = torch.randn(batch, 70)
    x[0, 33] = bad
    expected = reference.lowbit_linear(x.double(), packed)
    for simd in (True, False):
        previous = ops.set_cpu_simd(simd)
        try:
            with torch.inference_mode():
                y = ops.lowbit_linear(x, packed, backend="cpu")
                others = ops.lowbit_linear(x[1:].repeat(2, 1), packed, backend="cpu")[:batch - 1]
        finally:
            ops.set_cpu_simd(previous)
        assert torch.isnan(y[0]).all() and torch.isnan(expected[0]).all()
        assert torch.equal(y[1:], others)
        torch.testing.assert_close(y[1:].double(), expected[1:], rtol=1e-4, atol=1e-4)


def test_cpu_tiled_batches_span_several_tiles():
    """From TILE_BATCH rows on the CPU kernel decodes W into tiles of at most 2^22 floats, each
    multiplied with all of x by one sgemm: 2049 x 2048 makes two tiles (1025 rows, then 1024);
    forward and backward against the reference."""
    require_backend("cpu")
    packed = make_packed(2049, 2048, 5, 0.3, seed=5)
    x = torch.randn(TILE_BATCH, 2048, generator=torch.Generator().manual_seed(5))
    lowbit_check("cpu", "cpu", packed, x, torch.randn(2049), mixed=True)


@pytest.mark.parametrize("bits,sparsity", [(3, 0.0), (8, 0.5)])
def test_cpu_sgemm_batches_span_several_row_blocks(bits, sparsity):
    """From GEMM_BATCH rows on the CPU kernel decodes blocks of output rows (24 or 12 with batch
    rows in the vector lanes on AVX-512 or AVX2 builds, 64 for sgemm; the backward: 64): 150 rows
    end on a partial block; forward and backward against the reference, and in inference mode the same bits
    on one thread as on every thread."""
    require_backend("cpu")
    packed = make_packed(150, 45, bits, sparsity, seed=bits)
    x = torch.randn(GEMM_BATCH, 45)
    lowbit_check("cpu", "cpu", packed, x, torch.randn(150))
    threads = torch.get_num_threads()
    with torch.inference_mode():
        y = ops.lowbit_linear(x, packed, backend="cpu")
        torch.set_num_threads(1)
        try:
            one_thread = ops.lowbit_linear(x, packed, backend="cpu")
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(y, one_thread)


LANE_BATCH, LANE_MAX_COLUMNS = 128, 16384  # lowbit_linear_cpu.cpp: kLaneBatch, kLaneMaxColumns


@pytest.mark.parametrize("in_features", [37, 300, 1100, 5000, LANE_MAX_COLUMNS + 16])
@pytest.mark.parametrize("bits,sparsity", [(4, 0.0), (3, 0.3), (8, 0.75)])
@pytest.mark.parametrize("batch", [GEMM_BATCH, 40, LANE_BATCH - 1])
def test_cpu_batch_rows_in_lanes(in_features, bits, sparsity, batch):
    """From GEMM_BATCH to LANE_BATCH - 1 rows on SIMD builds, rows of up to LANE_MAX_COLUMNS
    weights run with batch rows in the vector lanes over levels buffers of four row strides (37,
    300, 1100, 5000 columns take each; dense 4-bit rows the interleaved order; 29 output rows: a
    partial block), one lane vector a pass (batch 16) or two (40: a pair, then a partial single
    vector; 127: four pairs, the last vector partial): against the reference, the SIMD path and
    its scalar twin bit for bit, and each batch row the same bits as in another batch (one FMA
    chain per output). Longer rows go through sgemm (reference only). The sums run in column
    order, as sgemm's do within its panels: up to thousands of terms, so y is held to float32
    accumulation's bound (``mixed``)."""
    require_backend("cpu")
    packed = make_packed(29, in_features, bits, sparsity, seed=in_features + bits)
    x, bias = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch)), torch.randn(29)
    results = []
    for simd in (True, False):
        previous = ops.set_cpu_simd(simd)
        try:
            results.append(lowbit_check("cpu", "cpu", packed, x, bias, mixed=True).detach())
            with torch.inference_mode():
                y = ops.lowbit_linear(x, packed, backend="cpu")
                other = ops.lowbit_linear(torch.cat([x[-1:], torch.randn(GEMM_BATCH, in_features)]), packed,
                                          backend="cpu")
        finally:
            ops.set_cpu_simd(previous)
        if in_features <= LANE_MAX_COLUMNS:
            assert torch.equal(y[-1], other[0])
    if in_features <= LANE_MAX_COLUMNS:
        assert torch.equal(results[0], results[1])
