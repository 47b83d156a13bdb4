"""Drop-in SBS layers: SBSConv2d and SBSLinear.

Each layer quantizes its input activations and its weights with a ``BitSharingQuantizer``
(per-tensor clip value, gate thresholds, candidate bits) and may take part in filter-group
pruning in one of three roles, set up by ``convert`` from the model's data flow:

- producer: owns a ``FilterGroupGate`` over its output filters;
- channel-wise member (a depthwise conv between producer and consumer): its channels follow
  the producer's gate;
- consumer: multiplies the weight columns of its input channels by the producer's mask. The
  layer is linear in its input, so this is the paper's masking of the consumer's input (the
  input of a block's second conv) at weight-sized rather than activation-sized cost, with the
  same gradients. Channels are thus cut exactly where they are consumed, any channel-wise op
  in between (BatchNorm, ReLU, pooling) is irrelevant to the result, and export can remove
  them physically with identical outputs.

Weights are standardized before quantization as in the paper's code, with statistics detached
and taken over kept filters (and kept input channels) only. Unlike the paper's code the
quantized weight is then mapped back, w_hat = mean + std * Q((w - mean) / std): the clip range
is centred on the weights' mean and measured in units of their std, and a converted float
model keeps its function at 8 bits, also in layers with no BatchNorm after them (an MLP, the
classifier). See docs/sbs.md.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixedprec.metrics.examples import in_float_forward
from mixedprec.metrics.report import LayerWeight
from mixedprec.sbs.pruning import FilterGroupGate

# How a packed SBS layer's weight is stored (mixedprec/sbs/packing.py): its levels exact in
# float32, unit channel scales in float16
SBS_CODEBOOK_DTYPE, SBS_SCALE_DTYPE = torch.float32, torch.float16
from mixedprec.sbs.quantizer import BitSharingQuantizer

class LayerRef:
    """A reference to another layer of the same model that is not registered as a submodule."""

    __slots__ = ("layer",)

    def __init__(self, layer: SBSLayer):
        self.layer = layer


class SBSLayer:
    """What SBSConv2d and SBSLinear share; mixed into the nn.Conv2d / nn.Linear subclass."""

    weight: Tensor
    bias: Tensor | None

    def _init_sbs(self, weight_bits: Sequence[int], act_bits: Sequence[int], act_signed: bool | None,
                  weight_clip_init: float, quantize: bool, act_grid: str) -> None:
        device = self.weight.device
        self.w_quant = BitSharingQuantizer(weight_bits, True, weight_clip_init, quantize).to(device)
        self.a_quant = BitSharingQuantizer(act_bits, act_signed, None, quantize, act_grid).to(device)
        self.prune_gate: FilterGroupGate | None = None
        # weights of the float layer, kept through export (which removes pruned channels): the reference of reports
        self.float_weights = self.weight.numel()
        self.input_source: LayerRef | None = None    # producer whose mask this layer's input gets
        self.channel_source: LayerRef | None = None  # producer whose gate selects these channels

    # --- pruning roles (set by convert) ----------------------------------------------------

    def enable_pruning(self, group_size: int, max_prune_ratio: float, per_group_thresholds: bool = False) -> None:
        self.prune_gate = FilterGroupGate(self.weight.shape[0], group_size, max_prune_ratio,
                                          per_group_thresholds).to(self.weight.device)

    def output_gate(self) -> FilterGroupGate | None:
        """The gate that selects this layer's output channels (its own, or its producer's)."""
        if self.prune_gate is not None:
            return self.prune_gate
        return None if self.channel_source is None else self.channel_source.layer.prune_gate

    def input_gate(self) -> FilterGroupGate | None:
        return None if self.input_source is None else self.input_source.layer.prune_gate

    def kept_out_channels(self, differentiable: bool = False) -> Tensor | int:
        gate = self.output_gate()
        return self.weight.shape[0] if gate is None else gate.kept_channels(differentiable)

    def kept_in_channels_per_group(self, differentiable: bool = False) -> Tensor | int:
        gate = self.input_gate()
        return self.weight.shape[1] if gate is None else gate.kept_channels(differentiable)

    # --- forward ---------------------------------------------------------------------------

    def _refresh_gate(self) -> None:
        """A producer decides its keep/prune choice once per forward, before anyone reads it
        (its own weight statistics, members and consumers run after it)."""
        if self.prune_gate is not None:
            self.prune_gate.channel_mask(self.weight)

    def weight_standardization(self) -> tuple[Tensor, Tensor]:
        """Detached mean and std of the weights of kept output filters and kept input channels."""
        w = self.weight.detach()
        out_gate, in_gate = self.output_gate(), self.input_gate()
        if out_gate is not None:
            w = w[out_gate.keep]
        if in_gate is not None:
            w = w[:, in_gate.keep]
        return w.mean(), w.std(correction=int(w.numel() > 1)).clamp_min(1e-12)

    def quantized_weight(self) -> Tensor:
        """mean + std * Q((w - mean) / std), with the columns of pruned input channels
        multiplied by the producer's mask: the weight this layer computes with."""
        w = self.weight
        if self.w_quant.enabled:
            mean, std = self.weight_standardization()
            w = self.w_quant((w - mean) / std) * std + mean
        gate = self.input_gate()
        if gate is None:
            return w
        mask = gate.channel_mask(self.input_source.layer.weight)
        return w * mask.view(1, -1, *([1] * (w.dim() - 2)))

    # --- read-out and control -------------------------------------------------------------

    def bits(self) -> tuple[int, int]:
        """The current hard choice (weight bits, activation bits); 32 where quantization is off."""
        return self.w_quant.current_bits(), self.a_quant.current_bits()

    def report_weight(self) -> LayerWeight:
        """For reports: kept channels at the current hard bits, packed as ``mixedprec.pack`` stores them."""
        w_bits, a_bits = self.bits()
        out = self.kept_out_channels()
        weights = out * self.kept_in_channels_per_group() * math.prod(self.weight.shape[2:])
        return LayerWeight("sbs", weights, weights, out, w_bits, a_bits, self.float_weights, SBS_SCALE_DTYPE,
                           SBS_CODEBOOK_DTYPE)

    def fix(self, weight_bits: int | None = None, act_bits: int | None = None) -> None:
        """Fixed mode: quantize directly at the given (default: current) bits, freeze the gate."""
        self.w_quant.fix(weight_bits)
        self.a_quant.fix(act_bits)
        if self.prune_gate is not None:
            self.prune_gate.fix()

    def project_(self) -> None:
        """Keep parameters valid after an optimizer step (thresholds >= 0, clips > 0, pruning cap)."""
        self.w_quant.project_()
        self.a_quant.project_()
        if self.prune_gate is not None:
            self.prune_gate.project_(self.weight)


