"""The Python face of every op.

Flow of one call, e.g. ``bit_sharing_quant``:

    mixedprec.ops.bit_sharing_quant(...)          checks arguments, picks the backend
    -> reference.py                               backend "reference": a differentiable composite
    -> torch.ops.mixedprec.bit_sharing_quant      other backends: custom op with fake impl and one
                                                  autograd registration, routing on `backend` to
       torch.ops.mixedprec.*_fwd/_bwd             C++ kernel ops (CPU or CUDA by the tensor's device),
       torch.ops.mixedprec_simt.*_fwd/_bwd        the CUDA sources run under SIMT emulation (the
                                                  test-only library mixedprec._simt), or
       mixedprec.triton.*                         the Triton kernels.

The routing custom ops are defined here (not in C++) so that the package imports and the
reference backend works when the compiled library is missing; the kernel ops' schemas live in
csrc/ops/<op>/<op>_glue.cpp next to their kernels.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from mixedprec import _extension, reference

BACKENDS = ("reference", "cpu", "cuda", "triton", "simt")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CANDIDATE_BITS = 8

# Checking clip/threshold values reads them on the host: one device sync per call on CUDA.
# Long GPU runs whose parameters are known to be valid may turn it off.
check_values = True


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if _backend_usable(b, device)]


def _backend_usable(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu" and _extension.CPU_BUILT
    if backend == "cuda":
        return device.type == "cuda" and _extension.CUDA_BUILT
    if backend == "simt":
        return device.type == "cpu" and _extension.SIMT_BUILT
    if backend == "triton":
        return _extension.triton_usable(device)
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def resolve_backend(op: str, backend: str | None, x: Tensor) -> str:
    """The backend that runs ``op`` for ``x``: the one asked for, or the fastest available."""
    device = x.device
    if backend is None:
        if x.dtype not in KERNEL_DTYPES:
            return "reference"
        preferred = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        return next((b for b in preferred if _backend_usable(b, device)), "reference")
    if not _backend_usable(backend, device):
        raise RuntimeError(f"{op}: {_extension.missing_reason(backend, device)}")
    if backend != "reference" and x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{op}: backend {backend!r} supports x of dtype float32, float16 or "
                         f"bfloat16, got {x.dtype}; use backend='reference' for {x.dtype}")
    return backend


def kernels_built(kernel_ops: dict[str, tuple[str, str]]) -> dict[str, bool]:
    """Per backend, whether this build registered an op's kernel: ``kernel_ops`` maps "cpu",
    "cuda", "simt" to (kernel op name, dispatch key); reference and triton always exist. The simt
    kernels are the same op names in namespace mixedprec_simt. Computed once at import, so that
    torch.compile sees constants."""
    def built(b):
        namespace = "mixedprec_simt" if b == "simt" else "mixedprec"
        return (hasattr(getattr(torch.ops, namespace), kernel_ops[b][0])
                and _extension._has_kernel(*kernel_ops[b], namespace=namespace))
    return {b: b not in kernel_ops or built(b) for b in BACKENDS}


def resolve_op_backend(op: str, backend: str | None, x: Tensor, built: dict[str, bool]) -> str:
    """resolve_backend, then the reference where the chosen backend lacks this op's kernel
    (only when no backend was asked for: an explicit request that cannot be met is an error)."""
    resolved = resolve_backend(op, backend, x)
    if built[resolved]:
        return resolved
    if backend is None:
        return "reference"
    raise RuntimeError(f"{op}: backend {backend!r} has no {op} kernel in this build; rebuild mixedprec._C, "
                       f"or use backend='reference' (or None to pick what is available)")


# ---------------------------------------------------------------------------------------------
# argument checks shared by the ops

def _through_autograd(*tensors: Tensor | None) -> bool:
    """Whether an inference op (lowbit_linear, lut_conv2d) must go through its registered custom op:
    under torch.compile, which traces it, or when a gradient can flow. Otherwise the kernel is
    called directly: the custom op's Python dispatch costs ~40 us a call, 10% of a 4096^2 GEMV."""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _check_tensor(op: str, name: str, t, device: torch.device | None = None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")


def _check_bits(op: str, bits) -> tuple[int, ...]:
    try:
        bits = tuple(bits)
    except TypeError:
        raise ValueError(f"{op}: bits must be a sequence of ints, got {bits!r}") from None
    if not bits or len(bits) > MAX_CANDIDATE_BITS:
        raise ValueError(f"{op}: bits must hold 1 to {MAX_CANDIDATE_BITS} bitwidths, got {bits!r}")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
            raise ValueError(f"{op}: every entry of bits must be an int in 1..16, got {bits!r}")
    if any(b1 >= b2 for b1, b2 in zip(bits, bits[1:])):
        raise ValueError(f"{op}: bits must be strictly ascending, got {bits!r}")
    return bits


