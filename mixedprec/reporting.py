"""Reports a person reads: per-layer tables of any model (float, SBS, OPQ or packed), the
demo's results table and trade-off plot, and JSON records.

Per layer (``model_report``): weight and activation bits, weights and kept weights, BOPs, bytes
in the packed format (``mixedprec.metrics.packed_layer_bytes``) and the papers' bits.

- BOPs of a layer = kept weights * output positions * b_w * b_a. For dense layers this is the
  SBS count of ``mixedprec.metrics`` (k^2 C_in/groups C_out H_out W_out b_w b_a; SBS layers
  are counted by it directly); unstructured pruning (OPQ) removes the multiplications of its
  pruned weights, as the sparse kernels skip them. Float weights or activations count 32 bits.
- Bytes: compressed layers at their packed size (codes, bitmap, codebook, scales, header);
  float layers at 4 bytes per weight. Rates of a model are taken against a float reference
  (the float model's BOPs and weight bytes) when one is given, else against the same layer
  shapes in float32.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mixedprec.atomic import write_atomically
from mixedprec.metrics import examples
from mixedprec.metrics.bops import COUNTED, layer_bops, layer_shape
from mixedprec.metrics.examples import Example
from mixedprec.metrics.compression import FLOAT_BITS, CompressedWeight, LayerCompression
from mixedprec.sbs.layers import SBSLayer

FLOAT_BYTES = FLOAT_BITS // 8


@dataclass(frozen=True)
class LayerRow:
    name: str
    form: str          # "float", "sbs", "opq" or "packed"
    shape: str         # e.g. "conv 3x3 32->64 /1", "linear 128->10"
    weight_bits: int   # 32: float
    act_bits: int      # 32: float
    weights: int       # weights of the layer as it runs (SBS: pruned channels excluded)
    kept: int          # weights that are not pruned
    positions: int     # output positions per example (H_out * W_out)
    bops: int
    packed_bytes: int  # float layers: 4 bytes per weight
    paper_bits: int    # float layers: 32 bits per weight

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.weights

    @property
    def float_bytes(self) -> int:
        return self.weights * FLOAT_BYTES

    @property
    def float_bops(self) -> int:
        return self.weights * self.positions * FLOAT_BITS * FLOAT_BITS

    @property
    def real_rate(self) -> float:
        return self.float_bytes / self.packed_bytes

    @property
    def paper_rate(self) -> float:
        return self.weights * FLOAT_BITS / max(self.paper_bits, 1)


@dataclass(frozen=True)
class Reference:
    """The float model a compressed one is measured against."""
    bops: int
    weight_bytes: int

    @classmethod
    def of(cls, report: ModelReport) -> Reference:
        return cls(report.bops, report.float_bytes)


@dataclass(frozen=True)
class ModelReport:
    layers: tuple[LayerRow, ...]
    example: str                           # what BOPs count per: "of shape (3, 32, 32)", "int64 (1, 16)"
    example_inputs: list[dict]             # the example tensors' shapes and dtypes (metrics.examples)
    other_float_bytes: int                 # biases, BatchNorm, ...: outside the rates
    reference: Reference | None = field(default=None)

    @property
    def bops(self) -> int:
        return sum(r.bops for r in self.layers)

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

    @property
    def baseline_bytes(self) -> int:
        return self.reference.weight_bytes if self.reference else self.float_bytes

    @property
    def baseline_bops(self) -> int:
        return self.reference.bops if self.reference else sum(r.float_bops for r in self.layers)

    @property
    def bops_reduction(self) -> float:
        return self.baseline_bops / self.bops

    @property
    def real_rate(self) -> float:
        return self.baseline_bytes / self.packed_bytes

    @property
    def paper_rate(self) -> float:
        return self.baseline_bytes * 8 / max(self.paper_bits, 1)

    def table(self) -> str:
        header = ("layer", "form", "shape", "w bits", "a bits", "weights", "sparsity", "BOPs", "packed B",
                  "real x", "paper x")
        rows = [(r.name, r.form, r.shape, _bits(r.weight_bits), _bits(r.act_bits), f"{r.weights:,}",
                 f"{100 * r.sparsity:.1f}%", f"{r.bops:,}", f"{r.packed_bytes:,}", f"{r.real_rate:.2f}",
                 f"{r.paper_rate:.2f}") for r in self.layers]
        weights, kept = sum(r.weights for r in self.layers), sum(r.kept for r in self.layers)
        rows.append(("total", "", "", "", "", f"{weights:,}", f"{100 * (1 - kept / weights):.1f}%", f"{self.bops:,}",
                     f"{self.packed_bytes:,}", f"{self.real_rate:.2f}", f"{self.paper_rate:.2f}"))
        against = ("the float reference model" if self.reference else "the same layer shapes in float32")
        notes = [f"BOPs per example {self.example}: {self.bops:,} "
                 f"({self.bops_reduction:.1f}x fewer than {against}, {self.baseline_bops:,})",
                 f"weights: {self.packed_bytes:,} bytes packed vs {self.baseline_bytes:,} in float32 ({against}): "
                 f"real {self.real_rate:.2f}x, paper {self.paper_rate:.2f}x (bits of kept codes only)"]
        if self.other_float_bytes:
            notes.append(f"other float parameters and buffers (biases, BatchNorm, quantizer clips), not in the rates: "
                         f"{self.other_float_bytes:,} bytes")
        return format_table(header, rows, left=3) + "\n" + "\n".join(notes)

    def to_dict(self) -> dict:
        return {"example_inputs": self.example_inputs, "bops": self.bops, "baseline_bops": self.baseline_bops,
                "bops_reduction": self.bops_reduction, "packed_bytes": self.packed_bytes,
                "paper_bits": self.paper_bits, "baseline_weight_bytes": self.baseline_bytes,
                "real_rate": self.real_rate, "paper_rate": self.paper_rate,
                "other_float_bytes": self.other_float_bytes,
                "reference": None if self.reference is None else asdict(self.reference),
                "layers": [{**asdict(r), "sparsity": r.sparsity, "real_rate": r.real_rate, "paper_rate": r.paper_rate}
                           for r in self.layers]}


def _bits(bits: int) -> str:
    return "fp32" if bits >= FLOAT_BITS else str(bits)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """Aligned text: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


