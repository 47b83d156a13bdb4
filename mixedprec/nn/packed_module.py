"""PackedModule: what PackedLinear and PackedConv2d share about holding a packed weight."""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from mixedprec.formats import PackedWeight
from mixedprec.metrics.compression import FLOAT_BITS
from mixedprec.metrics.report import LayerWeight
from mixedprec.nn.int8 import int8_enabled, takes_int8
from mixedprec.ops.backend import call_key

PACKED_BUFFERS = ("codebook", "channel_scale", "codes", "keep_bitmap")  # PackedWeight's order
# Index buffers of earlier versions, named in the module trees of files they saved: dropped on load.
_FORMER_BUFFERS = ("row_code_offsets", "group_code_offsets")


class InferencePlan(NamedTuple):
    """What a layer does to inputs of one ``call_key`` at inference (``PackedModule.inference_call``)."""
    key: tuple
    quant: Callable | None          # the input quantizer's inference call, or None (no quantizer)
    call: Callable | None           # quantizer and kernel as one call; None: forward's general path


class PackedModule(nn.Module):
    """A layer whose weight is a PackedWeight of shape ``weight_shape`` with ``bits``-bit codes.

    Its tensors are buffers (``PACKED_BUFFERS``): they move with the module (``.to(device)``,
    ``.cuda()``), save with it, and no optimizer sees them. A cast of the module
    (``.to(torch.float64)``, ``.half()``) leaves their dtypes as the format fixes them: a cast would
    break the format (float16 or float32 codebook, uint8 codes) and, for float32 scales, lose
    bits. The PackedWeight over the buffers (validated, with the index and float32 tables the
    kernels read) is built once, and again whenever the buffers change: a device move,
    ``load_state_dict``, an assignment (not an in-place edit of a buffer: they are frozen).
    """

    weight_shape: tuple[int, ...]  # set (or computed) by the subclass from its geometry
    bits: int
    # rebuilt from the buffers, or kept for the inputs of the last call; never saved (nn/module_tree.py)
    DERIVED_ATTRIBUTES = ("_packed", "_plan")

    def _set_packed(self, packed: PackedWeight) -> None:
        self.bits = packed.bits
        for name in PACKED_BUFFERS:
            self.register_buffer(name, getattr(packed, name))
        self._packed = packed
    input_quant: nn.Module | None  # set by the subclass: quantizes the layer's inputs (SBS), or None

    def packed_weight(self) -> PackedWeight:
        """The weight as a validated PackedWeight over this layer's buffers."""
        if self._packed is None:
            self._packed = PackedWeight(self.weight_shape, self.bits, *(getattr(self, n) for n in PACKED_BUFFERS))
            self._buffers["keep_bitmap"] = self._packed.keep_bitmap  # PackedWeight's copy of an inference tensor
        return self._packed

    def report_weight(self) -> LayerWeight:
        """For reports (``mixedprec.metrics.report``). The float layer's size is not known here: a
        packed SBS layer's pruned channels are gone; reports take it from a float reference."""
        packed = self.packed_weight()
        a_bits = FLOAT_BITS if self.input_quant is None else self.input_quant.current_bits()
        return LayerWeight("packed", packed.numel, packed.kept, packed.out_channels, packed.bits, a_bits, None,
                           packed.channel_scale.dtype, packed.codebook.dtype)

    def rebuild_derived(self) -> None:
        """Validates the packed buffers and rebuilds the PackedWeight over them (after loading)."""
        for name in _FORMER_BUFFERS:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        self._packed = None
        self.packed_weight()

    def inference_call(self, x: Tensor) -> Callable[[Tensor], Tensor] | None:
        """forward on x, and on every tensor of its ``call_key``, under no_grad or inference_mode
        outside torch.compile: the input quantizer's inference call and the op's prepared call
        (``ops.lut_conv2d_call``, ``lowbit_linear_call``) as one call, kept for the last inputs'
        key. A small layer's argument checks, backend choice and module calls cost more than its
        kernels (the demo's 4-bit SBS layers: ~30 us a layer). None where forward takes its general
        path: autograd, compile, the int8 path, a quantizer with hooks or not at one bitwidth.
        The plan is made again when the key, the quantizer's call or the int8 switch changes, and
        after any assignment to the layer (its packed buffers, bias, geometry, backend; a device
        move or ``load_state_dict``, which rebuild the PackedWeight)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or type(x) is not Tensor:
            return None
        quantizer, quant = self.input_quant, None
        if quantizer is not None:
            if _hooked(quantizer) or not hasattr(quantizer, "inference_call"):
                return None  # called as a module: its hooks run
            quant = quantizer.inference_call(x)
            if quant is None:
                return None
        key = (call_key(x), int8_enabled())
        plan = self.__dict__.get("_plan")
        if plan is None or plan.key != key or plan.quant is not quant:
            plan = self.__dict__["_plan"] = InferencePlan(key, quant, self._plan_call(x, quant))
        return plan.call

    def _plan_call(self, x: Tensor, quant: Callable | None) -> Callable[[Tensor], Tensor] | None:
        """``quant`` then the op's call (None where the int8 path takes x)."""
        if self.input_quant is not None and takes_int8(self, x):
            return None
        op = self.op_call(x if quant is None else quant(x))
        return op if quant is None else lambda x: op(quant(x))

    def op_call(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """The packed op's prepared call (``ops.lut_conv2d_call``, ``ops.lowbit_linear_call``) with
        this layer's weight and arguments for the (quantized) input x."""
        raise NotImplementedError

    def __getstate__(self):  # the plan's calls hold this layer's tensors: a copy makes its own
        return {**super().__getstate__(), "_plan": None}

    def __setattr__(self, name, value):
        self.__dict__.pop("_plan", None)  # the plan holds attributes (bias, geometry, backend)
        if name in PACKED_BUFFERS:
            if isinstance(value, nn.Parameter):
                raise ValueError(f"{type(self).__name__}: {name} is a frozen packed buffer and cannot become a Parameter")
            self.__dict__["_packed"] = None  # rebuilt over the new tensor when next used
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        stored = {name: self._buffers[name] for name in PACKED_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:  # a cast: keep the format's dtype, follow the device
                self._buffers[name] = before.to(after.device)
        if stored:
            self.rebuild_derived()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        loaded = all(prefix + name in state_dict for name in PACKED_BUFFERS if self._buffers.get(name) is not None)
        if len(error_msgs) == errors and loaded:
            try:
                self.rebuild_derived()
            except ValueError as exc:
                error_msgs.append(f"{type(self).__name__} {prefix.rstrip('.') or '<root>'!r}: {exc}")

    def sparsity(self) -> float:
        packed = self.packed_weight()
        return 1.0 - packed.kept / packed.numel


# torch's registries of hooks on every module (register_module_forward_hook, ..._pre_hook): dicts
# that registering and removing change in place; empty ones where a torch version lacks them
_GLOBAL_HOOKS = tuple(getattr(torch_module, name, {}) for name in ("_global_forward_hooks",
                                                                    "_global_forward_pre_hooks"))


def _hooked(module: nn.Module) -> bool:
    """Whether calling module runs forward hooks (its own, or every module's)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or any(_GLOBAL_HOOKS))
