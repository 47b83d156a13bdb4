"""Bit-operations (BOPs) of conv and linear layers, as the SBS paper counts them.

Layer BOPs = k_h * k_w * C_in/groups * C_out * H_out * W_out * b_w * b_a (a linear layer:
k = 1 and H_out * W_out = the number of output positions per example, 1 for (N, C) inputs).
Plain float layers count at 32/32 bits; SBS layers at their current hard bits and kept
channels, or, for the loss, with bits and channel counts written through the gates.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixedprec.sbs.layers import SBSLayer, float_forward
from mixedprec.sbs.quantizer import FLOAT_BITS


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


def _is_counted(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


@torch.no_grad()
def output_positions(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Output positions per example (H_out * W_out) of every conv/linear layer, from one float
    forward of a zero input of shape (1, *input_shape) in eval mode (no state is changed)."""
    if not input_shape or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ValueError(f"output_positions: input_shape must be the positive dims of one example "
                         f"(no batch dim), got {tuple(input_shape)!r}")
    positions: dict[str, int] = {}

    def record(name: str, module: nn.Module, _inputs, out: Tensor) -> None:
        positions[name] = (out[..., 0].numel() // out.shape[0] if isinstance(module, nn.Linear)
                           else out.shape[-2] * out.shape[-1])

    hooks = [m.register_forward_hook(functools.partial(record, name))
             for name, m in model.named_modules() if _is_counted(m)]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with float_forward():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return positions


def layer_bops(m: nn.Module, positions: int, *, weight_grad: bool = False, act_grad: bool = False,
               channel_grad: bool = False) -> Tensor | int:
    """BOPs of one conv/linear layer per example. The *_grad switches write the SBS layer's
    weight bits, activation bits and kept channel counts through its gates (differentiable)."""
    kernel = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
    if not isinstance(m, SBSLayer):
        return kernel * m.weight.shape[1] * m.weight.shape[0] * positions * FLOAT_BITS * FLOAT_BITS
    return (kernel * m.kept_in_channels_per_group(channel_grad) * m.kept_out_channels(channel_grad) * positions
            * m.w_quant.effective_bits(weight_grad) * m.a_quant.effective_bits(act_grad))


def count_bops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Total BOPs of the model per example of shape ``input_shape`` (no batch dim)."""
    return sum(row.bops for row in bops_table(model, input_shape))


def differentiable_bops(model: nn.Module, positions: dict[str, int], *, weights: bool = True,
                        activations: bool = True) -> Tensor:
    """Total BOPs with SBS bits and kept channels written through the gates of the last
    training forward (DESIGN.md), for the loss lambda * log(BOPs). ``weights``/``activations``
    select which bit gates carry gradient (the search alternates them); channel gates always do.
    ``positions`` comes from ``output_positions``."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, m in model.named_modules():
        if _is_counted(m):
            total = total + layer_bops(m, positions[name], weight_grad=weights, act_grad=activations,
                                       channel_grad=True)
    return total


def bops_table(model: nn.Module, input_shape: Sequence[int]) -> list[LayerBops]:
    """Per-layer BOPs at the current hard choice: name, shape, bits, kept channels, share."""
    positions = output_positions(model, input_shape)
    rows = []
    for name, m in model.named_modules():
        if not _is_counted(m):
            continue
        w_bits, a_bits = m.bits() if isinstance(m, SBSLayer) else (FLOAT_BITS, FLOAT_BITS)
        kept = m.kept_out_channels() if isinstance(m, SBSLayer) else m.weight.shape[0]
        rows.append([name, _shape(m), w_bits, a_bits, kept, m.weight.shape[0], int(layer_bops(m, positions[name]))])
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


def _shape(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return f"conv {kh}x{kw} {m.in_channels}->{m.out_channels} /{m.stride[0]}" + (
            f" g{m.groups}" if m.groups > 1 else "")
    return f"linear {m.in_features}->{m.out_features}"