# ---------------------------------------------------------------- per-layer rows

def _packed_classes() -> tuple[type, ...]:
    """The packed layer classes of mixedprec.nn."""
    import mixedprec.nn as packed_nn

    return tuple(getattr(packed_nn, name) for name in ("PackedConv2d", "PackedLinear") if hasattr(packed_nn, name))


def _row(name: str, m: nn.Module, positions: int, packed_types: tuple[type, ...]) -> LayerRow | None:
    """One layer's row; None for modules that hold no conv/linear weight."""
    if packed_types and isinstance(m, packed_types):
        packed = m.packed_weight()
        a_bits = FLOAT_BITS if m.input_quant is None else m.input_quant.current_bits()
        weight = CompressedWeight(packed.numel, packed.out_channels, packed.kept, packed.bits,
                                  packed.channel_scale.dtype, packed.codebook.dtype)
        return _compressed_row(name, "packed", layer_shape(m), weight, a_bits, positions)
    if isinstance(m, SBSLayer):
        w_bits, a_bits = m.bits()
        out, per_group = m.kept_out_channels(), m.kept_in_channels_per_group()
        weights = out * per_group * (m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1)
        bops = int(layer_bops(m, positions))
        if w_bits >= FLOAT_BITS:
            return LayerRow(name, "sbs", layer_shape(m), w_bits, a_bits, weights, weights, positions, bops,
                            weights * FLOAT_BYTES, weights * FLOAT_BITS)
        from mixedprec.sbs.packing import SBS_CODEBOOK_DTYPE, SBS_SCALE_DTYPE  # as pack stores it (lazy: import cycle)

        compressed = LayerCompression.compressed(name, CompressedWeight(weights, out, weights, w_bits, SBS_SCALE_DTYPE,
                                                                        SBS_CODEBOOK_DTYPE))
        return LayerRow(name, "sbs", layer_shape(m), w_bits, a_bits, weights, weights, positions, bops,
                        compressed.packed_bytes, compressed.paper_bits)
    if hasattr(m, "compressed_weight") and isinstance(m, COUNTED):  # OPQ: float activations
        return _compressed_row(name, "opq", layer_shape(m), m.compressed_weight(), FLOAT_BITS, positions)
    if isinstance(m, COUNTED):
        n = m.weight.numel()
        return LayerRow(name, "float", layer_shape(m), FLOAT_BITS, FLOAT_BITS, n, n, positions, n * positions * FLOAT_BITS ** 2,
                        n * FLOAT_BYTES, n * FLOAT_BITS)
    return None


def _compressed_row(name: str, form: str, shape: str, weight: CompressedWeight, a_bits: int, positions: int) -> LayerRow:
    compressed = LayerCompression.compressed(name, weight)
    return LayerRow(name, form, shape, weight.bits, a_bits, weight.numel, weight.kept, positions,
                    weight.kept * positions * weight.bits * a_bits, compressed.packed_bytes, compressed.paper_bits)


