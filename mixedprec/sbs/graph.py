"""Which layers' output filters can be pruned, and who consumes them, from the model's data flow.

A conv/linear layer's output channels can be pruned when every path from its output reaches
the input of a conv/linear layer (the consumers) through channel-wise operations only:
BatchNorm, elementwise activations, dropout, pooling, depthwise convs (which are pruned along),
and a global pool + flatten in front of a linear layer. Any other use of the output (an
addition, a concatenation, the model's output, a reshape) keeps all its channels. In residual
networks this prunes the inner convs of each block and never the outputs that feed an addition,
as the paper does. The data flow comes from torch.fx; a model fx cannot trace is not pruned.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixedprec.nn.attention import LinearMultiheadAttention

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.SiLU, nn.GELU, nn.Mish,
                        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Identity,
                        nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_ELEMENTWISE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu,
                          F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.dropout,
                          F.dropout2d}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
_LOCAL_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d)
_LOCAL_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d}
_GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_GLOBAL_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}

# Layout of the channels along a path: (N, C, H, W), (N, C, 1, 1) after a global pool, (N, C).
NCHW, POOLED, NC = "nchw", "pooled", "nc"


@dataclass
class PruneGroup:
    """A producer whose output filters may be pruned, and the modules its channels pass through."""

    producer: str
    members: list[str] = field(default_factory=list)    # depthwise convs pruned along
    norms: list[str] = field(default_factory=list)      # BatchNorms whose entries go with them
    consumers: list[str] = field(default_factory=list)  # layers whose input channels go with them


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> fx.Graph:
    """The model's fx graph, with modules of type ``leaves`` kept as calls. Attention modules are
    always calls: their projections' outputs are split into heads, which prunes nothing."""
    return _Tracer((LinearMultiheadAttention, *leaves)).trace(model)


def execution_order(graph: fx.Graph) -> list[str]:
    """Names of the modules the graph calls, in call order."""
    return [n.target for n in graph.nodes if n.op == "call_module"]


def find_prune_groups(graph: fx.Graph, modules: dict[str, nn.Module], layers: set[str],
                      group_size: int, max_prune_ratio: float) -> list[PruneGroup]:
    """Prune groups of the traced model. ``layers`` are the names of the conv/linear modules
    that can apply an input mask (the converted ones); only they can produce or consume."""
    groups = []
    for name in execution_order(graph):
        if name not in layers:
            continue
        n_groups, rem = divmod(modules[name].weight.shape[0], group_size)
        if getattr(modules[name], "groups", 1) != 1 or rem or int(n_groups * max_prune_ratio) < 1:
            continue
        group = prune_group(graph, modules, layers, name)
        if group is not None:
            groups.append(group)
    return groups


def prune_group(graph: fx.Graph, modules: dict[str, nn.Module], layers: set[str], producer: str) -> PruneGroup | None:
    """The prune group of ``producer``, or None if its output channels cannot be pruned."""
    calls = Counter(execution_order(graph))
    if calls[producer] != 1:
        return None
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == producer)
    group = PruneGroup(producer)
    layout = NCHW if isinstance(modules[producer], nn.Conv2d) else NC
    return group if _follow(node, layout, modules, layers, calls, group) else None


def _follow(start: fx.Node, layout: str, modules, layers, calls, group: PruneGroup) -> bool:
    """Walk every use of ``start``'s output; True iff all end in consumers via channel-wise ops."""
    pending, seen = [(start, layout)], set()
    while pending:
        value, layout = pending.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            if user.all_input_nodes != [value] or user.args[:1] != (value,):
                return False  # e.g. an addition, a concatenation, or the value as a side input
            step = _step(user, layout, modules, layers, calls)
            if step is None:
                return False
            role, next_layout = step
            if role == "consumer":
                group.consumers.append(user.target)
                continue
            if role == "member":
                group.members.append(user.target)
            elif role == "norm":
                group.norms.append(user.target)
            pending.append((user, next_layout))
    return bool(group.consumers)


def _step(node: fx.Node, layout: str, modules, layers, calls) -> tuple[str, str] | None:
    """(role, layout after the node) for a channel-preserving node, None for a barrier."""
    if node.op == "call_module":
        m = modules[node.target]
        if node.target in layers:
            if calls[node.target] != 1:
                return None
            if isinstance(m, nn.Linear):
                return ("consumer", "") if layout == NC else None
            if m.groups == 1:
                return ("consumer", "") if layout in (NCHW, POOLED) else None
            depthwise = m.groups == m.in_channels == m.out_channels
            return ("member", NCHW) if depthwise and layout == NCHW else None
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            fits = layout == NC if isinstance(m, nn.BatchNorm1d) else layout in (NCHW, POOLED)
            return ("norm", layout) if fits and calls[node.target] == 1 else None
        if isinstance(m, _ELEMENTWISE_MODULES):
            return "pass", layout
        if isinstance(m, _LOCAL_POOL_MODULES):
            return ("pass", NCHW) if layout == NCHW else None
        if isinstance(m, _GLOBAL_POOL_MODULES):
            return ("pass", POOLED if m.output_size in (1, (1, 1)) else NCHW) if layout == NCHW else None
        if isinstance(m, nn.Flatten):
            return ("pass", NC) if layout == POOLED and (m.start_dim, m.end_dim) == (1, -1) else None
        return None
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return "pass", layout
        if node.target in _LOCAL_POOL_FUNCTIONS:
            return ("pass", NCHW) if layout == NCHW else None
        if node.target in _GLOBAL_POOL_FUNCTIONS:
            size = _arg(node, 1, "output_size")
            return ("pass", POOLED if size in (1, (1, 1)) else NCHW) if layout == NCHW else None
        if node.target is torch.flatten:
            return _flatten_step(node, layout)
        return None
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return "pass", layout
        if node.target == "flatten":
            return _flatten_step(node, layout)
    return None


def _flatten_step(node: fx.Node, layout: str) -> tuple[str, str] | None:
    dims = (_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
    return ("pass", NC) if layout == POOLED and dims == (1, -1) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
