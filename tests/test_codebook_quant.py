"""codebook_quant: the reference's semantics (nearest level, ties, mask, scales, non-finite
inputs, straight-through gradient), argument checks, the custom op's registration, and every
kernel backend against the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mixedprec import ops, reference
from backend_checks import assert_bfloat16_ties, codebook_check
from conftest import KERNEL_BACKENDS, require_backend


def make_case(shape=(6, 4, 3, 3), levels=8, seed=0, keep=0.6, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g).to(dtype)
    codebook = torch.randn(levels, generator=g).sort().values
    scale = torch.rand(shape[0], generator=g) + 0.25
    mask = torch.rand(shape, generator=g) < keep
    return [t.to(device) for t in (weight, codebook, scale, mask)]


def brute_force(weight, codebook, scale, mask):
    """Nearest level by exhaustive distance (float64), for inputs far from ties."""
    channel_shape = (-1,) + (1,) * (weight.dim() - 1)
    z = weight.double() / scale.double().reshape(channel_shape)
    index = (z.unsqueeze(-1) - codebook.double()).abs().argmin(-1)
    return torch.where(mask, scale.double().reshape(channel_shape) * codebook.double()[index], 0.0)


def test_nearest_level_per_channel_scale_and_mask():
    weight, codebook, scale, mask = make_case()
    y = ops.codebook_quant(weight, codebook, scale, mask)
    torch.testing.assert_close(y.double(), brute_force(weight, codebook, scale, mask))
    assert torch.all(y[~mask] == 0) and y.dtype == weight.dtype and y.shape == weight.shape


def test_half_way_goes_to_the_lower_level():
    codebook = torch.tensor([-1.0, 0.0, 0.5, 2.0])  # midpoints -0.5, 0.25, 1.25 are exact in binary
    weight = torch.tensor([[-0.5, 0.25, 1.25, -0.4999, 1.2501]]) * 4.0
    y = ops.codebook_quant(weight, codebook, torch.tensor([4.0]), torch.ones_like(weight, dtype=torch.bool))
    assert y.tolist() == [[-4.0, 0.0, 2.0, 0.0, 8.0]]


def test_values_beyond_the_codebook_take_its_end_levels_and_one_level_takes_all():
    weight = torch.tensor([[-100.0, 100.0, 0.3]])
    keep = torch.ones_like(weight, dtype=torch.bool)
    assert ops.codebook_quant(weight, torch.tensor([-1.0, 1.0]), torch.ones(1), keep).tolist() == [[-1.0, 1.0, 1.0]]
    assert ops.codebook_quant(weight, torch.tensor([0.5]), torch.full((1,), 2.0), keep).tolist() == [[1.0, 1.0, 1.0]]


def test_non_finite_weight_gives_nan_when_kept_and_zero_when_pruned():
    weight = torch.tensor([[float("nan"), float("inf"), -float("inf"), float("nan")]])
    mask = torch.tensor([[True, True, True, False]])
    y = ops.codebook_quant(weight, torch.tensor([-1.0, 1.0]), torch.ones(1), mask)
    assert torch.isnan(y[0, :3]).all() and y[0, 3] == 0


def test_gradient_is_straight_through_at_kept_and_zero_at_pruned():
    weight, codebook, scale, mask = make_case()
    weight.requires_grad_()
    codebook.requires_grad_()
    scale.requires_grad_()
    grad_y = torch.randn_like(weight)
    ops.codebook_quant(weight, codebook, scale, mask).backward(grad_y)
    assert torch.equal(weight.grad, torch.where(mask, grad_y, 0.0))
    assert codebook.grad is None and scale.grad is None  # frozen: no gradient reaches them


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_compute_in_float32(dtype):
    weight, codebook, scale, mask = make_case(dtype=dtype)
    y = ops.codebook_quant(weight, codebook, scale, mask)
    assert y.dtype == dtype and torch.equal(y, ops.codebook_quant(weight.float(), codebook, scale, mask).to(dtype))


def test_float64_weights_compute_in_float64():
    """Weights 2^-40 either side of the midpoint 0.5 and a scale of 1 + 2^-40: float64 tells them
    apart and keeps the scale; float32 would round both weights onto the midpoint (the lower
    level) and the scale to 1."""
    weight = torch.tensor([[0.5 + 2.0**-40, 0.5 - 2.0**-40]], dtype=torch.float64)
    codebook, scale = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1 + 2.0**-40], dtype=torch.float64)
    mask = torch.ones_like(weight, dtype=torch.bool)
    y = ops.codebook_quant(weight, codebook, scale, mask)
    assert y.dtype == torch.float64 and y.tolist() == [[1 + 2.0**-40, 0.0]]
    assert ops.codebook_quant(weight.float(), codebook, scale, mask).tolist() == [[0.0, 0.0]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 256), st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_output_is_a_nearest_scaled_level_or_zero(levels, channels, per_channel, seed):
    weight, _, scale, mask = make_case((channels, per_channel), seed=seed)
    codebook = torch.linspace(-2.0, 2.0, levels) ** 3 if levels > 1 else torch.tensor([0.7])
    y = ops.codebook_quant(weight * 3, codebook, scale, mask)
    z = (weight * 3) * (1.0 / scale)[:, None]
    level = torch.where(mask, y / scale[:, None], 0.0)
    distance = (z.unsqueeze(-1) - codebook).abs()
    chosen = (level.unsqueeze(-1) - codebook).abs().argmin(-1)
    assert torch.all(y[~mask] == 0)
    assert torch.allclose(level[mask], codebook[chosen][mask], atol=1e-5)  # on the grid
    chosen_distance = distance.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen_distance[mask] <= distance.min(-1).values[mask] + 1e-5)  # and nearest


BAD_ARGUMENTS = [
    ("weight", lambda w, c, s, m: (w.long(), c, s, m)),
    ("weight", lambda w, c, s, m: (w[0, 0, 0, 0], c, s, m)),
    ("codebook", lambda w, c, s, m: (w, c.int(), s, m)),
    ("codebook", lambda w, c, s, m: (w, c.reshape(2, 4), s, m)),
    ("codebook", lambda w, c, s, m: (w, torch.arange(257.0), s, m)),
    ("codebook", lambda w, c, s, m: (w, c.flip(0), s, m)),
    ("codebook", lambda w, c, s, m: (w, torch.tensor([0.0, 1.0, 1.0]), s, m)),
    ("codebook", lambda w, c, s, m: (w, torch.tensor([0.0, float("nan")]), s, m)),
    ("channel_scale", lambda w, c, s, m: (w, c, s[:-1], m)),
    ("channel_scale", lambda w, c, s, m: (w, c, torch.where(torch.arange(len(s)) == 2, 0.0, s), m)),
    ("channel_scale", lambda w, c, s, m: (w, c, torch.where(torch.arange(len(s)) == 1, float("nan"), s), m)),
    ("keep_mask", lambda w, c, s, m: (w, c, s, m.float())),
    ("keep_mask", lambda w, c, s, m: (w, c, s, m[:, :2])),
]


@pytest.mark.parametrize("name, mutate", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(name, mutate):
    with pytest.raises(ValueError, match=f"codebook_quant: {name}"):
        ops.codebook_quant(*mutate(*make_case()))


def _codebook_backend_device(backend):
    return require_backend(backend, ops._CODEBOOK_KERNEL_BUILT)


def test_backend_without_a_codebook_kernel_is_refused_not_replaced(kernel_backend, monkeypatch):
    """As in a build that lacks the op's kernel for this backend: asked for, it is an error naming
    the backend; not asked for, the op falls back to the reference."""
    backend, device = kernel_backend
    monkeypatch.setitem(ops._CODEBOOK_KERNEL_BUILT, backend, False)
    weight, codebook, scale, mask = make_case(device=device)
    with pytest.raises(RuntimeError, match=f"codebook_quant: backend '{backend}' has no codebook_quant kernel"):
        ops.codebook_quant(weight, codebook, scale, mask, backend=backend)
    if ops.resolve_backend("codebook_quant", None, weight) == backend:  # the default here
        assert torch.equal(ops.codebook_quant(weight, codebook, scale, mask).cpu(),
                           reference.codebook_quant(*(t.cpu() for t in (weight, codebook, scale, mask))))


# Small shapes: the SIMT emulation starts a host thread per CUDA thread, the Triton interpreter
# runs numpy per program. The CPU kernel gets large ones in test_cpu_kernel_large_and_threaded.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, levels", [((1,), 1), ((7, 3, 3, 3), 2), ((13, 5, 3, 3), 16), ((24, 129), 256)])
def test_every_backend_matches_the_reference(kernel_backend, dtype, shape, levels):
    backend, device = kernel_backend
    _codebook_backend_device(backend)
    codebook_check(backend, device, *make_case(shape, levels, dtype=dtype))


@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_every_backend_masks_like_the_reference(kernel_backend, keep):
    backend, device = kernel_backend
    _codebook_backend_device(backend)
    y = codebook_check(backend, device, *make_case((11, 70), 16, keep=keep, seed=3))
    assert (y == 0).all() if keep == 0.0 else (y != 0).any()


def _views():
    """(weight, keep_mask) pairs that are not contiguous, and edge shapes, with their names."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 18, generator=g)
    mask = torch.rand(40, 18, generator=g) < 0.7
    conv = torch.randn(8, 6, 3, 3, generator=g)
    return {
        "transposed slice": (base.t()[:, ::3], mask.t()[:, ::3]),  # (18, 14), strides (1, 54)
        "channels_last conv": (conv.to(memory_format=torch.channels_last), torch.rand(8, 6, 3, 3, generator=g) < 0.5),
        "row slice": (base[5:9, 1:], mask[5:9, 1:]),
        "expanded mask": (base[:3], torch.tensor([True, False]).repeat(9).expand(3, 18)),
        "one weight per channel": (base[:, 0], mask[:, 0]),
        "no channels": (torch.empty(0, 5), torch.empty(0, 5, dtype=torch.bool)),
        "empty channels": (torch.empty(3, 0, 2), torch.empty(3, 0, 2, dtype=torch.bool)),
    }