def _check_clip(op: str, clip: Tensor) -> None:
    """clip v > 0, finite and not subnormal: the ops compute x * (1 / v), and 1 / v overflows for
    v < 2^-128 (0 * inf would make x = 0 NaN)."""
    smallest = torch.finfo(torch.float32).smallest_normal
    if check_values and not clip.is_meta and not bool(torch.isfinite(clip) & (clip >= smallest)):
        raise ValueError(f"{op}: clip must be finite and > 0 (at least float32's smallest normal number, "
                         f"{smallest:.4g}), got {clip.item()}")


def _check_finite(op: str, name: str, t: Tensor) -> None:
    if check_values and not t.is_meta and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} must be finite, got {t.detach().cpu().tolist()}")


# ---------------------------------------------------------------------------------------------
# bit_sharing_quant

class BitSharingResult(NamedTuple):
    output: Tensor         # y, same shape and dtype as x
    residual_mean: Tensor  # a_2..a_K = mean|r_j| over the tensor, float32 (K-1,), no grad
    gates: Tensor          # hard gates 1[a_j > alpha_j], float32 (K-1,), no grad


# Gets float64 [sum|r_2|, ..., sum|r_K|, element count] of this call's x and returns the same
# layout summed over every participant (e.g. an all_reduce over the ranks of a data-parallel job).
ResidualSumsReducer = Callable[[Tensor], Tensor]


def bit_sharing_quant(
    x: Tensor,
    clip: Tensor,
    thresholds: Tensor,
    bits: Sequence[int] = (2, 4, 8),
    signed: bool = True,
    *,
    backend: str | None = None,
    reduce_residual_sums: ResidualSumsReducer | None = None,
) -> BitSharingResult:
    """SBS bit-sharing fake-quant (DESIGN.md): lowest-bit base plus gated re-assignment offsets.

    x: float tensor of any shape (weights: signed=True; activations after ReLU: signed=False).
    clip: 0-dim float tensor v > 0 (finite, at least float32's smallest normal), learnable.
    thresholds: (len(bits)-1,) finite gate thresholds alpha.
    Gradients: straight-through to x inside [-v, v] (or [0, v]), LSQ-style to clip, and the
    sigmoid straight-through estimate to every threshold.

    reduce_residual_sums: makes the gates global over a batch split across processes. The op
    then runs in two passes: the residual sums of x with its element count go through this
    callable (one call, a float64 tensor of len(bits) values; see ``ResidualSumsReducer``), and
    y is computed with the gates of the reduced means, which ``residual_mean`` returns and the
    thresholds' gradient uses. Not called when len(bits) == 1 (there are no gates).
    Non-finite x: +-inf is clipped like any large value; a NaN gives NaN at its position only
    (the residual means, and so the gradients of clip and thresholds, are NaN; the gates are off).
    """
    op = "bit_sharing_quant"
    _check_tensor(op, "x", x)
    _check_tensor(op, "clip", clip, x.device)
    _check_tensor(op, "thresholds", thresholds, x.device)
    bits = _check_bits(op, bits)
    if clip.dim() != 0:
        raise ValueError(f"{op}: clip must be a 0-dim tensor, got shape {tuple(clip.shape)}")
    if tuple(thresholds.shape) != (len(bits) - 1,):
        raise ValueError(f"{op}: thresholds must have shape ({len(bits) - 1},) for bits={bits}, "
                         f"got {tuple(thresholds.shape)}")
    if not isinstance(signed, bool):
        raise ValueError(f"{op}: signed must be a bool, got {signed!r}")
    if reduce_residual_sums is not None and not callable(reduce_residual_sums):
        raise ValueError(f"{op}: reduce_residual_sums must be callable or None, got {reduce_residual_sums!r}")
    backend = resolve_backend(op, backend, x)
    if backend == "reference" and not torch.compiler.is_compiling():
        _check_values(clip, thresholds)
    residual_mean = None
    if reduce_residual_sums is not None and len(bits) > 1:
        residual_mean = _reduced_residual_mean(x, clip, bits, signed, backend, reduce_residual_sums)
    if backend == "reference":  # a differentiable composite: torch's autograd is its backward
        y, residual_mean = reference.bit_sharing_quant(x, clip, thresholds, bits, signed, residual_mean=residual_mean)
    else:  # kernels take float32 parameters; the cast is differentiable
        y, residual_mean = torch.ops.mixedprec.bit_sharing_quant(
            x, clip.float(), thresholds.float(), list(bits), signed, backend, residual_mean)
    gates = (residual_mean > thresholds.detach()).float()
    return BitSharingResult(y, residual_mean, gates)


