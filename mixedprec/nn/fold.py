"""fold_batchnorm: a packed model's BatchNorm2d layers folded into the packed convs that feed them,
for inference. A conv's output channel c is s_c * (levels conv x) + b_c, and an eval-mode
BatchNorm multiplies channel c by f_c = gamma_c / sqrt(var_c + eps) and adds a shift: both fold
into the packed format's per-channel scale (s_c f_c, stored in float32) and the conv's bias, so
the BatchNorm costs nothing at run time (it was 10-24% of a CPU MobileNetV2's time)."""
from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from mixedprec.nn.packed_conv import PackedConv2d
from mixedprec.nn.packed_module import PackedModule


class FoldedBatchNorm(nn.Identity):
    """Where a BatchNorm2d of ``num_features`` channels (before any pruning) was, once folded into
    the packed conv named ``folded_into``. A file holding one loads into a freshly built model in
    place of its BatchNorm (``STANDS_FOR``); ``float_twin`` puts a BatchNorm back."""

    STANDS_FOR = nn.modules.batchnorm._BatchNorm

    def __init__(self, folded_into: str, num_features: int):
        super().__init__()
        self.folded_into, self.num_features = folded_into, num_features

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into {self.folded_into!r}"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PackedModule) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Folds, in place, every BatchNorm2d whose input is the output of a PackedConv2d and of nothing
    else (both modules called once), and returns the names of the BatchNorms folded.

    For inference: folding uses the running statistics, so every BatchNorm it folds must be in
    eval mode (``model.eval()`` first), and a folded model no longer normalizes with batch
    statistics if trained. Outputs change by float32 rounding only (the product of the two scales
    is rounded once). A BatchNorm is left as it is where a factor gamma / sqrt(var + eps) is not
    positive (the format's scales are), or where torch.fx cannot trace the model (a warning says
    why); save and load keep the folded model (``FoldedBatchNorm`` marks where each BatchNorm was).
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds on untraceable Python; the model stays as it was
        warnings.warn(f"fold_batchnorm: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                      f"no BatchNorm was folded", stacklevel=2)
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        conv = modules.get(source.target) if source.op == "call_module" else None
        if (not isinstance(conv, PackedConv2d) or len(source.users) != 1 or calls[source.target] != 1
                or calls[node.target] != 1):
            continue
        if bn.training:
            raise ValueError(f"fold_batchnorm: BatchNorm {node.target!r} is in training mode; folding uses the running "
                             f"statistics: call model.eval() first")
        if _fold(conv, bn):
            parent, _, attr = node.target.rpartition(".")
            width = getattr(bn, "pruned_from", {}).get("num_features", bn.num_features)
            setattr(modules[parent], attr, FoldedBatchNorm(source.target, width))
            folded.append(node.target)
    return folded


def _fold(conv: PackedConv2d, bn: nn.BatchNorm2d) -> bool:
    """conv's scales and bias absorb bn; False (nothing changed) where they cannot."""
    if bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
        return False
    device = conv.channel_scale.device
    with torch.no_grad():
        factor = torch.rsqrt(bn.running_var.double() + bn.eps)
        shift = -bn.running_mean.double() * factor
        if bn.affine:
            factor, shift = factor * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
        factor, shift = factor.to(device), shift.to(device)
        scale = (conv.channel_scale.double() * factor).float()
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            return False
        bias = shift if conv.bias is None else conv.bias.double() * factor + shift
        if not hasattr(conv, "bias_before_folding"):  # what a freshly built model's conv has (load)
            conv.bias_before_folding = conv.bias is not None
        conv.channel_scale = scale
        conv.bias = nn.Parameter(bias.float())
    return True