@pytest.mark.parametrize("view", list(_views()))
def test_every_backend_on_strided_views_and_edge_shapes(kernel_backend, view):
    backend, device = kernel_backend
    _codebook_backend_device(backend)
    weight, mask = _views()[view]
    g = torch.Generator().manual_seed(7)
    codebook = torch.randn(16, generator=g).sort().values
    scale = torch.rand(weight.shape[0], generator=g) + 0.25
    codebook_check(backend, device, weight, codebook, scale, mask)


def _tie_case(levels, dtype=torch.float32):
    """Weights exactly on the midpoints (z = w * (1/s) is exact for power-of-two scales), one ulp
    either side, and on the levels. float32: a random codebook whose top three levels are adjacent
    floats (their sums round, so midpoints land on levels); 16-bit: levels on a 1/4 grid, so that
    the midpoints survive the weight's rounding to float16/bfloat16."""
    g = torch.Generator().manual_seed(levels)
    if dtype == torch.float32:
        codebook = torch.randn(levels, generator=g).sort().values
        if levels >= 4:
            up = torch.tensor(float("inf"))
            codebook[-3] = 5.0
            codebook[-2] = codebook[-3].nextafter(up)
            codebook[-1] = codebook[-2].nextafter(up)
    else:
        codebook = (torch.randperm(64, generator=g)[:levels].sort().values - 32) * 0.25
    mid = (codebook[:-1] + codebook[1:]) * 0.5
    z = torch.cat([mid, mid.nextafter(torch.tensor(float("inf"))), mid.nextafter(torch.tensor(-float("inf"))),
                   codebook, codebook[:1] - 1, codebook[-1:] + 1])
    scale = torch.tensor([0.25, 1.0, 2.0, 8.0])
    weight = (z * scale[:, None]).to(dtype)
    return weight, codebook, scale, torch.ones_like(weight, dtype=torch.bool)