def _reduced_residual_mean(x: Tensor, clip: Tensor, bits: tuple[int, ...], signed: bool, backend: str,
                           reduce: ResidualSumsReducer) -> Tensor:
    """float32 (K-1,) residual means over everything ``reduce`` adds up (no autograd: the
    gates' statistic carries no gradient)."""
    x, clip = x.detach(), clip.detach()
    if backend == "reference":
        sums = reference.bit_sharing_residual_sums(x, clip, bits, signed)
    else:
        sums = torch.ops.mixedprec.bit_sharing_residual_sums(x, clip.float(), list(bits), signed, backend)
    local = torch.cat([sums, sums.new_full((1,), x.numel())])
    total = reduce(local)
    if not isinstance(total, Tensor) or total.shape != local.shape:
        raise ValueError(f"bit_sharing_quant: reduce_residual_sums must return a tensor of shape "
                         f"{tuple(local.shape)}, got {total if not isinstance(total, Tensor) else tuple(total.shape)}")
    return (total[:-1] / total[-1]).float()


class _Kernels(NamedTuple):
    forward: Callable
    backward: Callable
    residual_sums: Callable | None = None  # bit_sharing_quant only


def _check_values(clip: Tensor, thresholds: Tensor) -> None:
    _check_clip("bit_sharing_quant", clip)
    _check_finite("bit_sharing_quant", "thresholds", thresholds)


def _bit_sharing_kernels(backend: str) -> _Kernels:
    mp = torch.ops.mixedprec
    if backend in ("cpu", "cuda"):  # one op, dispatched on the tensors' device
        return _Kernels(mp.bit_sharing_quant_fwd, mp.bit_sharing_quant_bwd, mp.bit_sharing_quant_stats)
    if backend == "simt":
        simt = torch.ops.mixedprec_simt
        return _Kernels(simt.bit_sharing_quant_fwd, simt.bit_sharing_quant_bwd, simt.bit_sharing_quant_stats)
    if backend == "triton":
        from mixedprec.triton import bit_sharing
        return _Kernels(bit_sharing.forward, bit_sharing.backward, bit_sharing.residual_sums)
    raise ValueError(f"bit_sharing_quant: unknown backend {backend!r}")


