"""Property tests (hypothesis): every op on every kernel backend that runs here against the
reference, with the comparisons and tolerances of tests/backend_checks.py, on random shapes (empty
and size-1 dims), bit sets, codebooks, sparsity and extreme values (huge and tiny magnitudes,
all-equal tensors, subnormals, NaN and +-inf, which must come out where the reference's do); the
reference itself, the oracle, against its contract only (test_reference_*_keeps_its_contract:
where NaN, zeros and infinities come out); invalid clip, threshold, scale and codebook values are
refused with an error naming them; the packed format round-trips bit for bit through pack/unpack
and save/load.

Example counts: ``examples(n)`` (tests/conftest.py) is n under the ci profile, ten times n under
HYPOTHESIS_PROFILE=long. Emulated backends (SIMT, Triton's interpreter) get fewer, smaller cases.
"""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings, strategies as st

import cases
from backend_checks import assert_bit_sharing_matches, codebook_check, lowbit_check, lut_conv2d_check
from conftest import EMULATED_BACKENDS, NATIVE_KERNEL_BACKENDS, examples, needs_avx512, require_backend
from mixedprec import formats, ops
from mixedprec.backends import reference
from mixedprec.formats import pack_weight

ALL_BACKENDS = ("reference",) + NATIVE_KERNEL_BACKENDS + EMULATED_BACKENDS
# numpy's warnings about NaN and inf arithmetic under Triton's interpreter: such inputs are the point
pytestmark = pytest.mark.filterwarnings("ignore:.* encountered in:RuntimeWarning")


# ---------------------------------------------------------------------------------------------
# bit_sharing_quant

def assert_bit_sharing_contract(x: torch.Tensor, clip: torch.Tensor, y: torch.Tensor) -> None:
    """NaN exactly where x is NaN, +-inf clipped like any large value, so |y| <= clip."""
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    bound = clip.to(y.dtype).double() * (1 + 4 * torch.finfo(y.dtype).eps)
    assert (y[~torch.isnan(y)].double().abs() <= bound).all()


def check_bit_sharing(backend: str, case: cases.BitSharingCase) -> None:
    device = require_backend(backend)
    x, clip, thresholds, grad_y = case.tensors()
    y = assert_bit_sharing_matches(backend, *(t.to(device) for t in (x, clip, thresholds, grad_y)), case.bits,
                                   case.signed)
    assert_bit_sharing_contract(x, clip, y)


@settings(max_examples=examples(200))
@given(case=cases.bit_sharing_cases(max_numel=1 << 17))
def test_reference_bit_sharing_quant_keeps_its_contract(case):
    x, clip, thresholds, _ = case.tensors()
    assert_bit_sharing_contract(x, clip, reference.bit_sharing_quant(x, clip, thresholds, case.bits, case.signed)[0])


@pytest.mark.parametrize("backend", NATIVE_KERNEL_BACKENDS)
@settings(max_examples=examples(200))
@given(case=cases.bit_sharing_cases(max_numel=1 << 17))
def test_bit_sharing_quant(backend, case):
    check_bit_sharing(backend, case)


@pytest.mark.parametrize("backend", EMULATED_BACKENDS)
@settings(max_examples=examples(30))
@given(case=cases.bit_sharing_cases(max_numel=64))
def test_bit_sharing_quant_emulated(backend, case):
    check_bit_sharing(backend, case)