@pytest.mark.parametrize("dtype, levels", [(torch.float32, 2), (torch.float32, 16), (torch.float32, 256),
                                           (torch.float16, 16), (torch.bfloat16, 16)])
def test_every_backend_breaks_ties_like_the_reference(kernel_backend, dtype, levels):
    backend, device = kernel_backend
    _codebook_backend_device(backend)
    weight, codebook, scale, mask = _tie_case(levels, dtype)
    y = codebook_check(backend, device, weight, codebook, scale, mask, grad=False)
    on_midpoint = y[:, : levels - 1].float() / scale[:, None]
    assert torch.equal(on_midpoint, codebook[:-1].expand_as(on_midpoint))  # the lower level


def test_every_backend_rounds_bfloat16_ties_to_even(kernel_backend):
    """Outputs halfway between two bfloat16 numbers: levels 1 + 2^-8 and 1 + 3 * 2^-8 of both signs
    times power-of-two scales. To even they store as 1 and 1 + 2^-6 (times the scale); rounding
    half up would give 1 + 2^-7 for the first, half down 1 + 2^-7 for the second."""
    backend, device = kernel_backend
    _codebook_backend_device(backend)
    codebook = torch.tensor([-1 - 3 * 2.0**-8, -1 - 2.0**-8, 1 + 2.0**-8, 1 + 3 * 2.0**-8])
    scale = torch.tensor([1.0, 0.5, 4.0])
    nearest = torch.tensor([-1 - 2.0**-6, -1.0, 1.0, 1 + 2.0**-6])  # bfloat16 numbers nearest to each level
    weight = (nearest * scale[:, None]).to(torch.bfloat16)
    mask = torch.ones_like(weight, dtype=torch.bool)
    assert_bfloat16_ties(reference.codebook_quant(weight.float(), codebook, scale, mask))
    y = codebook_check(backend, device, weight, codebook, scale, mask, grad=False)
    assert torch.equal(y.float(), nearest * scale[:, None])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under Triton's interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_every_backend_on_non_finite_and_extreme_values(kernel_backend):
    backend, device = kernel_backend
    _codebook_backend_device(backend)
    big, tiny = torch.finfo(torch.float32).max, torch.finfo(torch.float32).smallest_normal
    row = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, big, -big, tiny, 1e-45])
    # scales: 1/s overflows to inf for the subnormal one (z = 0 * inf is NaN), z overflows for tiny
    scale = torch.tensor([1.0, 1e-45, tiny, big, 3e-39])
    weight = row.repeat(len(scale), 1)
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[:, ::4] = False
    # the first codebook's last midpoint overflows to inf
    for codebook in (torch.tensor([-big, -1.0, 0.0, 0.75 * big, big]), torch.tensor([-2.0, 0.5]), torch.tensor([-0.0])):
        codebook_check(backend, device, weight, codebook, scale, mask)


