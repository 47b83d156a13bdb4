"""OPQConv2d / OPQLinear: frozen mask, codebook and scales over a latent float weight; convert().

The forward pass uses ``ops.codebook_quant(weight, codebook, channel_scale, keep_mask)`` (no
backend argument: the fastest built kernel, else the reference). Only the latent weight (and
the bias) train: the straight-through estimator passes gradients at kept positions, pruned
positions get exactly zero gradient and hold zero, so plain SGD/Adam keep them zero.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mixedprec import ops
from mixedprec.metrics.compression import FLOAT_BITS
from mixedprec.metrics.report import LayerWeight
from mixedprec.nn.attention import keep_off_fused_paths, unfuse_attention
from mixedprec.nn.targets import COMPRESSIBLE
from mixedprec.opq.channels import keep_mask, normalized_magnitude
from mixedprec.opq.plan import LayerPlan, Plan


class _OPQWeight:
    """The compression state shared by both layer types (buffers, so it saves and moves with
    the module; never parameters, so no optimizer touches it)."""
    weight: nn.Parameter

    def _register_compression(self, bits: int, scale_dtype: torch.dtype) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"{type(self).__name__}: bits must be an int in 1..8, got {bits!r}")
        if scale_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"{type(self).__name__}: scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
        self.bits, self.scale_dtype = bits, scale_dtype
        factory = {"device": self.weight.device}
        # placeholders until set_compression (or load_state_dict) fills them: a valid identity-ish state
        self.register_buffer("keep_mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.register_buffer("codebook", torch.linspace(-1.0, 1.0, 1 << bits, **factory))
        self.register_buffer("channel_scale", torch.ones(self.weight.shape[0], **factory))

    @torch.no_grad()
    def set_compression(self, layer: LayerPlan, mask: Tensor) -> None:
        """Install a plan's codebook and scales with its mask; zero the pruned latent weights."""
        if layer.bits != self.bits or tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"{type(self).__name__}: plan layer {layer.name!r} ({layer.bits} bits, shape {layer.shape}) "
                             f"does not fit this layer ({self.bits} bits, shape {list(self.weight.shape)})")
        self.keep_mask.copy_(mask)
        self.codebook.copy_(torch.tensor(layer.codebook))
        self.channel_scale.copy_(torch.tensor(layer.channel_scale))
        self.weight.masked_fill_(~mask, 0.0)

    def quantized_weight(self) -> Tensor:
        return ops.codebook_quant(self.weight, self.codebook, self.channel_scale, self.keep_mask)

    def report_weight(self) -> LayerWeight:
        """For reports: codes for kept weights only, float inputs (OPQ quantizes no activation)."""
        n = self.weight.numel()
        return LayerWeight("opq", n, int(self.keep_mask.sum()), self.weight.shape[0], self.bits, FLOAT_BITS, n,
                           self.scale_dtype)

    def extra_repr(self) -> str:
        sparsity = 1.0 - int(self.keep_mask.sum()) / self.keep_mask.numel()
        return f"{super().extra_repr()}, bits={self.bits}, sparsity={sparsity:.3f}"


class OPQConv2d(_OPQWeight, nn.Conv2d):
    def __init__(self, *args, bits: int, scale_dtype: torch.dtype = torch.float16, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_compression(bits, scale_dtype)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, layer: LayerPlan, mask: Tensor) -> OPQConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                  bits=layer.bits, scale_dtype=getattr(torch, layer.scale_dtype))
        return _copy_float(new, conv, layer, mask)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class OPQLinear(_OPQWeight, nn.Linear):
    def __init__(self, *args, bits: int, scale_dtype: torch.dtype = torch.float16, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_compression(bits, scale_dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, layer: LayerPlan, mask: Tensor) -> OPQLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype,
                  bits=layer.bits, scale_dtype=getattr(torch, layer.scale_dtype))
        return _copy_float(new, linear, layer, mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


def _copy_float(new, float_module: nn.Module, layer: LayerPlan, mask: Tensor):
    with torch.no_grad():
        new.weight.copy_(float_module.weight)
        if float_module.bias is not None:
            new.bias.copy_(float_module.bias)
    new.set_compression(layer, mask)
    new.train(float_module.training)
    return new


def convert(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """Replace each layer the plan compresses by its OPQ layer (a copy of the model by default).

    Attention layers are first made of nn.Linear projections (``mixedprec.nn.attention``), as
    ``allocate`` saw them. Masks are re-derived from the model's weights with the plan's scales and
    thresholds; the plan must come from these weights (its kept counts are checked).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise ValueError(f"convert: plan must be a mixedprec.opq.Plan (from allocate or Plan.load), got {type(plan).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    unfuse_attention(model)
    for layer in plan.layers:
        try:
            module = model.get_submodule(layer.name)
        except AttributeError:
            raise ValueError(f"convert: the model has no module {layer.name!r} named in the plan") from None
        if isinstance(module, _OPQWeight):
            raise ValueError(f"convert: {layer.name!r} is already an OPQ layer")
        if type(module) not in COMPRESSIBLE or list(module.weight.shape) != layer.shape:
            raise ValueError(f"convert: plan layer {layer.name!r} is a {layer.shape} Conv2d/Linear weight, the model "
                             f"has {type(module).__name__} with weight {list(module.weight.shape)}")
        scale = torch.tensor(layer.channel_scale, device=module.weight.device)
        mask = keep_mask(normalized_magnitude(module.weight, scale), layer.threshold, layer.dense)
        if int(mask.sum()) != layer.kept:
            raise ValueError(f"convert: layer {layer.name!r} keeps {int(mask.sum())} weights with the plan's threshold, "
                             f"the plan says {layer.kept}: the plan was computed from other weights")
        cls = OPQConv2d if type(module) is nn.Conv2d else OPQLinear
        new = cls.from_float(module, layer, mask)
        parent_name, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    keep_off_fused_paths(model)
    return model
