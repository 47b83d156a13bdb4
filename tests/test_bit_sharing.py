"""bit_sharing_quant: every backend against the reference composite, the reference's own math,
the op's registration (opcheck, torch.compile) and its argument checks."""
from __future__ import annotations

import math

import pytest
import torch

from mixedprec import ops
from mixedprec.backends import reference
from backend_checks import assert_bfloat16_ties, assert_bit_sharing_matches, bit_sharing_run
from conftest import custom_op, kernel_op, require_backend

BIT_SETS = [(2, 4, 8), (1,), (3, 5), (1, 2, 3, 4, 5, 6, 7, 8)]
SIZES = [1, 7, 1023, (1 << 20) + 3]


def make_case(shape, bits, signed, dtype=torch.float32, device="cpu", seed=0, strided=False):
    """x (a strided view when asked), clip, thresholds set 50% off the residual means so that the
    gate decisions are far from ties, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if strided:  # every other element of a twice-as-long buffer: non-contiguous
        x = torch.randn(numel * 2, generator=g)[::2].reshape(shape)
    else:
        x = torch.randn(shape, generator=g)
    x = x.to(dtype)
    clip = torch.tensor(1.5)
    _, residual_mean = reference.bit_sharing_quant(x, clip, torch.zeros(len(bits) - 1), bits, signed)
    flips = torch.rand(len(bits) - 1, generator=g) < 0.5
    thresholds = torch.where(flips, 0.5, 1.5) * residual_mean
    grad_y = torch.randn(shape, generator=g).to(dtype)
    return [t.to(device) for t in (x, clip, thresholds, grad_y)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("signed", [True, False])
def test_backends_match_reference_sizes(kernel_backend, n, signed):
    backend, device = kernel_backend
    case = make_case((n,), (2, 4, 8), signed, device=device, seed=n)
    assert_bit_sharing_matches(backend, *case, (2, 4, 8), signed)


@pytest.mark.parametrize("bits", BIT_SETS)
@pytest.mark.parametrize("signed", [True, False])
def test_backends_match_reference_bits(kernel_backend, bits, signed):
    backend, device = kernel_backend
    case = make_case((37, 3, 3, 5), bits, signed, device=device, seed=len(bits))
    assert_bit_sharing_matches(backend, *case, bits, signed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backends_match_reference_half_types(kernel_backend, dtype):
    backend, device = kernel_backend
    case = make_case((3001,), (2, 4, 8), True, dtype=dtype, device=device, seed=3)
    assert_bit_sharing_matches(backend, *case, (2, 4, 8), True)


def test_backends_match_reference_non_contiguous(kernel_backend):
    backend, device = kernel_backend
    x, clip, thresholds, grad_y = make_case((65, 33), (2, 4, 8), True, device=device, strided=True)
    assert not x.is_contiguous()
    assert_bit_sharing_matches(backend, x, clip, thresholds, grad_y, (2, 4, 8), True)
    transposed = x.t()  # dense but not contiguous
    assert_bit_sharing_matches(backend, transposed, clip, thresholds, grad_y.t(), (2, 4, 8), True)


def test_backends_keep_channels_last(kernel_backend):
    """An activation of a model moved to channels_last: the same values, residual means and
    gradients, and a channels-last output (no copy into NCHW and back around every layer)."""
    backend, device = kernel_backend
    for signed, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        x, clip, thresholds, grad_y = make_case((2, 5, 7, 3), (2, 4, 8), signed, dtype=dtype, device=device, seed=4)
        x, grad_y = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_y))
        assert not x.is_contiguous()
        assert_bit_sharing_matches(backend, x, clip, thresholds, grad_y, (2, 4, 8), signed)


def test_backends_keep_bfloat16_subnormals(kernel_backend):
    """Triton's interpreter flushed bfloat16 subnormals to zero when widening them to float32
    (found by the property tests): x / clip is 0.125 .. 0.875 here, not 0."""
    backend, device = kernel_backend
    tiny = torch.finfo(torch.bfloat16).smallest_normal
    x = (torch.tensor([1.0, -3.0, 5.0, -7.0]) * tiny / 8).to(torch.bfloat16)
    assert (x.float().abs() < tiny).all()
    thresholds = torch.zeros(2)
    ref = assert_bit_sharing_matches(backend, x.to(device), torch.tensor(tiny, device=device), thresholds.to(device),
                                     torch.ones(4, dtype=torch.bfloat16, device=device), (2, 4, 8), True)
    assert (ref != ops.bit_sharing_quant(torch.zeros_like(x), torch.tensor(tiny), thresholds).output).all()


@pytest.mark.parametrize("signed", [True, False])
def test_backends_round_bfloat16_ties_to_even(kernel_backend, signed):
    """x beyond the clip range comes out as +-v (0 below an activation's range). v = 1 + 2^-8 and
    1 + 3 * 2^-8 lie halfway between two bfloat16 numbers: to even they store as 1 and 1 + 2^-6;
    rounding half up would give 1 + 2^-7 for the first, half down 1 + 2^-7 for the second."""
    backend, device = kernel_backend
    x = torch.tensor([-math.inf, -3.0, 2.0, math.inf], dtype=torch.bfloat16)
    for clip, stored in ((1 + 2.0**-8, 1.0), (1 + 3 * 2.0**-8, 1 + 2.0**-6)):
        clip = torch.tensor(clip)
        y32 = reference.bit_sharing_quant(x.float(), clip, torch.zeros(2), (2, 4, 8), signed)[0]
        assert_bfloat16_ties(y32[y32 != 0])
        y = assert_bit_sharing_matches(backend, x.to(device), clip.to(device), torch.zeros(2, device=device),
                                       torch.ones(4, dtype=torch.bfloat16, device=device), (2, 4, 8), signed)
        assert y.tolist() == [-stored, -stored, stored, stored] if signed else [0, 0, stored, stored]


def test_empty_tensor(kernel_backend):
    backend, device = kernel_backend
    x = torch.empty(0, 4, device=device, requires_grad=True)
    result = ops.bit_sharing_quant(x, torch.tensor(1.0, device=device), torch.zeros(2, device=device), backend=backend)
    assert result.output.shape == (0, 4)
    assert torch.isnan(result.residual_mean).all()  # mean over nothing, as torch.mean says
    result.output.sum().backward()
    assert x.grad.shape == (0, 4)


def test_inference_calls_the_kernel_directly_with_the_same_results_and_checks(kernel_backend):
    """Without autograd (inference mode, no_grad) the op skips its custom op: same output and
    residual means as with autograd, and a NaN clip is still refused."""
    backend, device = kernel_backend
    x, clip, thresholds = (t.to(device) for t in make_case((1, 3, 17, 19), (2, 4, 8), False, seed=3)[:3])
    tracked = ops.bit_sharing_quant(x.requires_grad_(), clip.requires_grad_(), thresholds, (2, 4, 8), False,
                                    backend=backend)
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            direct = ops.bit_sharing_quant(x, clip, thresholds, (2, 4, 8), False, backend=backend)
            assert torch.equal(direct.output, tracked.output.detach())
            assert torch.equal(direct.residual_mean, tracked.residual_mean)
            with pytest.raises(ValueError, match="clip must be finite"):
                ops.bit_sharing_quant(x, torch.full_like(clip, float("nan")), thresholds, (2, 4, 8), False,
                                      backend=backend)


def test_cpu_results_are_deterministic():
    require_backend("cpu")
    case = make_case((100_003,), (2, 4, 8), True, seed=5)
    first, second = (bit_sharing_run("cpu", *case, (2, 4, 8), True) for _ in range(2))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


def test_cpu_residual_means_of_one_signed_terms_stay_accurate():
    """Equal x: every |r_j| the same, so float32 lanes summing a whole chunk drifted one way
    (found by the property tests: 1.1e-5 relative on 13248 elements, 8 bitwidths)."""
    require_backend("cpu")
    bits = (1, 2, 3, 4, 5, 6, 7, 8)
    x = torch.full((3, 4416), 1.6741619557928192)
    clip = torch.tensor(3.0390625)
    _, exact = reference.bit_sharing_quant(x.double(), clip.double(), torch.zeros(7), bits, False)
    result = ops.bit_sharing_quant(x, clip, exact / 2, bits, signed=False, backend="cpu")
    torch.testing.assert_close(result.residual_mean, exact, rtol=1e-5, atol=1e-7)  # exact: a float64 mean


def test_gate_guess_miss_still_exact():
    """The CPU forward guesses the gates from a sample; a tensor whose sample is unrepresentative
    (one large block) must still give the exact result."""
    require_backend("cpu")
    x = torch.randn(1 << 18) * 0.01
    x[1000:1100] = 1.0  # a region the sample skips raises mean |r| past the threshold
    clip = torch.tensor(1.0)
    _, true_mean = reference.bit_sharing_quant(x, clip, torch.zeros(2), (2, 4, 8), True)
    _, sample_mean = reference.bit_sharing_quant(x[:256], clip, torch.zeros(2), (2, 4, 8), True)
    thresholds = (true_mean + sample_mean) / 2
    assert ((sample_mean > thresholds) != (true_mean > thresholds)).any()
    assert_bit_sharing_matches("cpu", x, clip, thresholds, torch.randn_like(x), (2, 4, 8), True)


# ---------------------------------------------------------------------------------------------
# the reference's own math

def test_reference_gradcheck_float64():
    """Autograd of the reference equals finite differences of its straight-through surrogate:
    rounding replaced by t + (frozen round(t0) - t0), each gate by sigmoid(a - alpha) + frozen
    (hard - sigmoid). Values agree with the real op at the point; derivatives are the STE's."""
    bits, g = (2, 4, 8), torch.Generator().manual_seed(0)
    for signed in (True, False):
        x = torch.randn(40, generator=g, dtype=torch.float64)
        clip = torch.tensor(1.3, dtype=torch.float64)
        thresholds = torch.tensor([0.05, 0.01], dtype=torch.float64)
        round_offsets, gate_offsets = [], []

        def record_round(t):
            round_offsets.append((torch.round(t) - t).detach())
            return torch.round(t)

        def record_gate(a, alpha):
            hard = (a > alpha).to(a.dtype)
            gate_offsets.append((hard - torch.sigmoid(a - alpha)).detach())
            return hard

        y_real, _ = reference.bit_sharing_quant(x, clip, thresholds, bits, signed)
        reference.bit_sharing_quant(x, clip, thresholds, bits, signed, round_fn=record_round, gate_fn=record_gate)

        def surrogate(x, clip, thresholds):
            rounds, gates = iter(round_offsets), iter(gate_offsets)
            return reference.bit_sharing_quant(
                x, clip, thresholds, bits, signed,
                round_fn=lambda t: t + next(rounds),
                gate_fn=lambda a, alpha: torch.sigmoid(a.detach() - alpha) + next(gates))[0]

        inputs = [t.clone().requires_grad_() for t in (x, clip, thresholds)]
        torch.testing.assert_close(surrogate(*inputs), y_real)
        assert torch.autograd.gradcheck(surrogate, inputs, eps=1e-7, atol=1e-6)
        # and the surrogate's autograd is the reference's own
        y_ste, _ = reference.bit_sharing_quant(*inputs, bits, signed)
        grad_y = torch.randn_like(x)
        for a, b in zip(torch.autograd.grad(y_ste, inputs, grad_y), torch.autograd.grad(surrogate(*inputs), inputs, grad_y)):
            torch.testing.assert_close(a, b)


def test_all_gates_on_equals_direct_rounding():
    """With every gate on and bits doubling, z_hat is direct b_K-bit rounding but at ties."""
    x = torch.randn(200_000, dtype=torch.float64) * 0.7
    clip = torch.tensor(1.0, dtype=torch.float64)
    y, _ = reference.bit_sharing_quant(x, clip, torch.full((2,), -1.0, dtype=torch.float64), (2, 4, 8), True)
    z = (x.clamp(-1, 1) + 1) / 2
    direct = 2 * torch.round(z * 255) / 255 - 1
    differs = (y - direct).abs() > 1e-9
    near_tie = ((z * 255) % 1 - 0.5).abs() < 1e-6
    assert differs.sum() <= near_tie.sum()
    assert (differs & ~near_tie).sum() == 0


def test_gates_read_out_bitwidth():
    x = torch.randn(4096)
    clip = torch.tensor(2.0)
    result = ops.bit_sharing_quant(x, clip, torch.tensor([1e9, 1e9]))  # no offset passes
    assert result.gates.tolist() == [0.0, 0.0]
    two_bit = ops.bit_sharing_quant(x, clip, torch.zeros(0), (2,)).output
    assert torch.equal(result.output, two_bit)
    on = ops.bit_sharing_quant(x, clip, torch.tensor([-1.0, -1.0]))
    assert on.gates.tolist() == [1.0, 1.0]


def test_gradients_reach_every_parameter():
    x = torch.randn(5000, requires_grad=True)
    clip = torch.tensor(1.0, requires_grad=True)
    thresholds = torch.tensor([0.05, 0.005], requires_grad=True)
    y = ops.bit_sharing_quant(x, clip, thresholds).output
    (y * torch.randn_like(y)).sum().backward()
    assert clip.grad is not None and clip.grad != 0
    assert (thresholds.grad != 0).all()
    outside = x.detach().abs() > 1
    assert (x.grad[outside] == 0).all() and outside.any()


# ---------------------------------------------------------------------------------------------
# gates from statistics reduced over the shards of a batch (distributed training)

def _shard_results(backend, shards, clip, thresholds, grad_ys, bits, signed):
    """Each shard through the op as one rank of a job whose reducer adds up every shard's
    [residual sums, count]; returns per shard (y, residual_mean, grads)."""
    locals_ = []
    for shard in shards:  # each rank's own statistics (a reducer that records and changes nothing)
        ops.bit_sharing_quant(shard, clip, thresholds, bits, signed, backend=backend,
                              reduce_residual_sums=lambda t: locals_.append(t.clone()) or t)
    total = torch.stack(locals_).sum(0)
    results = []
    for shard, grad_y in zip(shards, grad_ys):
        inputs = [t.detach().clone().requires_grad_() for t in (shard, clip, thresholds)]
        y, mean, _ = ops.bit_sharing_quant(*inputs, bits, signed, backend=backend,
                                           reduce_residual_sums=lambda t: total.clone())
        results.append((y.detach(), mean, torch.autograd.grad(y, inputs, grad_y)))
    return results


@pytest.mark.parametrize("backend", ["reference", "cpu", "simt", "triton", "cuda"])
@pytest.mark.parametrize("signed", [True, False])
def test_reduced_statistics_give_the_whole_batch_op(backend, signed):
    """A batch split in uneven shards, each run with the reduced statistics: the outputs and
    x-gradients are the whole batch's pieces, the means its means, and the clip and threshold
    gradients add up to the whole batch's."""
    device = torch.device("cpu") if backend == "reference" else require_backend(backend)
    bits = (2, 4, 8)
    x, clip, thresholds, grad_y = make_case((5000,), bits, signed, device=device, seed=11)
    cuts = [0, 1200, 5000]  # unequal shards: the reduction weights by element counts
    shards = [x[a:b] for a, b in zip(cuts, cuts[1:])]
    grad_ys = [grad_y[a:b] for a, b in zip(cuts, cuts[1:])]
    whole_y, whole_mean, whole_grads = bit_sharing_run(backend, x, clip, thresholds, grad_y, bits, signed)
    results = _shard_results(backend, shards, clip, thresholds, grad_ys, bits, signed)
    assert torch.equal(torch.cat([y for y, _, _ in results]), whole_y)
    for _, mean, _ in results:
        torch.testing.assert_close(mean, whole_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([g[0] for _, _, g in results]), whole_grads[0])
    for i in (1, 2):  # clip, thresholds
        torch.testing.assert_close(sum(g[i] for _, _, g in results), whole_grads[i], rtol=1e-5, atol=1e-5)


def test_reduced_statistics_change_the_gates():
    """A shard whose own statistics would switch a gate off follows the reduced ones."""
    busy, quiet = torch.rand(1000), torch.rand(3000) * 1e-3  # activations: |r| of ~0 is ~0
    clip, bits = torch.tensor(1.0), (2, 4, 8)
    local = ops.bit_sharing_quant(busy, clip, torch.zeros(2), bits, False).residual_mean
    thresholds = local * 0.5
    assert ops.bit_sharing_quant(busy, clip, thresholds, bits, False).gates.tolist() == [1.0, 1.0]
    [(y, mean, _), _] = _shard_results("reference", [busy, quiet], clip, thresholds, [busy, quiet], bits, False)
    assert (mean < thresholds).all()  # the quiet shard pulls the means under the thresholds
    assert torch.equal(y, ops.bit_sharing_quant(busy, clip, torch.zeros(0), (2,), False).output)  # 2 bits


def test_reducer_gets_sums_and_count_once_and_is_checked():
    x, clip, thresholds = torch.randn(300), torch.tensor(1.0), torch.tensor([0.02, 0.002])
    calls = []
    ops.bit_sharing_quant(x, clip, thresholds, reduce_residual_sums=lambda t: calls.append(t.clone()) or t)
    [local] = calls
    assert local.dtype == torch.float64 and local.shape == (3,) and local[-1] == 300
    _, mean = reference.bit_sharing_quant(x, clip, thresholds, (2, 4, 8), True)
    torch.testing.assert_close((local[:-1] / 300).float(), mean)
    ops.bit_sharing_quant(x, clip, torch.zeros(0), (4,), reduce_residual_sums=calls.append)
    assert len(calls) == 1  # one bitwidth: no gates, nothing to reduce
    with pytest.raises(ValueError, match=r"reduce_residual_sums must return a tensor of shape \(3,\)"):
        ops.bit_sharing_quant(x, clip, thresholds, reduce_residual_sums=lambda t: t[:2])
    with pytest.raises(ValueError, match="reduce_residual_sums must be callable"):
        ops.bit_sharing_quant(x, clip, thresholds, reduce_residual_sums=3)


# ---------------------------------------------------------------------------------------------
# registration: opcheck and torch.compile

@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_opcheck(backend):
    require_backend(backend)
    x, clip, thresholds, _ = make_case((33, 5), (2, 4, 8), True)
    x.requires_grad_()
    clip.requires_grad_(), thresholds.requires_grad_()
    op = custom_op(backend, "bit_sharing_quant").default
    torch.library.opcheck(op, (x, clip, thresholds, [2, 4, 8], True))
    given_mean = torch.tensor([0.1, 0.001])  # the gates of reduced statistics
    torch.library.opcheck(op, (x, clip, thresholds, [2, 4, 8], True, given_mean))
    torch.library.opcheck(custom_op(backend, "bit_sharing_residual_sums").default,
                          (x.detach(), clip.detach(), [2, 4, 8], True))
    x_cl = make_case((2, 3, 4, 5), (2, 4, 8), True)[0].contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(op, (x_cl.requires_grad_(), clip, thresholds, [2, 4, 8], True))


@pytest.mark.parametrize("reduced", [False, True], ids=["local", "reduced"])
def test_torch_compile_fullgraph_matches_eager(reduced):
    require_backend("cpu")
    x, clip, thresholds, grad_y = make_case((64, 9), (2, 4, 8), False)
    # as if a second rank held a batch with the same statistics
    reduce = {"reduce_residual_sums": lambda t: t * 2} if reduced else {}

    def model(x, clip, thresholds):
        return torch.relu(ops.bit_sharing_quant(x, clip, thresholds, signed=False, **reduce).output) * 3

    compiled = torch.compile(model, fullgraph=True)
    eager_in = [t.clone().requires_grad_() for t in (x, clip, thresholds)]
    comp_in = [t.clone().requires_grad_() for t in (x, clip, thresholds)]
    eager_y, comp_y = model(*eager_in), compiled(*comp_in)
    assert torch.equal(eager_y, comp_y)
    for a, b in zip(torch.autograd.grad(eager_y, eager_in, grad_y), torch.autograd.grad(comp_y, comp_in, grad_y)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# bad input

def _args(**overrides):
    args = dict(x=torch.randn(10), clip=torch.tensor(1.0), thresholds=torch.zeros(2), bits=(2, 4, 8))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, message", [
    (dict(clip=torch.tensor(0.0)), ValueError, "clip must be finite and > 0"),
    (dict(clip=torch.tensor(-1.0)), ValueError, "clip must be finite and > 0"),
    (dict(clip=torch.tensor(float("nan"))), ValueError, "clip must be finite and > 0"),
    (dict(clip=torch.tensor([1.0])), ValueError, "clip must be a 0-dim tensor"),
    (dict(clip=1.0), ValueError, "clip must be a torch.Tensor"),
    (dict(thresholds=torch.zeros(3)), ValueError, "thresholds must have shape (2,)"),
    (dict(thresholds=torch.tensor([0.0, float("nan")])), ValueError, "thresholds must be finite"),
    (dict(bits=(4, 2, 8)), ValueError, "bits must be strictly ascending"),
    (dict(bits=(2, 4, 17), thresholds=torch.zeros(2)), ValueError, "int in 1..16"),
    (dict(bits=(0, 4), thresholds=torch.zeros(1)), ValueError, "int in 1..16"),
    (dict(bits=(), thresholds=torch.zeros(0)), ValueError, "bits must hold 1 to 8"),
    (dict(bits=(2.0, 4), thresholds=torch.zeros(1)), ValueError, "int in 1..16"),
    (dict(x=torch.arange(10)), ValueError, "x must be a floating-point tensor"),
    (dict(clip=torch.tensor(1.0, device="meta")), ValueError, "clip is on meta but x is on cpu"),
    (dict(thresholds=torch.zeros(2, dtype=torch.int32)), ValueError, "thresholds must be a floating-point"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_arguments(overrides, error, message, backend):
    if backend != "reference":
        require_backend(backend)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.bit_sharing_quant(**_args(**overrides), backend=backend)


def test_unavailable_or_unknown_backend():
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"):
        ops.bit_sharing_quant(**_args(), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.bit_sharing_quant(**_args(), backend="fast")
    with pytest.raises(ValueError, match="backend 'cpu' supports x of dtype float32"):
        require_backend("cpu")
        ops.bit_sharing_quant(**_args(x=torch.randn(4, dtype=torch.float64)), backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_kernel_ops_check_arguments_in_cpp(backend):
    """Direct torch.ops calls bypass the Python checks; TORCH_CHECK names the argument."""
    require_backend(backend)
    kernel = kernel_op(backend, "bit_sharing_quant_fwd")
    x, clip, thr = torch.randn(8), torch.tensor(1.0), torch.zeros(2)
    with pytest.raises(RuntimeError, match="bits must be strictly ascending"):
        kernel(x, clip, thr, [4, 2, 8], True)
    with pytest.raises(RuntimeError, match="thresholds must have shape"):
        kernel(x, clip, torch.zeros(3), [2, 4, 8], True)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        kernel(x.double(), clip, thr, [2, 4, 8], True)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        kernel(torch.randn(8, 2)[:, 0], clip, thr, [2, 4, 8], True)
    with pytest.raises(RuntimeError, match=r"residual_mean must have shape \[2\]"):
        kernel(x, clip, thr, [2, 4, 8], True, torch.zeros(3))
    with pytest.raises(RuntimeError, match="residual_mean must be float32"):
        kernel(x, clip, thr, [2, 4, 8], True, torch.zeros(2, dtype=torch.float64))
    stats = kernel_op(backend, "bit_sharing_quant_stats")
    with pytest.raises(RuntimeError, match="bits must be strictly ascending"):
        stats(x, clip, [4, 2, 8], True)
    with pytest.raises(RuntimeError, match="clip must be float32"):
        stats(x, clip.double(), [2, 4, 8], True)


# ---------------------------------------------------------------------------------------------
# the asymmetric activation grid: a learnable offset o, zero point z0 = D(clamp(o, 0, 1), b_1)

def asymmetric_case(shape, bits, dtype=torch.float32, device="cpu", seed=0, offset=0.37):
    """make_case's unsigned case (randn: negative values too) with a zero in every 5th element
    (x = 0 must give y = 0), thresholds 50% off the shifted grid's residual means, and the offset."""
    x, clip, thresholds, grad_y = make_case(shape, bits, False, dtype=dtype, seed=seed)
    x = x.clone()
    x.view(-1)[::5] = 0
    z0 = reference.quant.zero_point(torch.tensor(offset), bits[0], torch.float32)
    _, residual_mean = reference.bit_sharing_quant(x, clip, torch.zeros(len(bits) - 1), bits, False, zero_point=z0)
    thresholds = residual_mean * torch.tensor([0.5, 1.5] * 4)[: len(bits) - 1]
    return [t.to(device) for t in (x, clip, thresholds, grad_y, torch.tensor(offset))]


@pytest.mark.parametrize("n", [1, 7, 1023, 40_001])
def test_asymmetric_matches_reference_sizes(kernel_backend, n):
    backend, device = kernel_backend
    x, clip, thresholds, grad_y, offset = asymmetric_case((n,), (2, 4, 8), device=device, seed=n)
    y = assert_bit_sharing_matches(backend, x, clip, thresholds, grad_y, (2, 4, 8), False, offset)
    assert (y.view(-1)[::5] == 0).all()


@pytest.mark.parametrize("bits", BIT_SETS)
@pytest.mark.parametrize("offset", [0.0, 0.25, 0.6, 1.0])
def test_asymmetric_matches_reference_bits(kernel_backend, bits, offset):
    backend, device = kernel_backend
    case = asymmetric_case((37, 3, 3, 5), bits, device=device, seed=len(bits), offset=offset)
    assert_bit_sharing_matches(backend, *case[:4], bits, False, case[4])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_asymmetric_matches_reference_half_types(kernel_backend, dtype):
    backend, device = kernel_backend
    case = asymmetric_case((3001,), (2, 4, 8), dtype=dtype, device=device, seed=3, offset=0.55)
    y = assert_bit_sharing_matches(backend, *case[:4], (2, 4, 8), False, case[4])
    assert (y.view(-1)[::5] == 0).all()


def test_asymmetric_zero_offset_is_the_unsigned_grid(kernel_backend):
    """o = 0 (z0 = 0) gives the old unsigned results: output, means and x, clip, threshold grads."""
    backend, device = kernel_backend
    x, clip, thresholds, grad_y = make_case((1001,), (2, 4, 8), False, device=device, seed=4)
    plain = bit_sharing_run(backend, x, clip, thresholds, grad_y, (2, 4, 8), False)
    shifted = bit_sharing_run(backend, x, clip, thresholds, grad_y, (2, 4, 8), False, torch.tensor(0.0, device=device))
    assert torch.equal(plain[0], shifted[0]) and torch.equal(plain[1], shifted[1])
    for a, b in zip(plain[2], shifted[2][:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", BIT_SETS)
def test_asymmetric_zero_is_exact(kernel_backend, bits):
    """x = 0 (and -0) maps to exactly 0 for every offset, gates on or off: z0 is a level of the
    lowest grid, so every residual is 0. Values of the grid's range come out as themselves."""
    backend, device = kernel_backend
    x = torch.tensor([0.0, -0.0, 0.0, 1e-30], device=device)
    for offset in torch.linspace(-0.5, 1.5, 23):
        for thresholds in (torch.full((len(bits) - 1,), -1.0), torch.full((len(bits) - 1,), 1e9)):
            y = ops.bit_sharing_quant(x, torch.tensor(0.7, device=device), thresholds.to(device), bits, False,
                                      backend=backend, offset=offset.to(device)).output
            assert (y[:3] == 0).all(), (offset, y)


def test_asymmetric_range_and_levels():
    """The grid covers [-z0 v, (1 - z0) v] with 2^b levels: clipped below and above."""
    clip, bits = torch.tensor(2.0), (2,)
    z0 = reference.quant.zero_point(torch.tensor(0.4), 2, torch.float32)
    assert z0.item() == pytest.approx(1 / 3)
    x = torch.linspace(-5, 5, 1001)
    y = ops.bit_sharing_quant(x, clip, torch.zeros(0), bits, False, offset=torch.tensor(0.4)).output
    levels = sorted(set(y.tolist()))
    assert len(levels) == 4 and 0.0 in levels
    assert levels[0] == pytest.approx(-2 / 3) and levels[-1] == pytest.approx(4 / 3)


def test_asymmetric_offset_gradcheck_float64():
    """The offset's gradient (and clip's, x's) in the reference equals finite differences of the
    straight-through surrogate (round frozen as in test_reference_gradcheck_float64); and the
    kernels' closed form dL/dz0 = -v sum(grad_y outside) agrees with it."""
    bits, g = (2, 4, 8), torch.Generator().manual_seed(1)
    x = torch.randn(40, generator=g, dtype=torch.float64)
    x[::7] = 0
    clip = torch.tensor(1.3, dtype=torch.float64)
    thresholds = torch.tensor([0.05, 0.01], dtype=torch.float64)
    offset = torch.tensor(0.41, dtype=torch.float64)
    round_offsets = []
    snap = reference.quant.zero_point(offset, bits[0], torch.float64) - offset

    def record_round(t):
        round_offsets.append((torch.round(t) - t).detach())
        return torch.round(t)

    def run(x, clip, offset, round_fn):
        z0 = offset + snap  # D straight through: its rounding frozen at the point
        return reference.bit_sharing_quant(x, clip, thresholds, bits, False, zero_point=z0, round_fn=round_fn)[0]

    y_real = run(x, clip, offset, record_round)

    def surrogate(x, clip, offset):
        rounds = iter(round_offsets)
        return run(x, clip, offset, lambda t: t + next(rounds))

    inputs = [t.clone().requires_grad_() for t in (x, clip, offset)]
    torch.testing.assert_close(surrogate(*inputs), y_real)
    assert torch.autograd.gradcheck(surrogate, inputs, eps=1e-7, atol=1e-6)
    grad_y = torch.randn(40, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(surrogate(*inputs), inputs, grad_y)
    got_in = [t.clone().requires_grad_() for t in (x, clip, offset)]
    got = torch.autograd.grad(ops.bit_sharing_quant(got_in[0], got_in[1], thresholds, bits, False,
                                                    offset=got_in[2]).output, got_in, grad_y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    z0 = reference.quant.zero_point(offset, bits[0], torch.float64)
    outside = ~((x / clip + z0 > 0) & (x / clip + z0 < 1))
    torch.testing.assert_close(got[2], -clip * grad_y[outside].sum())


@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_asymmetric_opcheck(backend):
    require_backend(backend)
    x, clip, thresholds, _, offset = asymmetric_case((33, 5), (2, 4, 8))
    z0 = reference.quant.zero_point(offset, 2, torch.float32)
    x.requires_grad_()
    clip.requires_grad_(), thresholds.requires_grad_(), z0.requires_grad_()
    op = custom_op(backend, "bit_sharing_quant").default
    torch.library.opcheck(op, (x, clip, thresholds, [2, 4, 8], False, None, z0))
    torch.library.opcheck(op, (x, clip, thresholds, [2, 4, 8], False, torch.tensor([0.1, 0.001]), z0))
    torch.library.opcheck(custom_op(backend, "bit_sharing_residual_sums").default,
                          (x.detach(), clip.detach(), [2, 4, 8], False, z0.detach()))


def test_asymmetric_torch_compile_fullgraph_matches_eager():
    require_backend("cpu")
    x, clip, thresholds, grad_y, offset = asymmetric_case((64, 9), (2, 4, 8))

    def model(x, clip, thresholds, offset):
        return ops.bit_sharing_quant(x, clip, thresholds, signed=False, offset=offset).output * 3

    compiled = torch.compile(model, fullgraph=True)
    eager_in = [t.clone().requires_grad_() for t in (x, clip, thresholds, offset)]
    comp_in = [t.clone().requires_grad_() for t in (x, clip, thresholds, offset)]
    eager_y, comp_y = model(*eager_in), compiled(*comp_in)
    assert torch.equal(eager_y, comp_y)
    for a, b in zip(torch.autograd.grad(eager_y, eager_in, grad_y), torch.autograd.grad(comp_y, comp_in, grad_y)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_asymmetric_reduced_statistics(backend):
    """Shards with reduced statistics give the whole batch's output under the asymmetric grid."""
    device = torch.device("cpu") if backend == "reference" else require_backend(backend)
    x, clip, thresholds, grad_y, offset = asymmetric_case((3000,), (2, 4, 8), device=device, seed=12)
    whole = ops.bit_sharing_quant(x, clip, thresholds, (2, 4, 8), False, backend=backend, offset=offset)
    shards, sums = [x[:1000], x[1000:]], []
    for shard in shards:
        ops.bit_sharing_quant(shard, clip, thresholds, (2, 4, 8), False, backend=backend, offset=offset,
                              reduce_residual_sums=lambda t: sums.append(t.clone()) or t)
    total = torch.stack(sums).sum(0)
    ys = [ops.bit_sharing_quant(s, clip, thresholds, (2, 4, 8), False, backend=backend, offset=offset,
                                reduce_residual_sums=lambda t: total.clone()).output for s in shards]
    assert torch.equal(torch.cat(ys), whole.output)


@pytest.mark.parametrize("overrides, message", [
    (dict(offset=torch.tensor(float("nan"))), "offset must be finite"),
    (dict(offset=torch.tensor(float("inf"))), "offset must be finite"),
    (dict(offset=torch.tensor([0.5])), "offset must be a 0-dim tensor"),
    (dict(offset=0.5), "offset must be a torch.Tensor"),
    (dict(offset=torch.tensor(1)), "offset must be a floating-point tensor"),
    (dict(offset=torch.tensor(0.5), signed=True), "offset (the asymmetric grid) needs signed=False"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_asymmetric_bad_offsets(overrides, message, backend):
    if backend != "reference":
        require_backend(backend)
    args = {**_args(), "signed": False, **overrides}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.bit_sharing_quant(**args, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "simt"])
def test_kernel_ops_check_zero_point_in_cpp(backend):
    require_backend(backend)
    x, clip, thr = torch.randn(8), torch.tensor(1.0), torch.zeros(2)
    fwd, bwd = kernel_op(backend, "bit_sharing_quant_fwd"), kernel_op(backend, "bit_sharing_quant_bwd")
    stats = kernel_op(backend, "bit_sharing_quant_stats")
    with pytest.raises(RuntimeError, match="zero_point must be finite and in"):
        fwd(x, clip, thr, [2, 4, 8], False, None, torch.tensor(1.5))
    with pytest.raises(RuntimeError, match="zero_point must be finite and in"):
        stats(x, clip, [2, 4, 8], False, torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="zero_point is only for the unsigned grid"):
        bwd(x, x, clip, thr, [2, 4, 8], True, torch.tensor(0.5))
    with pytest.raises(RuntimeError, match="zero_point must be float32"):
        fwd(x, clip, thr, [2, 4, 8], False, None, torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="zero_point must have shape"):
        fwd(x, clip, thr, [2, 4, 8], False, None, torch.tensor([0.5]))


@pytest.mark.parametrize("grid", ["signed", "unsigned", "asymmetric"])
@pytest.mark.parametrize("dtype, layout", [(torch.float32, "contiguous"), (torch.float32, "strided"),
                                           (torch.float32, "channels_last"), (torch.float16, "strided"),
                                           (torch.bfloat16, "channels_last")])
def test_fixed_quant_is_the_op_at_one_bitwidth(kernel_backend, grid, dtype, layout):
    """fixed_quant on a grid checked once gives bit_sharing_quant's output bit for bit (and its
    gradient to x), on every backend, in x's layout."""
    from mixedprec.backends.reference.quant import zero_point
    from mixedprec.ops.bit_sharing_quant import fixed_grid, fixed_quant
    backend, device = kernel_backend
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(2, 3, 5, 8, generator=g) * 2).to(dtype)
    x = {"contiguous": x, "strided": x[:, :, :, ::2],
         "channels_last": x.contiguous(memory_format=torch.channels_last)}[layout].to(device)
    if grid == "unsigned":
        x = x.relu()
    clip, offset = torch.tensor(1.7, device=device), torch.tensor(0.3, device=device)
    signed = grid == "signed"
    for bits in (1, 3, 8):
        options = {"offset": offset} if grid == "asymmetric" else {}
        z0 = zero_point(offset, bits, torch.float32) if grid == "asymmetric" else None
        fixed = fixed_grid(clip, bits, signed, z0)
        want = ops.bit_sharing_quant(x, clip, clip.new_empty(0), (bits,), signed, backend=backend, **options).output
        with torch.no_grad():
            y = fixed_quant(x, fixed, backend=backend)
        assert torch.equal(y, want) and y.dtype == dtype and y.stride() == want.stride()
        tracked = x.detach().requires_grad_()
        fixed_quant(tracked, fixed, backend=backend).sum().backward()
        reference_x = x.detach().requires_grad_()
        ops.bit_sharing_quant(reference_x, clip, clip.new_empty(0), (bits,), signed, backend=backend,
                              **options).output.sum().backward()
        assert torch.equal(tracked.grad, reference_x.grad)


def test_fixed_grid_and_fixed_quant_check_their_arguments():
    from mixedprec.ops.bit_sharing_quant import fixed_grid, fixed_quant
    clip = torch.tensor(1.0)
    for args, message in [((float("nan"), 4, True), "clip must be finite"), ((0.0, 4, True), "clip must be finite"),
                          ((1.0, 0, True), "bits"), ((1.0, 4, 1), "signed must be a bool")]:
        with pytest.raises(ValueError, match=message):
            fixed_grid(torch.tensor(args[0]), *args[1:])
    with pytest.raises(ValueError, match="clip must be a 0-dim tensor"):
        fixed_grid(torch.ones(1), 4, True)
    with pytest.raises(ValueError, match="zero_point must be finite"):
        fixed_grid(clip, 4, False, torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="zero_point must be a 0-dim tensor of an unsigned grid"):
        fixed_grid(clip, 4, True, torch.tensor(0.25))
    grid = fixed_grid(clip.requires_grad_(), 4, True)
    assert not grid.clip.requires_grad and grid.clip.dtype == torch.float32
    with torch.inference_mode():  # made there, used with autograd: its tensors are normal ones
        made = fixed_grid(torch.tensor(1.0), 4, False, torch.tensor(0.25))
    tracked = torch.randn(5, requires_grad=True)
    fixed_quant(tracked, made).sum().backward()
    assert tracked.grad is not None
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        fixed_quant(torch.ones(3, dtype=torch.float64), grid)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        fixed_quant(torch.ones(3, dtype=torch.int32), grid)
    with pytest.raises(ValueError, match="x is on meta but the grid is on cpu"):
        fixed_quant(torch.ones(3, device="meta"), grid)
