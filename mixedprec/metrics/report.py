"""The one report model of every form of a model (float, SBS, OPQ, packed): per-layer rows and
model totals, with every reduction taken against a float reference.

Each conv/linear layer describes itself through one protocol, ``ReportsWeight.report_weight()``
returning a ``LayerWeight`` (its form, bits, weights as it runs, kept weights, and the weights of
the float layer it came from when it knows them); plain float layers need nothing. This module
imports no method (sbs, opq) and no packed layer: they implement the protocol.

- BOPs of a layer = kept weights * output positions * b_w * b_a. For dense layers this is the
  SBS count (k^2 C_in/groups C_out H_out W_out b_w b_a over kept channels); a layer with pruned
  single weights (OPQ) is credited with the multiplications it skips, and a layer with float
  inputs counts 32 activation bits. Reports say which of these a total contains.
- Bytes: compressed layers at their packed size (``packed_layer_bytes``), float layers at 4
  bytes per weight; the papers' count is the bits of kept codes only.
- Reductions (BOPs, real and paper rates) are taken against a ``Reference``: the float model's
  BOPs and weight bytes, given by the caller (stored in a model's record), or stated by the
  layers themselves when every one knows its float size (float and OPQ layers, SBS layers before
  or after export). Without one a report refuses to give a reduction (``NoReference``) instead
  of measuring against the layers' current, possibly pruned, shapes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mixedprec.metrics import examples
from mixedprec.metrics.bops import COUNTED, layer_shape
from mixedprec.metrics.compression import FLOAT_BITS, packed_layer_bytes, paper_layer_bits
from mixedprec.metrics.examples import Example

FLOAT_BYTES = FLOAT_BITS // 8
BOPS_FLAGS = {"a32": "float activations (32 bits)",
              "sparse": "unstructured sparsity credited (pruned weights' multiplications not counted)"}


class NoReference(ValueError):
    """A reduction was asked of a report that has no float reference."""


@dataclass(frozen=True)
class LayerWeight:
    """What a conv/linear layer reports about itself."""
    form: str                          # "float", "sbs", "opq", "packed"
    weights: int                       # weights of the layer as it runs (SBS: pruned channels excluded)
    kept: int                          # of those, not pruned
    out_channels: int
    weight_bits: int                   # FLOAT_BITS: float32 weights
    act_bits: int                      # FLOAT_BITS: float inputs
    float_weights: int | None          # weights of the float layer it came from; None: not known
    scale_dtype: torch.dtype = torch.float16
    codebook_dtype: torch.dtype = torch.float16


@runtime_checkable
class ReportsWeight(Protocol):
    def report_weight(self) -> LayerWeight: ...


def layer_weight(m: nn.Module) -> LayerWeight:
    """The layer's own description, or a plain float layer's."""
    if isinstance(m, ReportsWeight):
        return m.report_weight()
    n = m.weight.numel()
    return LayerWeight("float", n, n, m.weight.shape[0], FLOAT_BITS, FLOAT_BITS, n)


@dataclass(frozen=True)
class LayerRow:
    name: str
    form: str
    shape: str                 # e.g. "conv 3x3 32->64 /1", "linear 128->10"
    weight_bits: int           # 32: float
    act_bits: int              # 32: float
    weights: int
    kept: int
    positions: int | None      # output positions per example; None: no example was run
    bops: int | None
    packed_bytes: int          # float layers: 4 bytes per weight
    paper_bits: int            # float layers: 32 bits per weight
    float_weights: int | None  # the float layer's weights, when known

    @classmethod
    def of(cls, name: str, shape: str, w: LayerWeight, positions: int | None) -> LayerRow:
        if w.weight_bits >= FLOAT_BITS:
            packed, paper = w.weights * FLOAT_BYTES, w.weights * FLOAT_BITS
        else:
            packed = packed_layer_bytes(w.weights, w.out_channels, w.kept, w.weight_bits, w.scale_dtype,
                                        w.codebook_dtype).total
            paper = int(paper_layer_bits(w.kept, w.weight_bits))
        bops = None if positions is None else w.kept * positions * w.weight_bits * w.act_bits
        return cls(name, w.form, shape, w.weight_bits, w.act_bits, w.weights, w.kept, positions, bops, packed, paper,
                   w.float_weights)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.weights

    @property
    def float_bytes(self) -> int:
        return self.weights * FLOAT_BYTES

    @property
    def float_activations(self) -> bool:
        """Quantized weights with float inputs (OPQ): its BOPs count 32-bit activations."""
        return self.act_bits >= FLOAT_BITS > self.weight_bits

    @property
    def real_rate(self) -> float | None:
        return None if self.float_weights is None else self.float_weights * FLOAT_BYTES / self.packed_bytes

    @property
    def paper_rate(self) -> float | None:
        return None if self.float_weights is None else self.float_weights * FLOAT_BITS / max(self.paper_bits, 1)


@dataclass(frozen=True)
class Reference:
    """The float model a compressed one is measured against: its BOPs per example (None when no
    example was run) and its conv/linear weight bytes in float32."""
    bops: int | None
    weight_bytes: int
    source: str = "the float model"

    @classmethod
    def of(cls, report: ModelReport) -> Reference:
        """The reference a float model's report gives."""
        compressed = [r.name for r in report.layers if r.form != "float"]
        if compressed:
            raise ValueError(f"Reference.of: a reference is a float model's report; layers {compressed[:3]} are not "
                             f"float")
        return cls(report.bops, report.float_bytes)

    @classmethod
    def from_layers(cls, rows: Sequence[LayerRow]) -> Reference | None:
        """The float sizes every layer states about itself; None when one does not know its own."""
        if any(r.float_weights is None for r in rows):
            return None
        bops = None if any(r.positions is None for r in rows) else sum(
            r.float_weights * r.positions * FLOAT_BITS * FLOAT_BITS for r in rows)
        return cls(bops, sum(r.float_weights for r in rows) * FLOAT_BYTES, "the float shapes the layers state")


