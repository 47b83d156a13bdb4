"""Export: a fixed-bit model with pruned channels physically removed.

Each producer's pruned output filters go, with the matching entries of the BatchNorms and
depthwise convs on the way and the matching input channels of its consumers. The result's SBS
layers are in fixed mode and have no pruning gates; in eval mode it computes what the masked
model computes (the weight statistics were already taken over kept channels only).
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mixedprec.sbs import graph
from mixedprec.sbs.config import LayerReport, describe
from mixedprec.sbs.convert import fix_configuration, sbs_layers
from mixedprec.sbs.layers import SBSLayer


class Exported(NamedTuple):
    model: nn.Module                # pruned, fixed-bit model
    layers: dict[str, LayerReport]  # per SBS layer: bits, clips, weight statistics, kept channels


@torch.no_grad()
def export(model: nn.Module) -> Exported:
    """A pruned, fixed-bit copy of an SBS model (at its current choice) and its layer reports."""
    reports = describe(model)
    model = copy.deepcopy(model)
    fix_configuration(model)
    layers = sbs_layers(model)
    modules = dict(model.named_modules())
    flow = graph.trace(model, leaves=(SBSLayer,))
    for name, producer in layers.items():
        if producer.prune_gate is None:
            continue
        group = graph.prune_group(flow, modules, set(layers), name)
        linked_members = {n for n, m in layers.items() if m.channel_source and m.channel_source.layer is producer}
        linked_consumers = {n for n, m in layers.items() if m.input_source and m.input_source.layer is producer}
        if group is None or set(group.members) != linked_members or set(group.consumers) != linked_consumers:
            raise ValueError(f"export: the data flow from {name!r} no longer matches the pruning set up by convert")
        keep = producer.prune_gate.keep.nonzero().flatten()
        narrowed = len(keep) < producer.weight.shape[0]
        for out_name in [name, *group.members, *group.norms] if narrowed else []:
            _keep_outputs(modules[out_name], keep)
        for in_name in group.consumers:
            if narrowed:
                _keep_inputs(modules[in_name], keep)
            modules[in_name].input_source = None
        for member in group.members:
            modules[member].channel_source = None
        producer.prune_gate = None
    return Exported(model, reports)


def _select(t: Tensor | None, dim: int, index: Tensor) -> nn.Parameter | Tensor | None:
    if t is None:
        return None
    kept = t.index_select(dim, index).clone()
    return nn.Parameter(kept, t.requires_grad) if isinstance(t, nn.Parameter) else kept


def _narrow(m: nn.Module, **widths: int) -> None:
    """Sets width attributes (out_channels=..., num_features=...), remembering the original ones in
    ``m.pruned_from``: a saved model then loads into a freshly built, full-width one of its kind
    (``mixedprec.load``), which it narrows to these widths."""
    original = getattr(m, "pruned_from", {})
    m.pruned_from = {**{k: getattr(m, k) for k in widths}, **original}
    for k, v in widths.items():
        setattr(m, k, v)


def _keep_outputs(m: nn.Module, keep: Tensor) -> None:
    """Keep only output channels ``keep`` of a conv/linear (a depthwise conv: also its
    inputs) or the entries ``keep`` of a BatchNorm."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            setattr(m, attr, _select(getattr(m, attr), 0, keep))
        _narrow(m, num_features=len(keep))
        return
    m.weight, m.bias = _select(m.weight, 0, keep), _select(m.bias, 0, keep)
    if isinstance(m, nn.Linear):
        _narrow(m, out_features=len(keep))
    elif m.groups > 1:  # depthwise: one input channel per output channel
        _narrow(m, in_channels=len(keep), out_channels=len(keep), groups=len(keep))
    else:
        _narrow(m, out_channels=len(keep))


def _keep_inputs(m: nn.Module, keep: Tensor) -> None:
    m.weight = _select(m.weight, 1, keep)
    if isinstance(m, nn.Linear):
        _narrow(m, in_features=len(keep))
    else:
        _narrow(m, in_channels=len(keep))
