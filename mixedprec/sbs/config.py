"""The chosen configuration per layer: read it off, save it as readable JSON, re-apply it."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from mixedprec.atomic import write_atomically
from mixedprec.sbs.convert import sbs_layers
from mixedprec.sbs.layers import SBSLayer

CONFIG_FORMAT = "mixedprec.sbs.config/1"


@dataclass(frozen=True)
class LayerReport:
    """What one SBS layer computes with, at its current hard choice.

    The fake-quantized weight is weight_mean + weight_std * Q((w - weight_mean) / weight_std)
    with Q at ``weight_bits`` and clip ``weight_clip`` (signed grid); inputs are quantized at
    ``act_bits`` with clip ``act_clip``. Channel indices refer to the unpruned layer; None
    means all channels are kept.
    """

    kind: str                      # "conv2d" or "linear"
    weight_bits: int               # 32: quantization off
    act_bits: int
    act_signed: bool | None
    weight_clip: float             # in units of weight_std
    act_clip: float
    weight_mean: float
    weight_std: float
    out_channels: int
    kept_out_channels: list[int] | None
    kept_in_channels: list[int] | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def describe(model: nn.Module) -> dict[str, LayerReport]:
    """A LayerReport for every SBS layer of ``model``, by name."""
    return {name: _report(layer) for name, layer in sbs_layers(model).items()}


def _report(layer: SBSLayer) -> LayerReport:
    mean, std = layer.weight_standardization()
    out_gate, in_gate = layer.output_gate(), layer.input_gate()
    return LayerReport(
        kind="conv2d" if isinstance(layer, nn.Conv2d) else "linear",
        weight_bits=layer.w_quant.current_bits(), act_bits=layer.a_quant.current_bits(),
        act_signed=layer.a_quant.signed, weight_clip=float(layer.w_quant.clip), act_clip=float(layer.a_quant.clip),
        weight_mean=float(mean), weight_std=float(std), out_channels=layer.weight.shape[0],
        kept_out_channels=None if out_gate is None else out_gate.keep.nonzero().flatten().tolist(),
        kept_in_channels=None if in_gate is None else in_gate.keep.nonzero().flatten().tolist())


def save_config(model: nn.Module, path: str | os.PathLike, **summary) -> dict:
    """Write the configuration of every SBS layer as JSON (plus ``summary`` entries such as
    BOPs or accuracy); returns what was written."""
    config = {"format": CONFIG_FORMAT, **summary,
              "layers": {name: r.to_dict() for name, r in describe(model).items()}}
    write_atomically(path, json.dumps(config, indent=1))
    return config


def load_config(path: str | os.PathLike) -> dict:
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"load_config: {path} is not a JSON file (truncated or corrupted?): {exc}") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"load_config: {path} is not an SBS configuration (format {found!r}, expected {CONFIG_FORMAT!r})")
    return config


def apply_config(model: nn.Module, config: dict | str | os.PathLike) -> None:
    """Fix every SBS layer of a converted model at the configuration's bits and kept channels.

    Clip values are learned parameters and come with the state dict, not from here.
    """
    if not isinstance(config, dict):
        config = load_config(config)
    layers, entries = sbs_layers(model), config.get("layers", {})
    if set(layers) != set(entries):
        raise ValueError(f"apply_config: layer names differ; only in the model: {sorted(set(layers) - set(entries))}, "
                         f"only in the config: {sorted(set(entries) - set(layers))}")
    for name, entry in entries.items():
        _apply(name, layers[name], entry)


def _apply(name: str, layer: SBSLayer, entry: dict) -> None:
    for key, quant in (("weight_bits", layer.w_quant), ("act_bits", layer.a_quant)):
        allowed = quant.bits if quant.enabled else (32,)
        if entry[key] not in allowed:
            raise ValueError(f"apply_config: layer {name!r}: {key}={entry[key]} is not among its choices {allowed}")
    kept = entry["kept_out_channels"]
    if layer.prune_gate is not None:
        keep = torch.zeros_like(layer.prune_gate.keep)
        keep[kept if kept is not None else slice(None)] = True
        layer.prune_gate.keep.copy_(keep)
    elif kept is not None and layer.channel_source is None:
        raise ValueError(f"apply_config: layer {name!r} prunes channels but has no pruning gate in this model")
    layer.a_quant.signed = entry["act_signed"]
    layer.fix(entry["weight_bits"] if layer.w_quant.enabled else None,
              entry["act_bits"] if layer.a_quant.enabled else None)
