"""float_twin(model): the float original's architecture of a packed or compressed model, with
fresh weights: what its speed is compared against (``mixedprec report``).

Every conv/linear layer (packed, SBS, OPQ) becomes a plain nn.Conv2d/nn.Linear of the widths it
had before ``sbs.export`` narrowed it (``pruned_from``), and every other module export narrowed
(BatchNorm and the like, one width each) gets its original width back, so pruned channels cost
their float time again; a BatchNorm folded into a packed conv (``fold_batchnorm``) is back too.
The weights are random: good for timing, not for outputs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mixedprec.nn.fold import FoldedBatchNorm
from mixedprec.nn.packed_conv import PackedConv2d
from mixedprec.nn.packed_linear import PackedLinear


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` made of plain float conv/linear layers at their original widths; a
    ValueError names a narrowed module whose width it cannot restore."""
    anchor = next(iter((*model.parameters(), *model.buffers())), None)
    device = torch.device("cpu") if anchor is None else anchor.device
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        layer = _float_layer(module)
        if layer is not None:
            parent, _, attr = name.rpartition(".")
            if not name:
                return layer.to(device)
            setattr(twin.get_submodule(parent), attr, layer.to(device))
        elif hasattr(module, "pruned_from"):
            _widen(module, name)
    return twin


def _float_layer(m: nn.Module) -> nn.Module | None:
    widths = {**vars(m), **getattr(m, "pruned_from", {})}
    if isinstance(m, (nn.Conv2d, PackedConv2d)):
        return nn.Conv2d(widths["in_channels"], widths["out_channels"], m.kernel_size, m.stride, m.padding, m.dilation,
                         widths["groups"], getattr(m, "bias_before_folding", m.bias is not None),
                         getattr(m, "padding_mode", "zeros"))
    if isinstance(m, FoldedBatchNorm):  # the float original runs its BatchNorm
        return nn.BatchNorm2d(m.num_features).eval()
    if isinstance(m, (nn.Linear, PackedLinear)):
        return nn.Linear(widths["in_features"], widths["out_features"], m.bias is not None)
    return None


def _widen(module: nn.Module, name: str) -> None:
    """Back to the one width it had: tensor dims of the narrowed size get the original size."""
    if len(module.pruned_from) != 1:
        raise ValueError(f"float_twin: module {name!r} ({type(module).__name__}) was narrowed in "
                         f"{sorted(module.pruned_from)}; only modules of one width can be widened back")
    (key, original), = module.pruned_from.items()
    narrow = getattr(module, key)
    for slot in (module._parameters, module._buffers):
        for attr, t in slot.items():
            if t is not None and t.dim() > 0:
                # ones: running variances stay valid, and no NaN or denormal slows the timing
                new = torch.ones([original if s == narrow else s for s in t.shape], dtype=t.dtype, device=t.device)
                slot[attr] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
    setattr(module, key, original)
    del module.pruned_from