def model_report(model: nn.Module, example: Example, reference: Reference | None = None) -> ModelReport:
    """Per-layer bits, sparsity, BOPs and bytes of ``model`` for ``example``: the shape of one input
    (C, H, W) or example tensors (``mixedprec.metrics.examples``). Every conv/linear layer has a
    row, float ones included; a layer the example's forward does not call counts 0 BOPs."""
    packed_types = _packed_classes()
    layers = {name: m for name, m in model.named_modules()
              if (packed_types and isinstance(m, packed_types)) or isinstance(m, COUNTED)}
    if not layers:
        raise ValueError("model report: the model has no conv or linear layer")
    positions = examples.output_positions(model, layers, example, "model report")
    rows = tuple(_row(name, m, positions.get(name, 0), packed_types) for name, m in layers.items())
    # weights and their packed form count in the rates; biases, BatchNorm, quantizer clips do not
    counted = {id(t) for m in layers.values() for t in (*m.buffers(recurse=False), getattr(m, "weight", None))
               if t is not None}
    other = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                if id(t) not in counted and t.dtype.is_floating_point)
    return ModelReport(rows, examples.label(example), examples.describe(example), other, reference)


# ---------------------------------------------------------------- results of several methods

@dataclass
class MethodResult:
    """One point of the demo's comparison."""
    method: str
    top1: float                    # the deployed (packed, saved and reloaded) model
    bops: int
    weight_bytes: int              # conv/linear weights in the packed format
    file_bytes: int                # the saved model file, everything included
    seconds: float                 # wall time of this method's steps
    top1_before_packing: float | None = None
    path: str | None = None
    report: ModelReport | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "report"}
        d["report"] = None if self.report is None else self.report.to_dict()
        return d


def results_table(results: Sequence[MethodResult], baseline: MethodResult) -> str:
    """method | top-1 | BOPs and reduction | bytes on disk and compression | weight rates | wall time."""
    header = ("method", "top-1 %", "top-1 before pack", "BOPs", "BOPs red.", "file bytes", "file x",
              "weights real x", "weights paper x", "wall s")
    rows = []
    for r in results:
        report = r.report
        rows.append((r.method, f"{r.top1:.2f}", "-" if r.top1_before_packing is None else f"{r.top1_before_packing:.2f}",
                     f"{r.bops:,}", f"{baseline.bops / r.bops:.1f}x", f"{r.file_bytes:,}",
                     f"{baseline.file_bytes / r.file_bytes:.2f}x",
                     "-" if report is None else f"{report.real_rate:.2f}x",
                     "-" if report is None else f"{report.paper_rate:.2f}x", f"{r.seconds:.1f}"))
    return format_table(header, rows)


def plot_tradeoff(results: Sequence[MethodResult], path: str | os.PathLike, *, title: str) -> None:
    """Two panels, accuracy vs BOPs and accuracy vs bytes on disk (log x), one marker per method."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    from matplotlib import pyplot as plt

    markers = {"float": ("black", "s"), "uniform 4-bit": ("tab:gray", "D"), "SBS": ("tab:blue", "o"),
               "OPQ": ("tab:orange", "^")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    panels = ((axes[0], "bops", "BOPs per image (log scale)"), (axes[1], "file_bytes", "model file size, bytes (log scale)"))
    lo, hi = min(r.top1 for r in results), max(r.top1 for r in results)
    for ax, attr, xlabel in panels:
        # labels alternate above and below along x, so neighbours' labels do not overlap
        for rank, r in enumerate(sorted(results, key=lambda r: getattr(r, attr))):
            color, marker = markers.get(r.method, ("tab:green", "v"))
            x = getattr(r, attr)
            ax.scatter([x], [r.top1], s=80, color=color, marker=marker, label=r.method, zorder=3)
            ax.annotate(f"{r.top1:.2f}%", (x, r.top1), textcoords="offset points", xytext=(0, 9 if rank % 2 else -15),
                        ha="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 accuracy on the test split (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(max(0.0, math.floor(lo - 1.5)), min(100.0, hi + 1.0) + 0.3)
        xs = [getattr(r, attr) for r in results]
        ax.set_xlim(min(xs) / 2, max(xs) * 4)
    axes[0].set_title("accuracy vs compute (BOPs)")
    axes[1].set_title("accuracy vs size on disk")
    handles, labels = axes[0].get_legend_handles_labels()
    order = [labels.index(r.method) for r in results]  # the methods in the order they ran
    axes[1].legend([handles[i] for i in order], [labels[i] for i in order], loc="lower right", title="method")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: str | os.PathLike, record: dict) -> None:
    """Atomically: a reader never sees a half-written record."""
    write_atomically(path, json.dumps(record, indent=1, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"write_json: cannot store a {type(value).__name__}")
