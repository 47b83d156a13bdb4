"""One tensor's bit-sharing quantizer: its clip value, gate thresholds and current bit choice.

A quantizer has three states:
- search (default): the bit-sharing op with learnable gates; in training mode every forward
  records the hard choice in ``chosen_bits`` and keeps the differentiable gates in ``gates``
  for the BOPs term; in eval mode it rounds directly at ``chosen_bits`` (as the paper's code
  does), which equals the gated output because every candidate grid contains the lower ones.
- fixed (``fix()``): rounds directly at one bitwidth, clip still learnable (finetuning).
- disabled (``enabled=False``): identity, counted as 32 bits (pruning-only search).

With ``batch_statistics`` set (data-parallel training: ``mixedprec.sbs.set_batch_statistics``),
what a quantizer decides from its input — the gates and the first batch's clip value and sign —
is decided from the whole batch over every process, so every process decides the same.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from mixedprec import ops
from mixedprec.ops.backend import KERNEL_DTYPES, call_key
from mixedprec.ops.bit_sharing_quant import FixedGrid, fixed_quant_call, fixed_grid as checked_grid
from mixedprec.metrics.compression import FLOAT_BITS
from mixedprec.backends.reference.quant import ste_gate, zero_point

# Grids for inputs that hold negative values (SBSPolicy.act_grid).
ACT_GRIDS = ("unsigned", "signed", "asymmetric")

def check_candidate_bits(name: str, bits: Sequence[int]) -> tuple[int, ...]:
    """Ascending bitwidths in 1..8 where each divides the next (nested grids, DESIGN.md)."""
    try:
        bits = tuple(int(b) for b in bits)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of ints, got {bits!r}") from None
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise ValueError(f"{name} must hold bitwidths in 1..8, got {bits!r}")
    if any(lo >= hi or hi % lo for lo, hi in zip(bits, bits[1:])):
        raise ValueError(f"{name} must be strictly ascending with each bitwidth dividing the next "
                         f"(so that a higher grid contains the lower ones), got {bits!r}")
    return bits


def check_act_grid(grid: str, enabled: bool = True) -> None:
    """A known grid name (every one is supported; ``enabled`` is kept for callers that pass it)."""
    del enabled
    if grid not in ACT_GRIDS:
        raise ValueError(f"act_grid must be one of {ACT_GRIDS}, got {grid!r}")


class BatchStatistics(Protocol):
    """Combines a statistic over the parts of one batch that several processes hold."""

    def sum(self, t: Tensor) -> Tensor:
        """The elementwise sum of every process's ``t`` (same shape on all of them)."""

    def gather(self, t: Tensor) -> Tensor:
        """Every process's 1-D ``t`` (lengths may differ), concatenated in rank order."""