@dataclass(frozen=True)
class ModelReport:
    layers: tuple[LayerRow, ...]
    example: str | None = None                  # what BOPs count per: "of shape (3, 32, 32)"; None: not counted
    example_inputs: list[dict] = field(default_factory=list)
    other_float_bytes: int = 0                  # biases, BatchNorm, ...: outside the rates
    reference: Reference | None = None          # None: the layers' own statement, if every layer has one

    def __post_init__(self):
        if self.reference is None:
            object.__setattr__(self, "reference", Reference.from_layers(self.layers))

    @property
    def bops(self) -> int | None:
        return None if self.example is None else sum(r.bops for r in self.layers)

    @property
    def packed_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.layers)

    @property
    def paper_bits(self) -> int:
        return sum(r.paper_bits for r in self.layers)

    @property
    def float_bytes(self) -> int:
        """float32 bytes of the layers as they are (for a pruned SBS model: of the kept channels)."""
        return sum(r.float_bytes for r in self.layers)

    def _reference(self, what: str) -> Reference:
        if self.reference is None:
            raise NoReference(f"no float reference: {what} is measured against the float model's BOPs and bytes, "
                              "which this report was not given (pass reference=, or keep the JSON record written "
                              "beside the model file); it is not taken against the layers' current, possibly "
                              "pruned, shapes")
        return self.reference

    @property
    def baseline_bytes(self) -> int:
        return self._reference("the compression rate").weight_bytes

    @property
    def baseline_bops(self) -> int:
        bops = self._reference("the BOPs reduction").bops
        if bops is None or self.bops is None:
            raise NoReference("the BOPs reduction needs BOPs of this model and of its float reference for one example")
        return bops

    @property
    def bops_reduction(self) -> float:
        return self.baseline_bops / self.bops

    @property
    def real_rate(self) -> float:
        return self.baseline_bytes / self.packed_bytes

    @property
    def paper_rate(self) -> float:
        return self.baseline_bytes * 8 / max(self.paper_bits, 1)

    @property
    def bops_flags(self) -> tuple[str, ...]:
        """What the BOPs total counts beyond the dense count, in short: "a32" (float activations
        counted at 32 bits, OPQ), "sparse" (unstructured sparsity credited, OPQ)."""
        return tuple(flag for flag, present in (("a32", any(r.float_activations for r in self.layers)),
                                                ("sparse", any(r.kept < r.weights for r in self.layers))) if present)

    @property
    def bops_counts(self) -> str:
        """What the BOPs total counts, in words (OPQ's differ from SBS's)."""
        return "; ".join(BOPS_FLAGS[f] for f in self.bops_flags) or "dense: kept channels x weight bits x activation bits"

    def _maybe(self, attr: str):
        try:
            return getattr(self, attr)
        except NoReference:
            return None

    def table(self) -> str:
        header = ("layer", "form", "shape", "w bits", "a bits", "weights", "sparsity", "BOPs", "packed B",
                  "real x", "paper x")
        rows = [(r.name, r.form, r.shape, _bits(r.weight_bits), _bits(r.act_bits), f"{r.weights:,}",
                 f"{100 * r.sparsity:.1f}%", _count(r.bops), f"{r.packed_bytes:,}", _rate(r.real_rate),
                 _rate(r.paper_rate)) for r in self.layers]
        weights, kept = sum(r.weights for r in self.layers), sum(r.kept for r in self.layers)
        rows.append(("total", "", "", "", "", f"{weights:,}", f"{100 * (1 - kept / weights):.1f}%", _count(self.bops),
                     f"{self.packed_bytes:,}", _rate(self._maybe("real_rate")), _rate(self._maybe("paper_rate"))))
        notes = []
        if self.bops is not None:
            reduction = self._maybe("bops_reduction")
            notes.append(f"BOPs per example {self.example}: {self.bops:,}; counted: {self.bops_counts}; " + (
                f"{reduction:.1f}x fewer than {self.reference.source} ({self.baseline_bops:,})" if reduction
                else "reduction not shown: no float reference (BOPs of the float model)"))
        if self.reference is None:
            notes.append(f"weights: {self.packed_bytes:,} bytes packed; rates not shown: no float reference (the float "
                         "model's weight bytes; `mixedprec report` reads it from the record beside the file)")
        else:
            notes.append(f"weights: {self.packed_bytes:,} bytes packed vs {self.baseline_bytes:,} in float32 "
                         f"({self.reference.source}): real {self.real_rate:.2f}x, paper {self.paper_rate:.2f}x "
                         f"(bits of kept codes only)")
        if self.other_float_bytes:
            notes.append(f"other float parameters and buffers (biases, BatchNorm, quantizer clips), not in the rates: "
                         f"{self.other_float_bytes:,} bytes")
        return format_table(header, rows, left=3) + "\n" + "\n".join(notes)

    def to_dict(self) -> dict:
        return {"example_inputs": self.example_inputs, "bops": self.bops, "bops_counts": self.bops_counts,
                "baseline_bops": self._maybe("baseline_bops"), "bops_reduction": self._maybe("bops_reduction"),
                "packed_bytes": self.packed_bytes, "paper_bits": self.paper_bits,
                "baseline_weight_bytes": self._maybe("baseline_bytes"), "real_rate": self._maybe("real_rate"),
                "paper_rate": self._maybe("paper_rate"), "other_float_bytes": self.other_float_bytes,
                "reference": None if self.reference is None else asdict(self.reference),
                "layers": [{**asdict(r), "sparsity": r.sparsity, "real_rate": r.real_rate, "paper_rate": r.paper_rate}
                           for r in self.layers]}