class SBSConv2d(SBSLayer, nn.Conv2d):
    """nn.Conv2d with SBS weight/activation quantization and optional filter-group pruning."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 weight_bits: Sequence[int] = (2, 4, 8), act_bits: Sequence[int] = (2, 4, 8),
                 act_signed: bool | None = False, weight_clip_init: float = 3.0, quantize: bool = True,
                 act_grid: str = "signed"):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           bias, padding_mode, device, dtype)
        self._init_sbs(weight_bits, act_bits, act_signed, weight_clip_init, quantize, act_grid)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1

    def forward(self, x: Tensor) -> Tensor:
        if in_float_forward():
            return super().forward(x)
        self._refresh_gate()
        return self._conv_forward(self.a_quant(x), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **sbs_kwargs) -> SBSConv2d:
        """An SBS layer sharing ``conv``'s weight and bias Parameters."""
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, w.device, w.dtype,
                    **sbs_kwargs)
        layer.weight, layer.bias = conv.weight, conv.bias
        return layer

    def to_float(self) -> nn.Conv2d:
        """The plain nn.Conv2d sharing this layer's weight and bias Parameters."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        return conv


class SBSLinear(SBSLayer, nn.Linear):
    """nn.Linear with SBS weight/activation quantization and optional filter-group pruning."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 weight_bits: Sequence[int] = (2, 4, 8), act_bits: Sequence[int] = (2, 4, 8),
                 act_signed: bool | None = False, weight_clip_init: float = 3.0, quantize: bool = True,
                 act_grid: str = "signed"):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_sbs(weight_bits, act_bits, act_signed, weight_clip_init, quantize, act_grid)

    def forward(self, x: Tensor) -> Tensor:
        if in_float_forward():
            return super().forward(x)
        self._refresh_gate()
        return F.linear(self.a_quant(x), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, **sbs_kwargs) -> SBSLinear:
        """An SBS layer sharing ``linear``'s weight and bias Parameters."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype,
                    **sbs_kwargs)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def to_float(self) -> nn.Linear:
        """The plain nn.Linear sharing this layer's weight and bias Parameters."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

