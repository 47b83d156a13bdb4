"""codebook_quant: the reference's semantics (nearest level, ties, mask, scales, non-finite
inputs, straight-through gradient), argument checks, the custom op's registration, and every
kernel backend against the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mixedprec import ops, reference
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_compute_in_float32_or_float64(dtype):
    weight, codebook, scale, mask = make_case(dtype=dtype)
    y = ops.codebook_quant(weight, codebook, scale, mask)
    expected = ops.codebook_quant(weight.to(torch.promote_types(dtype, torch.float32)), codebook, scale, mask)
    assert y.dtype == dtype and torch.equal(y, expected.to(dtype))


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
    device = require_backend(backend)  # skips when the backend cannot run here at all
    if not ops._CODEBOOK_KERNEL_BUILT[backend]:
        pytest.skip(f"backend {backend!r} has no codebook_quant kernel in this build")
    return device


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_without_a_codebook_kernel_is_refused_not_replaced(backend):
    if ops._CODEBOOK_KERNEL_BUILT[backend]:
        pytest.skip(f"backend {backend!r} has a codebook_quant kernel")
    weight, codebook, scale, mask = make_case()
    with pytest.raises(RuntimeError, match=backend):
        ops.codebook_quant(weight, codebook, scale, mask, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, levels", [((1, 1), 1), ((7, 3, 3, 3), 2), ((64, 32, 3, 3), 16), ((300, 1025), 256)])
def test_every_backend_matches_the_reference(backend, dtype, shape, levels):
    device = _codebook_backend_device(backend)
    weight, codebook, scale, mask = make_case(shape, levels, dtype=dtype)
    grad_y = torch.randn(shape).to(dtype)
    out = []
    for b, dev in (("reference", "cpu"), (backend, device)):
        w = weight.to(dev).requires_grad_()
        y = ops.codebook_quant(w, codebook.to(dev), scale.to(dev), mask.to(dev), backend=b)
        y.backward(grad_y.to(dev))
        out.append((y.detach().cpu(), w.grad.cpu()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


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
