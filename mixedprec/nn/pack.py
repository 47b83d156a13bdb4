"""pack(model): finetuned layers -> packed inference layers with the same outputs.

Each method registers a packer for its layer classes (``register_packer``; mixedprec/sbs/packing.py,
mixedprec/opq/packing.py): it gives the layer's PackedWeight and the activation quantizer the
packed layer applies first, or None to leave the layer as it is (a float layer).
Plain float layers are left as they are. A layer the packed kernels cannot run (a conv with
"same" padding that is not symmetric) stays as it was finetuned, named in one warning. A layer
narrowed by ``sbs.export`` keeps its original widths (``pruned_from``), so that its file loads into
a freshly built model.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from collections.abc import Callable

from mixedprec.formats import PackedWeight
from mixedprec.nn.attention import keep_off_fused_paths
from mixedprec.nn.packed_conv import PackedConv2d, symmetric_padding
from mixedprec.nn.packed_linear import PackedLinear

# packer(layer, where) -> (its PackedWeight, the input quantizer or None), or None to keep the layer
Packer = Callable[[nn.Module, str], "tuple[PackedWeight, nn.Module | None] | None"]
_PACKERS: dict[type, Packer] = {}


def register_packer(layer_type: type, packer: Packer) -> None:
    """Makes ``pack`` replace layers of ``layer_type`` (an nn.Linear or nn.Conv2d subclass, or a
    subclass of theirs) by packed layers built from ``packer``'s result."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, (nn.Linear, nn.Conv2d))):
        raise ValueError(f"register_packer: layer_type must be an nn.Linear or nn.Conv2d subclass, got {layer_type!r}")
    _PACKERS[layer_type] = packer


def packer_of(layer: nn.Module) -> Packer | None:
    return next((_PACKERS[t] for t in type(layer).__mro__ if t in _PACKERS), None)


@torch.no_grad()
def pack(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with every layer that has a packer (SBS, OPQ) replaced by its packed twin
    (PackedLinear, PackedConv2d). Buffers/parameters of other modules are kept."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"pack: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    unpackable = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            where = f"{parent_name}.{name}" if parent_name else name
            packer = packer_of(child)
            result = None if packer is None else packer(child, where)
            if result is None:
                continue
            padding = symmetric_padding(child) if isinstance(child, nn.Conv2d) else None
            if isinstance(child, nn.Conv2d) and padding is None:
                unpackable.append(f"{where} (padding={child.padding!r}, dilation={child.dilation}, "
                                  f"kernel_size={child.kernel_size})")
                continue
            setattr(parent, name, _packed_layer(child, *result, padding))
    if unpackable:
        warnings.warn(f"pack: the packed convolution pads both sides alike; layers {unpackable} (\"same\" padding "
                      f"with one more on the right) stay as they were finetuned (fake-quantized, float weights)",
                      stacklevel=2)
    keep_off_fused_paths(model)
    return model


def _packed_layer(layer: nn.Module, packed: PackedWeight, input_quant, padding) -> nn.Module:
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, nn.Linear):
        new = PackedLinear(packed, bias, input_quant)
    else:
        new = PackedConv2d(packed, bias, input_quant, stride=layer.stride, padding=padding,
                           dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode)
    if hasattr(layer, "pruned_from"):
        new.pruned_from = dict(layer.pruned_from)
    return new.to(layer.weight.device).train(layer.training)