def _bits(bits: int) -> str:
    return "fp32" if bits >= FLOAT_BITS else str(bits)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """Aligned text: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def model_report(model: nn.Module, example: Example | None = None, reference: Reference | None = None) -> ModelReport:
    """Per-layer bits, sparsity, BOPs and bytes of ``model``. ``example`` (the shape of one input
    (C, H, W) or example tensors, ``mixedprec.metrics.examples``) gives the BOPs; without one they
    are not counted. Every conv/linear layer has a row, float ones included; a layer the
    example's forward does not call counts 0 BOPs."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (ReportsWeight, *COUNTED))}
    if not layers:
        raise ValueError("model report: the model has no Conv or Linear layer")
    positions = None if example is None else examples.output_positions(model, layers, example, "model report")
    rows = tuple(LayerRow.of(name, layer_shape(m), layer_weight(m), None if positions is None else positions.get(name, 0))
                 for name, m in layers.items())
    # weights and their packed form count in the rates; biases, BatchNorm, quantizer clips do not
    counted = {id(t) for m in layers.values() for t in (*m.buffers(recurse=False), getattr(m, "weight", None))
               if t is not None}
    other = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                if id(t) not in counted and t.dtype.is_floating_point)
    if example is None:
        return ModelReport(rows, None, [], other, reference)
    return ModelReport(rows, examples.label(example), examples.describe(example), other, reference)


def compression_report(model: nn.Module, reference: Reference | None = None) -> ModelReport:
    """The bytes and rates of ``model``'s conv/linear weights, without BOPs (no example run)."""
    return model_report(model, None, reference)
