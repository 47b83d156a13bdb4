"""SBS's packer (registered with mixedprec.nn.pack): an exported SBS layer -> its PackedWeight.

After ``mixedprec.sbs.export`` (pruned channels removed, bits fixed): W_q = mean + std *
v (2 k / n - 1) per weight, so the codes are k and the codebook holds the 2^b levels in float32
with unit (float16) channel scales: the packed weight decodes to the finetuned W_q bit for bit
(float16 levels, rounded to 11 bits, moved the outputs of W4A4 models by up to ~0.3 logits: the
next 4-bit activation quantizer turns a rounding into a whole step). The layer's activation
quantizer is kept as the packed layer's ``input_quant``. A layer whose weights are not quantized
stays a float layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mixedprec.backends.reference.quant import levels, normalize
from mixedprec.formats import PackedWeight, pack_weight
from mixedprec.nn.pack import register_packer
from mixedprec.sbs.layers import SBS_CODEBOOK_DTYPE, SBS_SCALE_DTYPE, SBSConv2d, SBSLinear


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
    n = levels(bits)
    z = normalize((layer.weight.detach().float() - mean) / std, clip, signed=True)
    codes = torch.round(z * n).to(torch.int64)
    k = torch.arange(n + 1, dtype=torch.float32, device=codes.device)
    grid = (clip * (2.0 * (k * (1.0 / n)) - 1.0)) * std + mean  # spelled as quantized_weight computes it
    ones = torch.ones(codes.shape[0], dtype=SBS_SCALE_DTYPE, device=codes.device)
    return pack_weight(codes, grid, ones, bits, codebook_dtype=SBS_CODEBOOK_DTYPE)


def _pack(layer, where: str) -> tuple[PackedWeight, nn.Module | None] | None:
    if not layer.w_quant.enabled:
        return None  # a float layer
    input_quant = copy.deepcopy(layer.a_quant) if layer.a_quant.enabled else None
    return sbs_packed_weight(layer, where), input_quant


register_packer(SBSLinear, _pack)
register_packer(SBSConv2d, _pack)
