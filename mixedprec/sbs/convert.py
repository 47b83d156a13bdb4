"""Model surgery: float model <-> SBS model, and model-wide controls of the SBS layers."""
from __future__ import annotations

import copy
import warnings

from torch import nn

from mixedprec.nn.attention import keep_off_fused_paths, unfuse_attention
from mixedprec.nn.targets import split_layers
from mixedprec.sbs import graph
from mixedprec.sbs.layers import LayerRef, SBSConv2d, SBSLayer, SBSLinear
from mixedprec.sbs.policy import SBSPolicy
from mixedprec.sbs.quantizer import BatchStatistics, check_act_grid

_SBS_TYPES = {nn.Conv2d: SBSConv2d, nn.Linear: SBSLinear}


def sbs_layers(model: nn.Module) -> dict[str, SBSLayer]:
    """The model's SBS layers by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SBSLayer)}


def convert(model: nn.Module, policy: SBSPolicy | None = None, *, inplace: bool = False) -> nn.Module:
    """Replace every nn.Conv2d and nn.Linear (exact types; not those in or under the modules
    ``policy.exclude`` names) with SBSConv2d/SBSLinear sharing its weight and bias, and set up
    filter-group pruning.

    Attention layers are first made of called nn.Linear projections
    (``mixedprec.nn.attention.unfuse_attention``); other conv/linear-like layers stay float and
    are named in a warning. The first and last converted layer in execution order get
    ``policy.first_last_bits`` (8/8 by default). A float state dict without attention layers
    still loads into the result (strict), and ``unconvert`` gives such a float model back.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    policy = SBSPolicy() if policy is None else policy
    if not isinstance(policy, SBSPolicy):
        raise ValueError(f"convert: policy must be an SBSPolicy or None, got {type(policy).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) in _SBS_TYPES:
        raise ValueError("convert: model is itself a Conv2d/Linear; wrap it in a container (e.g. nn.Sequential)")
    unfuse_attention(model)
    modules = dict(model.named_modules())
    missing = set(policy.exclude) - set(modules)
    if missing:
        raise ValueError(f"convert: policy.exclude names modules the model does not have: {sorted(missing)}")
    targets = list(split_layers(model, "sbs.convert", _excluded(modules, policy)))
    if not targets:
        raise ValueError("convert: the model has no nn.Conv2d or nn.Linear to convert")

    try:
        flow = graph.trace(model)
    except Exception as exc:  # fx cannot trace data-dependent control flow; conversion still works
        flow = None
        if policy.prune:
            warnings.warn(f"convert: torch.fx cannot trace {type(model).__name__} ({exc}); "
                          f"no layer will be pruned, quantization is searched as usual", stacklevel=2)
    order = [n for n in graph.execution_order(flow) if n in targets] if flow is not None else targets
    ends = {order[0], order[-1]} if policy.first_last_bits is not None else set()
    check_act_grid(policy.act_grid, policy.quantize)  # refused before any model surgery

    for name in targets:
        bits = {}
        if name in ends:
            bits = {"weight_bits": (policy.first_last_bits,), "act_bits": (policy.first_last_bits,)}
        layer = _SBS_TYPES[type(modules[name])].from_float(
            modules[name], weight_bits=bits.get("weight_bits", policy.weight_bits),
            act_bits=bits.get("act_bits", policy.act_bits), act_signed=policy.act_signed,
            weight_clip_init=policy.weight_clip_init, quantize=policy.quantize,
            act_grid="signed" if name == order[0] else policy.act_grid)  # the model's input: see SBSPolicy
        _set_module(model, name, layer)
        modules[name] = layer

    if policy.prune and flow is not None:
        for group in graph.find_prune_groups(flow, modules, set(targets), policy.group_size, policy.max_prune_ratio):
            producer = modules[group.producer]
            producer.enable_pruning(policy.group_size, policy.max_prune_ratio, policy.per_group_thresholds)
            for name in group.members:
                modules[name].channel_source = LayerRef(producer)
            for name in group.consumers:
                modules[name].input_source = LayerRef(producer)
    keep_off_fused_paths(model)
    return model


def pruning_groups(model: nn.Module, policy: SBSPolicy | None = None) -> dict[str, tuple[int, int]]:
    """What ``convert(model, policy)`` would prune, without converting: producer name ->
    (number of filter groups, number of learnable thresholds). Empty when nothing is pruned."""
    policy = SBSPolicy() if policy is None else policy
    if not policy.prune:
        return {}
    modules = dict(model.named_modules())
    targets = set(split_layers(model, "sbs.pruning_groups", _excluded(modules, policy)))
    groups = graph.find_prune_groups(graph.trace(model), modules, targets, policy.group_size, policy.max_prune_ratio)
    n_groups = {g.producer: modules[g.producer].weight.shape[0] // policy.group_size for g in groups}
    return {name: (n, n if policy.per_group_thresholds else 1) for name, n in n_groups.items()}


def _excluded(modules: dict[str, nn.Module], policy: SBSPolicy) -> set[str]:
    """The modules ``policy.exclude`` names, and everything under them."""
    return {name for name in modules for top in policy.exclude if name == top or name.startswith(top + ".")}


def unconvert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every SBS layer by the plain nn.Conv2d/nn.Linear sharing its weight and bias."""
    if not inplace:
        model = copy.deepcopy(model)
    for name, layer in sbs_layers(model).items():
        _set_module(model, name, layer.to_float())
    return model


def fix_configuration(model: nn.Module) -> None:
    """Fix every SBS layer at its current bits and keep/prune choice (for finetuning)."""
    for layer in sbs_layers(model).values():
        layer.fix()


def set_batch_statistics(model: nn.Module, statistics: BatchStatistics | None) -> None:
    """Where the activation quantizers take the batch statistics they decide from (gates, first
    clip value): ``statistics`` combines them over every process of a data-parallel job
    (``mixedprec.distributed.ProcessGroupStatistics``), None takes each process's input alone.
    Weight quantizers need none: the weights are the same on every process."""
    for layer in sbs_layers(model).values():
        layer.a_quant.batch_statistics = statistics


def project_(model: nn.Module) -> None:
    """After each optimizer step: thresholds >= 0, clip values > 0, pruning capped."""
    for layer in sbs_layers(model).values():
        layer.project_()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