not_positive = st.one_of(st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf]),
                         st.floats(max_value=0.0, width=16))
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
subnormal = st.floats(min_value=0.0, max_value=torch.finfo(torch.float32).smallest_normal, exclude_max=True,
                      width=32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(max_examples=examples(10))
@given(clip=st.one_of(not_positive, subnormal), threshold=st.one_of(st.floats(-2.0, 2.0), not_finite),
       signed=st.booleans())
def test_bit_sharing_quant_refuses_invalid_clip_and_thresholds(backend, clip, threshold, signed):
    device = require_backend(backend)
    x, thresholds = torch.randn(7, device=device), torch.tensor([0.1, threshold], device=device)
    with pytest.raises(ValueError, match="bit_sharing_quant: clip must be finite and > 0"):
        ops.bit_sharing_quant(x, torch.tensor(clip, device=device), torch.zeros(2, device=device), signed=signed,
                              backend=backend)
    if not math.isfinite(threshold):
        with pytest.raises(ValueError, match="bit_sharing_quant: thresholds must be finite"):
            ops.bit_sharing_quant(x, torch.tensor(1.0, device=device), thresholds, signed=signed, backend=backend)


# ---------------------------------------------------------------------------------------------
# codebook_quant

def assert_codebook_contract(weight: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> None:
    """0 where pruned whatever the weight, NaN for a kept NaN or +-inf weight."""
    assert (y[~mask] == 0).all()
    assert torch.isnan(y[mask & ~torch.isfinite(weight)]).all()


def check_codebook(backend: str, case: cases.CodebookCase) -> None:
    device = require_backend(backend, ops.KERNELS_BUILT["codebook_quant"])
    weight, codebook, scale, mask = case.tensors()
    assert_codebook_contract(weight, mask, codebook_check(backend, device, weight, codebook, scale, mask))


@settings(max_examples=examples(200))
@given(case=cases.codebook_cases(max_numel=1 << 16))
def test_reference_codebook_quant_keeps_its_contract(case):
    weight, codebook, scale, mask = case.tensors()
    assert_codebook_contract(weight, mask, reference.codebook_quant(weight, codebook, scale, mask))


@pytest.mark.parametrize("backend", NATIVE_KERNEL_BACKENDS)
@settings(max_examples=examples(200))
@given(case=cases.codebook_cases(max_numel=1 << 16))
def test_codebook_quant(backend, case):
    check_codebook(backend, case)


@pytest.mark.parametrize("backend", EMULATED_BACKENDS)
@settings(max_examples=examples(60))
@given(case=cases.codebook_cases(max_numel=256))
def test_codebook_quant_emulated(backend, case):
    check_codebook(backend, case)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(max_examples=examples(10))
@given(bad=not_positive, channels=st.integers(1, 6), data=st.data())
def test_codebook_quant_refuses_invalid_scales(backend, bad, channels, data):
    device = require_backend(backend, ops.KERNELS_BUILT["codebook_quant"])
    at = data.draw(st.integers(0, channels - 1))
    scale = torch.ones(channels, device=device)
    scale[at] = bad
    weight = torch.randn(channels, 5, device=device)
    with pytest.raises(ValueError, match=rf"codebook_quant: channel_scale must be finite and > 0, but "
                                         rf"channel_scale\[{at}\]"):
        ops.codebook_quant(weight, torch.tensor([-1.0, 1.0], device=device), scale,
                           torch.ones_like(weight, dtype=torch.bool), backend=backend)


# ---------------------------------------------------------------------------------------------
# lowbit_linear and lut_conv2d

def assert_non_finite_where_reached(y: torch.Tensor, reached: torch.Tensor) -> None:
    """The contract for non-finite x: every output a NaN or inf reaches is NaN or inf (pruned and
    zero weights multiply too: inf * 0 = NaN), every other output is finite."""
    assert torch.equal(~torch.isfinite(y.cpu()), reached)


def assert_lowbit_contract(x: torch.Tensor, y: torch.Tensor) -> None:
    assert_non_finite_where_reached(y, (~torch.isfinite(x)).any(-1, keepdim=True).expand(y.shape))


def check_lowbit(backend: str, case: cases.LinearCase) -> None:
    device = require_backend(backend, ops.KERNELS_BUILT["lowbit_linear"])
    x, packed, bias, grad_y = case.tensors()
    assert_lowbit_contract(x, lowbit_check(backend, device, packed, x, bias, grad_y, scales=case.scales,
                                           mixed=case.x.mixes_magnitudes))


@settings(max_examples=examples(150))
@given(case=cases.linear_cases(max_features=150, max_batch_numel=80))
def test_reference_lowbit_linear_keeps_its_contract(case):
    x, packed, bias, _ = case.tensors()
    assert_lowbit_contract(x, reference.lowbit_linear(x, packed, bias))


@pytest.mark.parametrize("backend", NATIVE_KERNEL_BACKENDS)
@settings(max_examples=examples(150))
@given(case=cases.linear_cases(max_features=150, max_batch_numel=80))
def test_lowbit_linear(backend, case):
    check_lowbit(backend, case)


@pytest.mark.parametrize("backend", EMULATED_BACKENDS)
@settings(max_examples=examples(60))
@given(case=cases.linear_cases(max_features=20, max_batch_numel=4))
def test_lowbit_linear_emulated(backend, case):
    check_lowbit(backend, case)


def assert_conv_contract(x: torch.Tensor, packed, conv: dict, y: torch.Tensor) -> None:
    window = torch.ones(packed.shape, dtype=torch.float64)
    reached = torch.nn.functional.conv2d((~torch.isfinite(x)).double(), window, **conv) > 0
    assert_non_finite_where_reached(y, reached)


def check_conv(backend: str, case: cases.ConvCase) -> None:
    device = require_backend(backend, ops.KERNELS_BUILT["lut_conv2d"])
    x, packed, bias, grad_y = case.tensors()
    assert_conv_contract(x, packed, case.conv, lut_conv2d_check(backend, device, x, packed, bias, grad_y, case.conv,
                                                                scales=case.scales, mixed=case.x.mixes_magnitudes))


@settings(max_examples=examples(120))
@given(case=cases.conv_cases(max_channels=12, max_extent=14))
def test_reference_lut_conv2d_keeps_its_contract(case):
    x, packed, bias, _ = case.tensors()
    assert_conv_contract(x, packed, case.conv, reference.lut_conv2d(x, packed, bias, **case.conv))


@pytest.mark.parametrize("backend", NATIVE_KERNEL_BACKENDS)
@settings(max_examples=examples(120))
@given(case=cases.conv_cases(max_channels=12, max_extent=14))
def test_lut_conv2d(backend, case):
    check_conv(backend, case)


@pytest.mark.parametrize("backend", EMULATED_BACKENDS)
@settings(max_examples=examples(40))
@given(case=cases.conv_cases(max_channels=2, max_extent=3))
def test_lut_conv2d_emulated(backend, case):
    check_conv(backend, case)


@needs_avx512
@settings(max_examples=examples(80))
@given(case=cases.conv_cases(max_channels=20, max_extent=14, winograd=True))
def test_lut_conv2d_cpu_winograd(case):
    check_conv("cpu", case)


# ---------------------------------------------------------------------------------------------
# the packed format

packed_weights = cases.shapes(1, 4, 600, allow_empty=False).flatmap(cases.packed_cases)


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's storage as integers: equal iff bit for bit equal."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@settings(max_examples=examples(200))
@given(case=packed_weights)
def test_pack_round_trips_codes_and_mask(case):
    codes, codebook, scale, keep = case.inputs()
    packed = case.packed()
    kept = int(keep.sum())
    assert (packed.keep_bitmap is None) == bool(keep.all())
    assert torch.equal(packed.keep_mask(), keep)
    assert torch.equal(packed.code_values(), torch.where(keep, codes, 0))
    assert packed.kept == kept and packed.codes.numel() == -(-kept * case.bits // 8)
    if packed.keep_bitmap is not None:
        flat = keep.reshape(-1)
        assert packed.code_offsets.tolist() == [int(flat[:64 * b].sum()) for b in range(-(-flat.numel() // 64))]
    # unused bits of a last partial byte are 0: the bytes depend on the weight alone
    for stream, length in ((packed.codes, kept * case.bits), (packed.keep_bitmap, keep.numel())):
        if stream is not None and length % 8:
            assert int(stream[-1]) >> (length % 8) == 0
    assert torch.equal(_bits_of(packed.codebook), _bits_of(codebook.half()))
    assert torch.equal(_bits_of(packed.channel_scale), _bits_of(scale))


@settings(max_examples=examples(10))
@given(shape=cases.shapes(1, 4, 60, allow_empty=False), bits=st.integers(1, 8), data=st.data())
def test_pack_refuses_empty_shapes(shape, bits, data):
    shape = list(shape)
    shape[data.draw(st.integers(0, len(shape) - 1))] = 0
    with pytest.raises(ValueError, match="PackedWeight: shape must have positive sizes"):
        pack_weight(torch.zeros(shape, dtype=torch.int64), torch.zeros(1 << bits), torch.ones(shape[0]), bits)


@settings(max_examples=examples(10))
@given(case=packed_weights, bad=not_positive, data=st.data())
def test_pack_refuses_invalid_scales_and_codebooks(case, bad, data):
    codes, codebook, scale, keep = case.inputs()
    bad_scale, bad_codebook = scale.clone(), codebook.clone()
    at = data.draw(st.integers(0, len(scale) - 1))
    bad_scale[at] = bad
    with pytest.raises(ValueError, match=rf"PackedWeight: channel_scale must be finite and > 0, but "
                                         rf"channel_scale\[{at}\]"):
        pack_weight(codes, codebook, bad_scale, case.bits, keep)
    if not math.isfinite(bad):
        at = data.draw(st.integers(0, len(codebook) - 1))
        bad_codebook[at] = bad
        with pytest.raises(ValueError, match=rf"PackedWeight: codebook must be finite, but codebook\[{at}\]"):
            pack_weight(codes, bad_codebook, scale, case.bits, keep)


@settings(max_examples=examples(50))
@given(case=packed_weights)
def test_save_load_round_trips_bit_for_bit(case):
    packed = case.packed()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "layer.safetensors")
        formats.save_file(path, *formats.packed_tensors(packed, "layer."))
        tensors, description = formats.load_file(path)
    loaded = formats.packed_from_tensors(tensors, "layer.", description)
    assert (loaded.shape, loaded.bits) == (packed.shape, packed.bits)
    for name in formats.FIELDS:
        original, back = getattr(packed, name), getattr(loaded, name)
        assert (original is None) == (back is None), name
        if original is not None:
            assert original.dtype == back.dtype and torch.equal(_bits_of(original), _bits_of(back)), name