def test_cpu_kernel_large_and_threaded():
    _codebook_backend_device("cpu")
    for dtype in (torch.float32, torch.bfloat16):  # many parallel chunks; rows not vector-aligned
        codebook_check("cpu", torch.device("cpu"), *make_case((300, 1025), 256, dtype=dtype, seed=2))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["cpu", "simt"]), st.integers(1, 256), st.integers(1, 9), st.integers(1, 70),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_kernels_match_the_reference_on_random_cases(backend, levels, channels, per_channel, keep, seed):
    _codebook_backend_device(backend)
    codebook_check(backend, torch.device("cpu"),
                  *make_case((channels, per_channel), levels, seed=seed, keep=keep), grad=False)


@pytest.mark.parametrize("namespace", ["mixedprec", "mixedprec_simt"])
def test_kernel_ops_check_arguments_in_cpp(namespace):
    """Direct torch.ops calls bypass the Python checks; TORCH_CHECK names the argument."""
    _codebook_backend_device("simt" if namespace == "mixedprec_simt" else "cpu")
    op = "codebook_quant_fwd"
    kernel = getattr(getattr(torch.ops, namespace), op)
    w, c, s, m = make_case((4, 6))
    bad = [
        ("weight must be float32, float16 or bfloat16", (w.double(), c, s, m)),
        ("weight must have an output-channel dim 0", (w[0, 0], c, s, m[0, 0])),
        ("weight must be contiguous", (w.t(), c, torch.ones(6), m.t().contiguous())),
        ("codebook must be 1-D with 1 to 256 levels", (w, c.reshape(2, 4), s, m)),
        ("codebook must be 1-D with 1 to 256 levels", (w, torch.arange(257.0), s, m)),
        ("codebook must be 1-D with 1 to 256 levels", (w, c[:0], s, m)),
        ("codebook must be float32", (w, c.double(), s, m)),
        ("codebook must be contiguous", (w, torch.randn(16)[::2], s, m)),
        ("channel_scale must have shape", (w, c, s[:-1], m)),
        ("channel_scale must be float32", (w, c, s.half(), m)),
        ("keep_mask must be bool", (w, c, s, m.float())),
        ("keep_mask must have weight's shape", (w, c, s, m[:, :3])),
        ("keep_mask must be contiguous", (w, c, s, m.t().contiguous().t())),
    ]
    for message, args in bad:
        with pytest.raises(RuntimeError, match=f"{op}: {message}"):
            kernel(*args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_pass_opcheck(backend):
    device = _codebook_backend_device(backend)
    for seed, shape in enumerate([(4, 3, 3, 3), (5, 7)]):
        weight, codebook, scale, mask = make_case(shape, seed=seed, device=device)
        torch.library.opcheck(torch.ops.mixedprec.codebook_quant.default,
                              (weight.requires_grad_(), codebook, scale, mask, backend))


def test_custom_op_registration_passes_opcheck():
    # The "reference" route of the custom op is the slot kernels fill: fake, autograd and
    # schema are checked here before any kernel exists.
    for seed, shape in enumerate([(4, 3, 3, 3), (5, 7)]):
        weight, codebook, scale, mask = make_case(shape, seed=seed)
        torch.library.opcheck(torch.ops.mixedprec.codebook_quant.default,
                              (weight.requires_grad_(), codebook, scale, mask, "reference"))


def test_custom_op_reference_route_equals_the_composite():
    weight, codebook, scale, mask = make_case()
    weight.requires_grad_()
    y = torch.ops.mixedprec.codebook_quant(weight, codebook, scale, mask, "reference")
    y.sum().backward()
    assert torch.equal(y, reference.codebook_quant(weight, codebook, scale, mask))
    assert torch.equal(weight.grad, mask.float())


def test_torch_compile_fullgraph_equals_eager():
    weight, codebook, scale, mask = make_case()
    compiled = torch.compile(lambda *a: ops.codebook_quant(*a), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(weight, codebook, scale, mask), ops.codebook_quant(weight, codebook, scale, mask))