@torch.library.custom_op("mixedprec::bit_sharing_quant", mutates_args=())
def _bit_sharing_quant(x: Tensor, clip: Tensor, thresholds: Tensor, bits: list[int], signed: bool,
                       backend: str, residual_mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    _check_values(clip, thresholds)
    return _bit_sharing_kernels(backend).forward(x.contiguous(), clip, thresholds, bits, signed, residual_mean)


@_bit_sharing_quant.register_fake
def _(x, clip, thresholds, bits, signed, backend, residual_mean=None):  # kernels return contiguous outputs
    return x.new_empty(x.shape), x.new_empty(len(bits) - 1, dtype=torch.float32)


@torch.library.custom_op("mixedprec::bit_sharing_residual_sums", mutates_args=())
def _bit_sharing_residual_sums(x: Tensor, clip: Tensor, bits: list[int], signed: bool, backend: str) -> Tensor:
    # clip is checked by the forward that follows (one host read per call, not two)
    return _bit_sharing_kernels(backend).residual_sums(x.contiguous(), clip, bits, signed)


@_bit_sharing_residual_sums.register_fake
def _(x, clip, bits, signed, backend):
    return x.new_empty(len(bits) - 1, dtype=torch.float64)


@torch.library.custom_op("mixedprec::bit_sharing_quant_backward", mutates_args=())
def _bit_sharing_quant_backward(grad_y: Tensor, x: Tensor, clip: Tensor, thresholds: Tensor,
                                residual_mean: Tensor, bits: list[int], signed: bool,
                                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    gates = (residual_mean > thresholds).float()
    grad_x, sums = _bit_sharing_kernels(backend).backward(grad_y.contiguous(), x.contiguous(), clip, gates,
                                                         bits, signed)
    return grad_x, sums[0].to(clip.dtype), _threshold_grad(sums[1:], residual_mean, thresholds, gates, clip, signed)


def _threshold_grad(tail_sums: Tensor, residual_mean: Tensor, thresholds: Tensor, gates: Tensor,
                    clip: Tensor, signed: bool) -> Tensor:
    """dL/d alpha_j = -sigmoid'(a_j - alpha_j) * dy/dz_hat * prod_{i<j} g_i * sum(grad_y * T_j).

    T_j = e_j + g_{j+1} T_{j+1} is the gated tail that gate j switches on; the kernels return
    sum(grad_y * T_j) so that this epilogue (K-1 scalars) is written once for every backend.
    """
    s = torch.sigmoid(residual_mean - thresholds)
    outer_gates = torch.cat([gates.new_ones(1), gates[:-1]]).cumprod(0)
    dy_dzhat = 2.0 * clip if signed else clip
    return (-s * (1 - s) * dy_dzhat * outer_gates * tail_sums).to(thresholds.dtype)


@_bit_sharing_quant_backward.register_fake
def _(grad_y, x, clip, thresholds, residual_mean, bits, signed, backend):
    return x.new_empty(x.shape), torch.empty_like(clip), torch.empty_like(thresholds)


def _bit_sharing_setup_context(ctx, inputs, output):
    x, clip, thresholds, bits, signed, backend, _given_mean = inputs
    ctx.save_for_backward(x, clip, thresholds, output[1])
    ctx.bits, ctx.signed, ctx.backend = bits, signed, backend


def _bit_sharing_backward(ctx, grad_y, _grad_residual_mean):
    x, clip, thresholds, residual_mean = ctx.saved_tensors
    grad_x, grad_clip, grad_thresholds = torch.ops.mixedprec.bit_sharing_quant_backward(
        grad_y, x, clip, thresholds, residual_mean, ctx.bits, ctx.signed, ctx.backend)
    return grad_x, grad_clip, grad_thresholds, None, None, None, None


_bit_sharing_quant.register_autograd(_bit_sharing_backward, setup_context=_bit_sharing_setup_context)


# ---------------------------------------------------------------------------------------------
# codebook_quant (OPQ)

MAX_CODEBOOK_SIZE = 256  # 8-bit codes

# Kernel ops a backend needs before codebook_quant may use it: (op name, dispatch key). The
# Triton backend needs the module mixedprec.triton.codebook with a ``forward``.
_CODEBOOK_KERNEL_OPS = {
    "cpu": ("codebook_quant_fwd", "CPU"),
    "cuda": ("codebook_quant_fwd", "CUDA"),
    "simt": ("codebook_quant_fwd", "CPU"),
}
_CODEBOOK_KERNEL_BUILT = kernels_built(_CODEBOOK_KERNEL_OPS)


def codebook_quant(
    weight: Tensor,
    codebook: Tensor,
    channel_scale: Tensor,
    keep_mask: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """OPQ fake-quant: masked nearest-level quantization to a shared codebook, per-channel scale.

    weight: float tensor (C, ...), dim 0 the output channels (conv (C, C_in/g, kh, kw), linear
        (C, in)); float32, float16 or bfloat16 for the kernels, float64 too for the reference.
    codebook: 1-D float tensor of 1..256 finite values in strictly ascending order (the layer's
        levels in channel-normalized units, shared by all channels).
    channel_scale: float tensor (C,), finite and > 0.
    keep_mask: bool tensor of weight's shape; False marks a pruned weight.

    Output (same shape and dtype as weight), computed in float32 (float64 for float64 weights)
    with codebook and channel_scale first cast to that dtype:
        z       = weight[c, i] * (1 / channel_scale[c])        the reciprocal rounded first
        m_j     = (codebook[j] + codebook[j + 1]) * 0.5        j = 0 .. L-2, rounded midpoints
        j*      = #{j : m_j < z}                                a z exactly equal to m_j goes to
                                                                the LOWER level j
        y[c, i] = channel_scale[c] * codebook[j*]  if keep_mask[c, i]  else 0
    then rounded to weight's dtype. z below every midpoint takes level 0, above all of them the
    last level (no clipping error is special). A NaN or +-inf weight at a kept position gives NaN;
    a pruned position gives 0 whatever its weight.

    Gradient: straight-through to the latent weight at kept positions (d y / d weight = 1, no
    clipping), exactly 0 at pruned positions; none to codebook, channel_scale or keep_mask (OPQ
    keeps them frozen).
    """
    op = "codebook_quant"
    _check_tensor(op, "weight", weight)
    _check_tensor(op, "codebook", codebook, weight.device)
    _check_tensor(op, "channel_scale", channel_scale, weight.device)
    if weight.dim() == 0:
        raise ValueError(f"{op}: weight must have an output-channel dim 0, got a 0-dim tensor")
    if codebook.dim() != 1 or not 1 <= codebook.numel() <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"{op}: codebook must be 1-D with 1 to {MAX_CODEBOOK_SIZE} levels, "
                         f"got shape {tuple(codebook.shape)}")
    if tuple(channel_scale.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: channel_scale must have shape ({weight.shape[0]},) (one per output "
                         f"channel of weight {tuple(weight.shape)}), got {tuple(channel_scale.shape)}")
    if not isinstance(keep_mask, Tensor) or keep_mask.dtype != torch.bool:
        raise ValueError(f"{op}: keep_mask must be a bool tensor, got "
                         f"{keep_mask.dtype if isinstance(keep_mask, Tensor) else type(keep_mask).__name__}")
    if keep_mask.shape != weight.shape or keep_mask.device != weight.device:
        raise ValueError(f"{op}: keep_mask must have weight's shape {tuple(weight.shape)} on {weight.device}, "
                         f"got {tuple(keep_mask.shape)} on {keep_mask.device}")
    backend = resolve_op_backend(op, backend, weight, _CODEBOOK_KERNEL_BUILT)
    if backend == "reference":
        if not torch.compiler.is_compiling():
            _check_codebook_values(codebook, channel_scale)
        return reference.codebook_quant(weight, codebook, channel_scale, keep_mask)
    return torch.ops.mixedprec.codebook_quant(weight, codebook.float(), channel_scale.float(), keep_mask, backend)


def _check_codebook_values(codebook: Tensor, channel_scale: Tensor) -> None:
    if not check_values or codebook.is_meta:  # meta tensors (shape inference) hold no values
        return
    from mixedprec.formats import check_entries

    op = "codebook_quant"
    check_entries(op, "codebook", codebook, positive=False)
    steps = codebook[1:] - codebook[:-1]
    if not bool((steps > 0).all()):
        j = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(f"{op}: codebook must be strictly ascending, but codebook[{j}] = "
                         f"{codebook[j].item()} >= codebook[{j + 1}] = {codebook[j + 1].item()}")
    check_entries(op, "channel_scale", channel_scale, positive=True)


def _codebook_kernel(backend: str) -> Callable:
    """The forward kernel (weight, codebook, channel_scale, keep_mask) -> y of a backend.

    'reference' runs the composite inside the custom op: it is the contract the kernels are
    checked against, and lets the tests check the op's fake, autograd and compile plumbing.
    """
    if backend == "reference":
        return reference.codebook_quant
    if backend == "triton":
        from mixedprec.triton import codebook
        return codebook.forward
    return getattr(torch.ops.mixedprec, _CODEBOOK_KERNEL_OPS[backend][0])


@torch.library.custom_op("mixedprec::codebook_quant", mutates_args=())
def _codebook_quant(weight: Tensor, codebook: Tensor, channel_scale: Tensor, keep_mask: Tensor,
                    backend: str) -> Tensor:
    _check_codebook_values(codebook, channel_scale)
    return _codebook_kernel(backend)(weight.contiguous(), codebook.contiguous(), channel_scale.contiguous(),
                                     keep_mask.contiguous())


@_codebook_quant.register_fake
def _(weight, codebook, channel_scale, keep_mask, backend):  # kernels return contiguous outputs
    return weight.new_empty(weight.shape)


def _codebook_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[3])


def _codebook_backward(ctx, grad_y):
    # Straight-through at kept positions, zero at pruned ones: one elementwise select that any
    # device runs, so no backward kernel is needed.
    (keep_mask,) = ctx.saved_tensors
    return torch.where(keep_mask, grad_y, torch.zeros((), dtype=grad_y.dtype, device=grad_y.device)), None, None, None, None


_codebook_quant.register_autograd(_codebook_backward, setup_context=_codebook_setup_context)


# ---------------------------------------------------------------------------------------------
# lowbit_linear (packed low-bit weights, mixedprec/formats.py)

_LOWBIT_KERNEL_OPS = {
    "cpu": ("lowbit_linear_fwd", "CPU"),
    "cuda": ("lowbit_linear_fwd", "CUDA"),
    "simt": ("lowbit_linear_fwd", "CPU"),
}
_LOWBIT_KERNEL_BUILT = kernels_built(_LOWBIT_KERNEL_OPS)


def lowbit_linear(x: Tensor, packed, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """y = x W^T + bias with W (out, in) decoded from ``packed`` inside the kernel, never materialized.

    x: float tensor (..., in), float32/float16/bfloat16 (float64 with backend='reference'), any
    strides. packed: a 2-D ``formats.PackedWeight`` on x's device. bias: None or a float (out,).
    Kernels compute in float32 (W[c, i] = float(channel_scale[c]) * float(codebook[code])) and
    return x's dtype. Gradients reach x (grad_y W, through the codebook, no materialized W) and
    bias; none reach the packed tensors. A NaN or inf in a row of x makes that row's outputs NaN or
    inf (pruned and zero weights multiply too: inf * 0 = NaN), as in x @ W.T.
    """
    from mixedprec.formats import PackedWeight

    op = "lowbit_linear"
    _check_tensor(op, "x", x)
    if not isinstance(packed, PackedWeight):
        raise ValueError(f"{op}: packed must be a mixedprec.formats.PackedWeight, got {type(packed).__name__}")
    if len(packed.shape) != 2:
        raise ValueError(f"{op}: packed must hold a 2-D (out, in) weight, got shape {packed.shape}")
    return packed_linear(x, packed.codebook, packed.channel_scale, packed.codes, packed.keep_bitmap,
                         packed.code_offsets, packed.shape, packed.bits, bias,
                         backend=backend)


def packed_linear(x: Tensor, codebook: Tensor, channel_scale: Tensor, codes: Tensor, keep_bitmap: Tensor | None,
                  code_offsets: Tensor | None, shape: Sequence[int], bits: int,
                  bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """lowbit_linear on a PackedWeight's tensors (already validated, e.g. the buffers of
    ``mixedprec.nn.PackedLinear``): skips rebuilding the PackedWeight on every call."""
    op = "lowbit_linear"
    out_features, in_features = shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x must have last dim {in_features} (the weight's in features), got shape {tuple(x.shape)}")
    if codes.device != x.device:
        raise ValueError(f"{op}: packed is on {codes.device} but x is on {x.device}")
    if bias is not None:
        _check_tensor(op, "bias", bias, x.device)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"{op}: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    backend = resolve_op_backend("lowbit_linear", backend, x, _LOWBIT_KERNEL_BUILT)
    if backend == "reference":
        from mixedprec.formats import PackedWeight
        return reference.lowbit_linear(x, PackedWeight(tuple(shape), bits, codebook, channel_scale, codes, keep_bitmap),
                                       bias)
    op_fn = torch.ops.mixedprec.lowbit_linear if _through_autograd(x) else _lowbit_linear_forward
    y = op_fn(x, codebook, channel_scale, codes, keep_bitmap, code_offsets, in_features, bits, backend)
    return y if bias is None else y + bias.to(y.dtype)


def _lowbit_kernels(backend: str) -> _Kernels:
    if backend == "triton":
        from mixedprec.triton import lowbit_linear
        return _Kernels(lowbit_linear.forward, lowbit_linear.backward)
    if backend == "simt":
        return _Kernels(torch.ops.mixedprec_simt.lowbit_linear_fwd, torch.ops.mixedprec_simt.lowbit_linear_bwd)
    return _Kernels(torch.ops.mixedprec.lowbit_linear_fwd, torch.ops.mixedprec.lowbit_linear_bwd)


def _lowbit_call(kernel: Callable, t: Tensor, codebook, channel_scale, codes, keep_bitmap, code_offsets,
                 in_features: int, bits: int) -> Tensor:
    """Runs a kernel on t flattened to (M, features) float32; kernels take float32 tables."""
    flat = t.reshape(-1, t.shape[-1]).to(torch.float32).contiguous()
    return kernel(flat, codes, codebook.to(torch.float32), channel_scale.to(torch.float32), keep_bitmap, code_offsets,
                  [channel_scale.shape[0], in_features], bits)


def _lowbit_linear_forward(x: Tensor, codebook: Tensor, channel_scale: Tensor, codes: Tensor,
                           keep_bitmap: Tensor | None, code_offsets: Tensor | None,
                           in_features: int, bits: int, backend: str) -> Tensor:
    y = _lowbit_call(_lowbit_kernels(backend).forward, x, codebook, channel_scale, codes, keep_bitmap,
                     code_offsets, in_features, bits)
    return y.reshape(*x.shape[:-1], channel_scale.shape[0]).to(x.dtype)


_lowbit_linear = torch.library.custom_op("mixedprec::lowbit_linear", mutates_args=())(_lowbit_linear_forward)


@_lowbit_linear.register_fake
def _(x, codebook, channel_scale, codes, keep_bitmap, code_offsets, in_features, bits, backend):
    return x.new_empty(*x.shape[:-1], channel_scale.shape[0])


@torch.library.custom_op("mixedprec::lowbit_linear_backward", mutates_args=())
def _lowbit_linear_backward(grad_y: Tensor, codebook: Tensor, channel_scale: Tensor, codes: Tensor,
                            keep_bitmap: Tensor | None, code_offsets: Tensor | None,
                            in_features: int, bits: int, backend: str) -> Tensor:
    grad_x = _lowbit_call(_lowbit_kernels(backend).backward, grad_y, codebook, channel_scale, codes, keep_bitmap,
                          code_offsets, in_features, bits)
    return grad_x.reshape(*grad_y.shape[:-1], in_features).to(grad_y.dtype)


@_lowbit_linear_backward.register_fake
def _(grad_y, codebook, channel_scale, codes, keep_bitmap, code_offsets, in_features, bits, backend):
    return grad_y.new_empty(*grad_y.shape[:-1], in_features)


def _lowbit_setup_context(ctx, inputs, output):
    x, *packed, in_features, bits, backend = inputs
    ctx.save_for_backward(*packed)  # the packed tensors only: x is not needed for grad_x
    ctx.in_features, ctx.bits, ctx.backend = in_features, bits, backend


def _lowbit_backward(ctx, grad_y):
    grad_x = torch.ops.mixedprec.lowbit_linear_backward(grad_y, *ctx.saved_tensors, ctx.in_features, ctx.bits, ctx.backend)
    return (grad_x,) + (None,) * 8


_lowbit_linear.register_autograd(_lowbit_backward, setup_context=_lowbit_setup_context)


def set_cpu_simd(enabled: bool) -> bool:
    """Selects the CPU kernels' (lowbit_linear, lut_conv2d) AVX-512 code decode (True, default)
    or its scalar twin; returns the previous setting (for tests and benchmarks)."""
    return torch.ops.mixedprec.set_cpu_simd(bool(enabled))


def set_cpu_winograd(enabled: bool) -> bool:
    """Selects whether lut_conv2d's CPU kernel computes 3x3, stride-1, single-group convolutions
    through Winograd F(2x2, 3x3) (True, default: 2.25x fewer multiplies) or directly, as it does
    every other geometry; returns the previous setting. Winograd's float32 error grows with the
    magnitudes in each 4x4 input tile rather than with sum |x w|: 1.2-4x conv2d's on ResNet-18's
    layers, more next to outliers that meet pruned weights (docs/kernels.md)."""
    return torch.ops.mixedprec.set_cpu_winograd(bool(enabled))


# ---------------------------------------------------------------------------------------------
# lut_conv2d: convolution through a packed codebook weight (mixedprec.formats.PackedWeight)

_LUT_CONV2D_KERNEL_OPS = {"cpu": ("lut_conv2d_fwd", "CPU"), "cuda": ("lut_conv2d_fwd", "CUDA"),
                          "simt": ("lut_conv2d_fwd", "CPU")}
_LUT_CONV2D_KERNEL_BUILT = kernels_built(_LUT_CONV2D_KERNEL_OPS)


def _conv_pair(op: str, name: str, value, minimum: int) -> list[int]:
    pair = (value, value) if isinstance(value, int) else value
    if (isinstance(value, bool) or not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair)):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return list(pair)


def lut_conv2d(x: Tensor, packed, bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1,
               *, backend: str | None = None) -> Tensor:
    """conv2d(x, W, bias, stride, padding, dilation, groups) with W decoded from a packed weight.

    x: (N, C_in, H, W) float tensor (float32/float16/bfloat16 for the kernels, float64 too for the
        reference). packed: ``PackedWeight`` of shape (C_out, C_in/groups, kh, kw) on x's device,
        W[c, i] = float(channel_scale[c]) * float(codebook[code]) at kept positions, 0 elsewhere.
    bias: None or a float tensor (C_out,). stride, dilation: ints >= 1 or pairs; padding: int >= 0 or pair.
    Kernels accumulate in float32; the output has x's dtype. GPU kernels decode the codes inside
    an implicit GEMM. The CPU kernel computes 3x3, stride-1, single-group convolutions (8 to 2048
    input channels, 8 or more output channels) through Winograd F(2x2, 3x3), decoding per block
    of output channels into the transformed weight (``set_cpu_winograd`` switches it off: its
    float32 error differs), and
    the rest by decoding output-channel tiles into a bounded scratch (4.7 MB) and convolving each
    with ATen's float32 convolution (docs/kernels.md). Gradients: grad_x (the
    transposed convolution through the codebook) and grad_bias; the packed weight is constant and
    takes no gradient. A NaN or inf in x makes every output whose window covers it NaN or inf
    (pruned weights multiply too), as conv2d.
    """
    from mixedprec.formats import PackedWeight

    op = "lut_conv2d"
    if not isinstance(packed, PackedWeight):
        raise ValueError(f"{op}: packed must be a mixedprec.formats.PackedWeight, got {type(packed).__name__}")
    if len(packed.shape) != 4:
        raise ValueError(f"{op}: packed must hold a conv weight (C_out, C_in/groups, kh, kw), got shape {packed.shape}")
    return lut_conv2d_buffers(x, packed.codes, packed.codebook, packed.channel_scale, packed.keep_bitmap,
                              packed.code_offsets, packed.bits, packed.shape, bias, stride, padding, dilation, groups, backend=backend,
                              packed=packed)


def lut_conv2d_buffers(x: Tensor, codes: Tensor, codebook: Tensor, channel_scale: Tensor,
                       keep_bitmap: Tensor | None, code_offsets: Tensor | None, bits: int, weight_shape: Sequence[int],
                       bias: Tensor | None = None,
                       stride=1, padding=0, dilation=1, groups: int = 1, *, backend: str | None = None,
                       packed=None) -> Tensor:
    """``lut_conv2d`` on the tensors of a packed weight (as a module holds them in buffers);
    the format's own invariants are checked when the PackedWeight is built, not here."""
    op = "lut_conv2d"
    _check_tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    for name, t in (("codes", codes), ("codebook", codebook), ("channel_scale", channel_scale), ("keep_bitmap", keep_bitmap)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: the packed weight's {name} is on {t.device} but x is on {x.device}")
        if t is not None and t.requires_grad:
            raise ValueError(f"{op}: the packed weight's {name} requires grad; packed weights are constant "
                             f"(finetune the float weights, then pack again)")
    c_out, c_in_per_group, kh, kw = (int(s) for s in weight_shape)
    stride, padding, dilation = (_conv_pair(op, n, v, m) for n, v, m in
                                 (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)))
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or c_out % groups:
        raise ValueError(f"{op}: groups must be an int >= 1 dividing C_out = {c_out}, got {groups!r}")
    if x.shape[1] != c_in_per_group * groups:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but the packed weight {tuple(weight_shape)} with "
                         f"groups={groups} expects {c_in_per_group * groups}")
    out_hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1 for i, k in enumerate((kh, kw))]
    if min(out_hw) < 1:
        raise ValueError(f"{op}: the output would be empty: x {tuple(x.shape)}, kernel {(kh, kw)}, "
                         f"padding {padding}, dilation {dilation}")
    if bias is not None:
        _check_tensor(op, "bias", bias, x.device)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"{op}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    backend = resolve_op_backend("lut_conv2d", backend, x, _LUT_CONV2D_KERNEL_BUILT)
    if backend == "reference":
        if packed is None:
            from mixedprec.formats import PackedWeight
            packed = PackedWeight(tuple(int(s) for s in weight_shape), bits, codebook, channel_scale, codes, keep_bitmap)
        return reference.lut_conv2d(x, packed, bias, stride, padding, dilation, groups)
    op_fn = torch.ops.mixedprec.lut_conv2d if _through_autograd(x, bias) else _lut_conv2d_forward
    return op_fn(x, codes, codebook, channel_scale, keep_bitmap, code_offsets, int(bits), [c_out, c_in_per_group, kh, kw],
                 bias, stride, padding, dilation, groups, backend)


def _lut_conv2d_kernels(backend: str) -> _Kernels:
    if backend in ("cpu", "cuda"):
        return _Kernels(torch.ops.mixedprec.lut_conv2d_fwd, torch.ops.mixedprec.lut_conv2d_bwd)
    if backend == "simt":
        return _Kernels(torch.ops.mixedprec_simt.lut_conv2d_fwd, torch.ops.mixedprec_simt.lut_conv2d_bwd)
    if backend == "triton":
        from mixedprec.triton import lut_conv2d
        return _Kernels(lut_conv2d.forward, lut_conv2d.backward)
    raise ValueError(f"lut_conv2d: unknown backend {backend!r}")


def _conv_output_shape(x_shape, weight_shape, stride, padding, dilation) -> list[int]:
    hw = [(x_shape[2 + i] + 2 * padding[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1) // stride[i] + 1
          for i in range(2)]
    return [x_shape[0], weight_shape[0], *hw]


def _lut_conv2d_forward(x: Tensor, codes: Tensor, codebook: Tensor, channel_scale: Tensor, keep_bitmap: Tensor | None,
                        code_offsets: Tensor | None, bits: int, weight_shape: list[int], bias: Tensor | None,
                        stride: list[int], padding: list[int], dilation: list[int], groups: int, backend: str) -> Tensor:
    # the kernels take codebook and channel_scale in float32 (the format stores float16 or float32)
    return _lut_conv2d_kernels(backend).forward(x.contiguous(), codes, codebook.float(), channel_scale.float(),
                                                keep_bitmap, code_offsets, weight_shape, bits, bias, stride, padding,
                                                dilation, groups)


_lut_conv2d = torch.library.custom_op("mixedprec::lut_conv2d", mutates_args=())(_lut_conv2d_forward)


@_lut_conv2d.register_fake
def _(x, codes, codebook, channel_scale, keep_bitmap, code_offsets, bits, weight_shape, bias, stride, padding, dilation,
      groups, backend):
    return x.new_empty(_conv_output_shape(x.shape, weight_shape, stride, padding, dilation))


@torch.library.custom_op("mixedprec::lut_conv2d_backward", mutates_args=())
def _lut_conv2d_backward(grad_y: Tensor, codes: Tensor, codebook: Tensor, channel_scale: Tensor,
                         keep_bitmap: Tensor | None, code_offsets: Tensor | None, bits: int, weight_shape: list[int],
                         input_shape: list[int],
                         stride: list[int], padding: list[int], dilation: list[int], groups: int,
                         backend: str) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_bias = sum of grad_y over batch and pixels, in float32)."""
    grad_y = grad_y.contiguous()
    grad_x = _lut_conv2d_kernels(backend).backward(grad_y, codes, codebook.float(), channel_scale.float(), keep_bitmap,
                                                   code_offsets, weight_shape, bits, input_shape, stride, padding,
                                                   dilation, groups)
    return grad_x, grad_y.sum((0, 2, 3), dtype=torch.float32)


@_lut_conv2d_backward.register_fake
def _(grad_y, codes, codebook, channel_scale, keep_bitmap, code_offsets, bits, weight_shape, input_shape, stride,
      padding, dilation, groups, backend):
    return grad_y.new_empty(input_shape), grad_y.new_empty(weight_shape[0], dtype=torch.float32)


def _lut_conv2d_setup_context(ctx, inputs, output):
    (x, codes, codebook, channel_scale, keep_bitmap, code_offsets, bits, weight_shape, bias, stride, padding, dilation,
     groups, backend) = inputs
    ctx.save_for_backward(codes, codebook, channel_scale, keep_bitmap, code_offsets)
    ctx.input_shape = list(x.shape)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.args = (bits, weight_shape, stride, padding, dilation, groups, backend)


def _lut_conv2d_autograd(ctx, grad_y):
    codes, codebook, channel_scale, keep_bitmap, code_offsets = ctx.saved_tensors
    bits, weight_shape, stride, padding, dilation, groups, backend = ctx.args
    grad_x, grad_bias = torch.ops.mixedprec.lut_conv2d_backward(
        grad_y, codes, codebook, channel_scale, keep_bitmap, code_offsets, bits, weight_shape, ctx.input_shape, stride,
        padding, dilation, groups, backend)
    grad_bias = None if ctx.bias_dtype is None else grad_bias.to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, None, grad_bias, None, None, None, None, None


_lut_conv2d.register_autograd(_lut_conv2d_autograd, setup_context=_lut_conv2d_setup_context)
