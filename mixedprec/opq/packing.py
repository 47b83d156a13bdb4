"""OPQ's packer (registered with mixedprec.nn.pack): the codes are the nearest-level indices
``codebook_quant`` picks, the codebook and the channel scales are the layer's, pruned weights go
into the keep bitmap. OPQ layers quantize no activations."""
from __future__ import annotations

import torch

from mixedprec.formats import PackedWeight, pack_weight
from mixedprec.nn.pack import register_packer
from mixedprec.opq.layers import OPQConv2d, OPQLinear


def opq_packed_weight(layer, where: str = "layer") -> PackedWeight:
    """The packed weight of an OPQ layer: its codebook, channel scales and keep mask."""
    w = layer.weight.detach().float()
    channel_shape = (-1,) + (1,) * (w.dim() - 1)
    codebook = layer.codebook.detach().float()
    z = w * (1.0 / layer.channel_scale.float()).reshape(channel_shape)
    codes = torch.searchsorted((codebook[:-1] + codebook[1:]) * 0.5, z.contiguous(), side="left")
    return pack_weight(codes, codebook, layer.channel_scale.detach().to(layer.scale_dtype), layer.bits,
                       layer.keep_mask)


register_packer(OPQLinear, lambda layer, where: (opq_packed_weight(layer, where), None))
register_packer(OPQConv2d, lambda layer, where: (opq_packed_weight(layer, where), None))
