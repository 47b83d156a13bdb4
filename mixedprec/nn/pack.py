"""pack(model): SBS- or OPQ-finetuned layers -> packed inference layers with the same outputs.

SBS (after ``mixedprec.sbs.export``: pruned channels removed, bits fixed): W_q = mean + std *
v (2 k / n - 1) per weight, so the codes are k and the codebook holds the 2^b levels in float32
with unit (float16) channel scales: the packed weight decodes to the finetuned W_q bit for bit
(float16 levels, rounded to 11 bits, moved the outputs of W4A4 models by up to ~0.3 logits: the
next 4-bit activation quantizer turns a rounding into a whole step). The layer's activation
quantizer is kept as the packed layer's ``input_quant``.
OPQ: the codes are the nearest-level indices ``codebook_quant`` picks, the codebook and the
channel scales are the layer's, pruned weights go into the keep bitmap.
Plain float layers are left as they are. A layer the packed kernels cannot run (a conv with
non-zero padding modes, or "same" padding that is not symmetric) stays as it was finetuned, named
in one warning. A layer narrowed by ``sbs.export`` keeps its original widths (``pruned_from``), so
that its file loads into a freshly built model.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from mixedprec import reference
from mixedprec.formats import PackedWeight, pack_weight
from mixedprec.nn.attention import keep_off_fused_paths
from mixedprec.nn.packed_conv import PackedConv2d
from mixedprec.nn.packed_linear import PackedLinear

# How an SBS layer's weight is stored: its levels exact in float32, unit channel scales in float16
SBS_CODEBOOK_DTYPE, SBS_SCALE_DTYPE = torch.float32, torch.float16


@torch.no_grad()
def pack(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with every SBS/OPQ linear and conv layer replaced by its packed twin
    (PackedLinear, PackedConv2d). Buffers/parameters of other modules are kept."""
    from mixedprec.opq.layers import OPQConv2d, OPQLinear
    from mixedprec.sbs.layers import SBSConv2d, SBSLinear

    if not isinstance(model, nn.Module):
        raise ValueError(f"pack: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    unpackable = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            where = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, (OPQLinear, OPQConv2d, SBSLinear, SBSConv2d)):
                continue
            if isinstance(child, (SBSLinear, SBSConv2d)) and not child.w_quant.enabled:
                continue  # a float layer
            padding = zero_padding(child) if isinstance(child, nn.Conv2d) else None
            if padding == "unsupported":
                unpackable.append(f"{where} (padding={child.padding!r}, padding_mode={child.padding_mode!r})")
                continue
            if isinstance(child, (OPQLinear, OPQConv2d)):
                packed, input_quant = opq_packed_weight(child), None
            else:
                packed, input_quant = sbs_packed_weight(child, where), _input_quant(child)
            setattr(parent, name, _packed_layer(child, packed, input_quant, padding))
    if unpackable:
        warnings.warn(f"pack: the packed convolution pads with zeros only; layers {unpackable} stay as they were "
                      f"finetuned (fake-quantized, float weights)", stacklevel=2)
    keep_off_fused_paths(model)
    return model


def zero_padding(conv: nn.Conv2d) -> tuple[int, int] | str:
    """The conv's padding as the packed conv takes it (numbers, zeros), or "unsupported"."""
    if conv.padding_mode != "zeros":
        return "unsupported"
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":  # torch pads dilation * (k - 1) in all, the odd one on the right
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return "unsupported" if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return tuple(conv.padding)


def _packed_layer(layer: nn.Module, packed: PackedWeight, input_quant, padding) -> nn.Module:
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, nn.Linear):
        new = PackedLinear(packed, bias, input_quant)
    else:
        new = PackedConv2d(packed, bias, input_quant, stride=layer.stride, padding=padding,
                           dilation=layer.dilation, groups=layer.groups)
    if hasattr(layer, "pruned_from"):
        new.pruned_from = dict(layer.pruned_from)
    return new.to(layer.weight.device).train(layer.training)


def _input_quant(layer) -> nn.Module | None:
    return copy.deepcopy(layer.a_quant) if layer.a_quant.enabled else None


def sbs_packed_weight(layer, where: str = "layer") -> PackedWeight:
    """The packed weight of an exported (fixed-bit, pruning removed) SBS layer."""
    bits = layer.w_quant.fixed_bits
    if bits is None or layer.prune_gate is not None or layer.input_gate() is not None:
        raise ValueError(f"pack: SBS layer {where!r} is not exported; run mixedprec.sbs.export first "
                         f"(fixed bits, pruned channels removed)")
    if bits > 8:
        raise ValueError(f"pack: SBS layer {where!r} uses {bits}-bit weights; the packed format holds 1..8")
    mean, std = layer.weight_standardization()
    clip = layer.w_quant.clip.detach().float()
    n = reference.levels(bits)
    z = reference.normalize((layer.weight.detach().float() - mean) / std, clip, signed=True)
    codes = torch.round(z * n).to(torch.int64)
    k = torch.arange(n + 1, dtype=torch.float32, device=codes.device)
    levels = (clip * (2.0 * (k * (1.0 / n)) - 1.0)) * std + mean  # spelled as quantized_weight computes it
    ones = torch.ones(codes.shape[0], dtype=SBS_SCALE_DTYPE, device=codes.device)
    return pack_weight(codes, levels, ones, bits, codebook_dtype=SBS_CODEBOOK_DTYPE)


def opq_packed_weight(layer) -> PackedWeight:
    """The packed weight of an OPQ layer: its codebook, channel scales and keep mask."""
    w = layer.weight.detach().float()
    channel_shape = (-1,) + (1,) * (w.dim() - 1)
    codebook = layer.codebook.detach().float()
    z = w * (1.0 / layer.channel_scale.float()).reshape(channel_shape)
    codes = torch.searchsorted((codebook[:-1] + codebook[1:]) * 0.5, z.contiguous(), side="left")
    return pack_weight(codes, codebook, layer.channel_scale.detach().to(layer.scale_dtype), layer.bits,
                       layer.keep_mask)
