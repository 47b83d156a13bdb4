"""codebook_quant: OPQ's masked nearest-level fake-quant to a shared codebook: the public
function, its custom op, fake and autograd. Kernels: csrc/ops/codebook_quant/,
mixedprec/backends/triton/codebook_quant.py; the oracle: mixedprec/backends/reference/."""
from __future__ import annotations

import torch
from torch import Tensor

from mixedprec.backends import reference
from mixedprec.formats import check_entries
from mixedprec.ops import checks
from mixedprec.ops.backend import Backend, kernel, kernels_built, resolve
from mixedprec.ops.library import custom_op, define, register_autograd

OP = "codebook_quant"
KERNELS_BUILT = kernels_built(OP)
MAX_CODEBOOK_SIZE = 256  # 8-bit codes


def codebook_quant(
    weight: Tensor,
    codebook: Tensor,
    channel_scale: Tensor,
    keep_mask: Tensor,
    *,
    backend: str | Backend | None = None,
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
    checks.tensor(op, "weight", weight)
    checks.tensor(op, "codebook", codebook, weight.device)
    checks.tensor(op, "channel_scale", channel_scale, weight.device)
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
    backend = resolve(op, backend, weight, KERNELS_BUILT)
    if backend is Backend.REFERENCE:
        if not torch.compiler.is_compiling():
            _check_codebook_values(codebook, channel_scale)
        return reference.codebook_quant(weight, codebook, channel_scale, keep_mask)
    return custom_op(backend, OP)(weight, codebook.float(), channel_scale.float(), keep_mask)


def _check_codebook_values(codebook: Tensor, channel_scale: Tensor) -> None:
    if not checks.check_values or codebook.is_meta:  # meta tensors (shape inference) hold no values
        return
    op = "codebook_quant"
    check_entries(op, "codebook", codebook, positive=False)
    steps = codebook[1:] - codebook[:-1]
    if not bool((steps > 0).all()):
        j = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(f"{op}: codebook must be strictly ascending, but codebook[{j}] = "
                         f"{codebook[j].item()} >= codebook[{j + 1}] = {codebook[j + 1].item()}")
    check_entries(op, "channel_scale", channel_scale, positive=True)


def _forward(family: Backend, weight: Tensor, codebook: Tensor, channel_scale: Tensor, keep_mask: Tensor) -> Tensor:
    _check_codebook_values(codebook, channel_scale)
    return kernel(family, OP, "forward")(weight.contiguous(), codebook.contiguous(), channel_scale.contiguous(),
                                         keep_mask.contiguous())


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[3])


def _autograd(family: Backend, ctx, grad_y):
    # Straight-through at kept positions, zero at pruned ones: one elementwise select that any
    # device runs, so no backward kernel is needed.
    (keep_mask,) = ctx.saved_tensors
    return torch.where(keep_mask, grad_y, torch.zeros((), dtype=grad_y.dtype, device=grad_y.device)), None, None, None


# kernels return contiguous outputs
define(OP, "(Tensor weight, Tensor codebook, Tensor channel_scale, Tensor keep_mask) -> Tensor", _forward,
       lambda weight, codebook, channel_scale, keep_mask: weight.new_empty(weight.shape))
register_autograd(OP, _autograd, _setup_context)
