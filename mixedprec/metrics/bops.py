"""Bit-operations (BOPs) of conv and linear layers, as the SBS paper counts them.

Layer BOPs = k_h * k_w * C_in/groups * C_out * H_out * W_out * b_w * b_a (a linear layer:
k = 1 and H_out * W_out = the number of output positions per example, 1 for (N, C) inputs).
Plain float layers count at 32/32 bits; SBS layers at their current hard bits and kept
channels, or, for the loss, with bits and channel counts written through the gates. An SBS layer
is recognized by what it reports (``bits()``, kept channel counts, its quantizers' bits), so that
this module stays below the methods.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixedprec.metrics import examples
from mixedprec.metrics.compression import FLOAT_BITS
from mixedprec.metrics.examples import Example


@dataclass(frozen=True)
class LayerBops:
    """One row of the per-layer BOPs table."""

    name: str
    shape: str          # e.g. "conv 3x3 64->128 /1" or "linear 128->10"
    weight_bits: int
    act_bits: int
    kept_channels: int  # output channels left after pruning
    out_channels: int
    bops: int
    share: float        # of the model's total


COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _searched(m: nn.Module) -> bool:
    """An SBS layer: bits and kept channels of its own (mixedprec.sbs.layers.SBSLayer)."""
    return hasattr(m, "w_quant") and hasattr(m, "kept_out_channels")


def output_positions(model: nn.Module, example: Example) -> dict[str, int]:
    """Output positions per example (H_out * W_out of a conv, positions of a linear) of every
    conv/linear layer, from one float forward of ``example`` (a shape of one example, or
    example tensors: ``mixedprec.metrics.examples``) in eval mode; no state is changed.
    Layers that forward does not call are absent (0 BOPs)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, COUNTED)}
    return examples.output_positions(model, layers, example, "output_positions")


def layer_bops(m: nn.Module, positions: int, *, weight_grad: bool = False, act_grad: bool = False,
               channel_grad: bool = False) -> Tensor | int:
    """BOPs of one conv/linear layer per example. The *_grad switches write the SBS layer's
    weight bits, activation bits and kept channel counts through its gates (differentiable)."""
    kernel = math.prod(m.kernel_size) if hasattr(m, "kernel_size") else 1
    if not _searched(m):
        return kernel * m.weight.shape[1] * m.weight.shape[0] * positions * FLOAT_BITS * FLOAT_BITS
    return (kernel * m.kept_in_channels_per_group(channel_grad) * m.kept_out_channels(channel_grad) * positions
            * m.w_quant.effective_bits(weight_grad) * m.a_quant.effective_bits(act_grad))


def count_bops(model: nn.Module, example: Example | dict[str, int]) -> int:
    """Total BOPs of the model per example: ``example`` is the shape of one input (no batch dim)
    or example tensors with a batch dim (token ids, several inputs; ``metrics.examples``), or
    the ``output_positions`` measured on one."""
    return sum(row.bops for row in bops_table(model, example))


def differentiable_bops(model: nn.Module, positions: dict[str, int], *, weights: bool = True,
                        activations: bool = True) -> Tensor:
    """Total BOPs with SBS bits and kept channels written through the gates of the last
    training forward (DESIGN.md), for the loss lambda * log(BOPs). ``weights``/``activations``
    select which bit gates carry gradient (the search alternates them); channel gates always do.
    ``positions`` comes from ``output_positions``."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, m in model.named_modules():
        if name in positions:  # layers the forward does not call count 0
            total = total + layer_bops(m, positions[name], weight_grad=weights, act_grad=activations,
                                       channel_grad=True)
    return total


def bops_table(model: nn.Module, example: Example | dict[str, int]) -> list[LayerBops]:
    """Per-layer BOPs at the current hard choice: name, shape, bits, kept channels, share. Every
    conv/linear layer has a row; one the example's forward does not call counts 0 BOPs.
    ``example`` may also be the ``output_positions`` already measured (shapes do not change
    while a model trains)."""
    positions = example if isinstance(example, dict) else output_positions(model, example)
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, COUNTED):
            continue
        w_bits, a_bits = m.bits() if _searched(m) else (FLOAT_BITS, FLOAT_BITS)
        kept = m.kept_out_channels() if _searched(m) else m.weight.shape[0]
        rows.append([name, layer_shape(m), w_bits, a_bits, kept, m.weight.shape[0],
                     int(layer_bops(m, positions.get(name, 0)))])
    total = sum(r[-1] for r in rows)
    return [LayerBops(*r, share=r[-1] / total if total else 0.0) for r in rows]


def format_bops_table(rows: Sequence[LayerBops]) -> str:
    """The table as aligned text, with a total line."""
    header = ("layer", "shape", "w bits", "a bits", "kept", "BOPs", "share")
    lines = [(r.name, r.shape, str(r.weight_bits), str(r.act_bits), f"{r.kept_channels}/{r.out_channels}",
              f"{r.bops:,}", f"{100 * r.share:.1f}%") for r in rows]
    lines.append(("total", "", "", "", "", f"{sum(r.bops for r in rows):,}", "100.0%"))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row) -> str:  # names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def layer_shape(m: nn.Module) -> str:
    """A conv/linear layer (float, SBS, OPQ or packed) in a few words: "conv 3x3 64->128 /2"."""
    if hasattr(m, "kernel_size"):
        kernel = "x".join(map(str, m.kernel_size))
        stride = m.stride if isinstance(m.stride, int) else m.stride[0]
        return f"conv {kernel} {m.in_channels}->{m.out_channels} /{stride}" + (f" g{m.groups}" if m.groups > 1 else "")
    return f"linear {m.in_features}->{m.out_features}"