def value_sample(x: Tensor) -> Tensor:
    """x flattened to float32, strided down to at most 2^20 values (torch.quantile's limit;
    a strided sample is plenty for a percentile)."""
    values = x.detach().flatten().float()
    if values.numel() > 1 << 20:
        values = values[:: values.numel() // (1 << 20) + 1]
    return values


def magnitude_sample(x: Tensor) -> Tensor:
    """|x| of ``value_sample``."""
    return value_sample(x).abs()


def initial_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """The asymmetric grid's start from data: clip v = hi - lo and offset o = -lo / v in [0, 1],
    lo and hi the 0.1th and 99.9th percentiles of x widened to hold 0 (v = 1 if they are both 0)."""
    values = value_sample(x)
    lo = torch.quantile(values, 0.001).clamp(max=0.0)
    hi = torch.quantile(values, 0.999).clamp(min=0.0)
    clip = hi - lo
    clip = torch.where(clip > 0, clip, torch.ones_like(clip))
    return clip, (-lo / clip).clamp(0.0, 1.0)


def initial_clip(x: Tensor) -> Tensor:
    """A clip value from data: the 99.9th percentile of |x| (max |x| if that is 0, else 1)."""
    magnitude = magnitude_sample(x)
    q = torch.quantile(magnitude, 0.999)
    peak = magnitude.max()
    return torch.where(q > 0, q, torch.where(peak > 0, peak, torch.ones_like(peak)))


class BitSharingQuantizer(nn.Module):
    """Learnable clip value and gate thresholds around ``ops.bit_sharing_quant``.

    bits: candidate bitwidths (ascending, each dividing the next). signed: True for weights,
    False for activations after ReLU, None to decide from the first batch (signed iff it holds
    a negative value). clip_init: a start value, or None to take it from the first batch.
    negative_grid: the grid when ``signed`` is None and the first batch holds a negative value:
    "signed", "unsigned" (negative values clipped to 0), or "asymmetric": the unsigned grid with a
    learnable ``offset`` (ops.bit_sharing_quant's; clip and offset start from the batch's range,
    ``initial_range``), which keeps an exact zero level. The offset parameter exists whenever the
    grid may become asymmetric (negative_grid="asymmetric", signed=None) and is used only if the
    first batch held a negative value (``asymmetric``); else it stays 0 and unused.
    """

    # Defaults of attributes that files saved before the asymmetric grid do not describe (their
    # modules are rebuilt without running __init__, nn/module_tree.py).
    negative_grid = "signed"
    asymmetric = False
    # caches of fixed_grid() and inference_call(), never saved (nn/module_tree.py)
    DERIVED_ATTRIBUTES = ("_fixed_grid", "_fixed_call")

    def __init__(self, bits: Sequence[int] = (2, 4, 8), signed: bool | None = True,
                 clip_init: float | None = 1.0, enabled: bool = True, negative_grid: str = "signed"):
        super().__init__()
        self.bits = check_candidate_bits("bits", bits)
        if signed is not None and not isinstance(signed, bool):
            raise ValueError(f"BitSharingQuantizer: signed must be a bool or None, got {signed!r}")
        check_act_grid(negative_grid, enabled)
        self.negative_grid = negative_grid
        if clip_init is not None and not clip_init > 0:
            raise ValueError(f"BitSharingQuantizer: clip_init must be > 0 or None, got {clip_init!r}")
        self.enabled = enabled
        self.signed = signed
        self.clip = nn.Parameter(torch.tensor(1.0 if clip_init is None else float(clip_init)))
        self.thresholds = nn.Parameter(torch.zeros(len(self.bits) - 1))
        self.asymmetric = False  # decided with the sign, from the first batch
        if negative_grid == "asymmetric" and signed is None:
            self.offset = nn.Parameter(torch.tensor(0.0))
        else:
            self.register_parameter("offset", None)
        # Thresholds start at 0: every gate is on, the search starts from the highest bitwidth.
        self.register_buffer("chosen_bits", torch.tensor(self.bits[-1]))
        self.register_buffer("bit_choices", torch.tensor(self.bits), persistent=False)
        self.clip_ready = clip_init is not None
        self.fixed_bits: int | None = self.bits[0] if len(self.bits) == 1 else None
        self.gates: Tensor | None = None  # differentiable gates of the last search forward
        self.batch_statistics: BatchStatistics | None = None  # None: this process's input is the batch

    @property
    def searching(self) -> bool:
        return self.enabled and self.fixed_bits is None

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not self.clip_ready:
            self._init_from(x)
        call = self.inference_call(x)
        if call is not None:
            return call(x)
        signed = bool(self.signed)
        options = {}  # the backend: ops.use_backend's choice, else the fastest available
        if self.asymmetric:
            # z0 on the lowest candidate grid whatever bits this call rounds at (fixed, eval): a
            # level of every candidate grid, the same zero level in search and after it
            options["offset"] = zero_point(self.offset, self.bits[0], torch.float32)
        if self.searching and self.training:
            if self.batch_statistics is not None:  # one all-reduce of len(bits) numbers
                options["reduce_residual_sums"] = self.batch_statistics.sum
            result = ops.bit_sharing_quant(x, self.clip, self.thresholds, self.bits, signed, **options)
            self.gates = ste_gate(result.residual_mean, self.thresholds)
            with torch.no_grad():  # index of the highest bitwidth whose gate chain is all on
                self.chosen_bits.copy_(self.bit_choices[result.gates.cumprod(0).sum().long()])
            return result.output
        bits = self.fixed_bits if self.fixed_bits is not None else int(self.chosen_bits)
        return ops.bit_sharing_quant(x, self.clip, self.thresholds[:0], (bits,), signed, **options).output

    @torch.no_grad()
    def _init_from(self, x: Tensor) -> None:
        stats = self.batch_statistics
        if self.signed is None:
            negative = (x < 0).any().reshape(1).double()
            has_negative = bool((negative if stats is None else stats.sum(negative)) > 0)
            self.signed = has_negative and self.negative_grid == "signed"
            self.asymmetric = has_negative and self._parameters.get("offset") is not None
        if self.asymmetric:
            sample = value_sample(x)
            clip, offset = initial_range(sample if stats is None else stats.gather(sample))
            self.clip.copy_(clip)
            self.offset.copy_(offset)
            self.clip_ready = True
            return
        sample = magnitude_sample(x)
        self.clip.copy_(initial_clip(sample if stats is None else stats.gather(sample)))
        self.clip_ready = True

    def current_bits(self) -> int:
        """The hard choice: the fixed bitwidth, the last search choice, or 32 when disabled."""
        if not self.enabled:
            return FLOAT_BITS
        return self.fixed_bits if self.fixed_bits is not None else int(self.chosen_bits)

    def inference_call(self, x: Tensor) -> Callable[[Tensor], Tensor] | None:
        """What forward does to x, and to every tensor of its ``call_key``, at inference (no_grad or
        inference_mode, not compiling) at one bitwidth: ``fixed_quant``'s call on ``fixed_grid()``
        (the grid checked once, the arguments too), kept while both hold; the identity when
        disabled. None where forward takes the op: autograd, torch.compile, float64, a search in
        training, a clip value still to be set from the first batch."""
        if not self.enabled:
            return _unchanged
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or x.dtype not in KERNEL_DTYPES:
            return None
        grid = self.fixed_grid()
        if grid is None:
            return None
        key = call_key(x)
        cached = self.__dict__.get("_fixed_call")
        if cached is None or cached[0] is not grid or cached[1] != key:
            cached = self.__dict__["_fixed_call"] = (grid, key, fixed_quant_call(x, grid))
        return cached[2]

    def fixed_grid(self) -> FixedGrid | None:
        """The grid forward rounds to when it rounds at one bitwidth (fixed, or a search in eval
        mode) with its sign and clip value decided; else None (disabled, searching in training)."""
        if not self.enabled or not self.clip_ready or self.signed is None or (self.searching and self.training):
            return None
        # made again when the bitwidth, the sign or a parameter changes (replaced, moved, written)
        clip, offset = self.clip, self.offset if self.asymmetric else None
        key = (self.current_bits(), bool(self.signed), _identity(clip), _identity(offset))
        cached = self.__dict__.get("_fixed_grid")
        if cached is None or cached[0] != key:
            z0 = None if offset is None else zero_point(offset.detach(), self.bits[0], torch.float32)
            cached = self.__dict__["_fixed_grid"] = (key, checked_grid(clip, key[0], key[1], z0))
        return cached[1]

    def effective_bits(self, differentiable: bool) -> Tensor | int:
        """b_1 + sum_j (g_2 ... g_j)(b_j - b_{j-1}): the bitwidth written through the gates.

        Differentiable only while searching and after a training forward; else the hard choice.
        """
        if not (differentiable and self.searching and self.gates is not None):
            return self.current_bits()
        steps = self.bit_choices.diff().to(self.gates.dtype)
        return self.bits[0] + (self.gates.cumprod(0) * steps).sum()

    def fix(self, bits: int | None = None) -> None:
        """Quantize directly at ``bits`` (default: the current choice) from now on."""
        if not self.enabled:
            return
        bits = self.current_bits() if bits is None else int(bits)
        if not 1 <= bits <= 8:
            raise ValueError(f"BitSharingQuantizer.fix: bits must be in 1..8, got {bits}")
        self.fixed_bits = bits
        self.chosen_bits.fill_(bits)
        self.gates = None

    @torch.no_grad()
    def project_(self, min_clip: float = 1e-4) -> None:
        """Keep parameters valid after an optimizer step: thresholds >= 0, clip > 0, offset in [0, 1]."""
        self.thresholds.clamp_(min=0.0)
        self.clip.clamp_(min=min_clip)
        if self._parameters.get("offset") is not None:
            self.offset.clamp_(0.0, 1.0)

    # Python-side state travels in the state dict, so a saved search or finetune resumes as is.
    def get_extra_state(self) -> dict:
        return {"signed": self.signed, "clip_ready": self.clip_ready, "fixed_bits": self.fixed_bits,
                "asymmetric": self.asymmetric}

    def set_extra_state(self, state: dict) -> None:
        self.signed, self.clip_ready, self.fixed_bits = state["signed"], state["clip_ready"], state["fixed_bits"]
        self.asymmetric = state.get("asymmetric", False)  # absent in files saved before the grid existed

    def _load_from_state_dict(self, state_dict, prefix, *args):
        load_optional_state(super()._load_from_state_dict, state_dict, prefix, *args)

    def __getstate__(self):  # the gates hold this step's graph, the statistics a process group
        return {**super().__getstate__(), "gates": None, "batch_statistics": None,
                **dict.fromkeys(self.DERIVED_ATTRIBUTES)}

    def extra_repr(self) -> str:
        mode = "disabled" if not self.enabled else (
            f"fixed={self.fixed_bits}" if self.fixed_bits is not None else f"bits={self.bits}")
        return f"{mode}, signed={self.signed}" + (", asymmetric" if self.asymmetric else "")


def _unchanged(x: Tensor) -> Tensor:
    return x


def _identity(t: Tensor | None) -> tuple | None:
    """Which tensor, which write of it, which storage (a move swaps ``.data`` in place). A tensor
    made under inference_mode (a model built or loaded there) has no version counter, and can be
    written in place there: its value stands for the write (a host read per call)."""
    if t is None:
        return None
    return (id(t), t.data_ptr(), t.tolist() if t.is_inference() else t._version)


def load_optional_state(load, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """Load a module's SBS-only state, tolerating its total absence (a float checkpoint).

    When none of the module's keys are present, the missing ones are not reported, so that
    ``load_state_dict(float_model.state_dict())`` works on a converted model with strict=True.
    """
    before = len(missing_keys)
    load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    if not any(k.startswith(prefix) for k in state_dict):
        del missing_keys[before:]
