"""What the demo and the command line show besides the per-layer report: the comparison of
several methods, the trade-off plot and JSON records.

The report model itself (per-layer rows, totals, the float reference every reduction is taken
against) is ``mixedprec.metrics.report``; its names are re-exported here.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixedprec.atomic import write_atomically
from mixedprec.metrics.report import (BOPS_FLAGS, LayerRow, ModelReport, NoReference, Reference, format_table,  # noqa: F401
                                      model_report)


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
    latency_ms: float | None = None  # the deployed model's forward at batch 1 (metrics.latency)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "report"}
        d["report"] = None if self.report is None else self.report.to_dict()
        return d


def results_table(results: Sequence[MethodResult], baseline: MethodResult) -> str:
    """method | top-1 | BOPs, what they count and the reduction | bytes on disk and compression |
    weight rates | batch-1 latency | wall time. Reductions are against ``baseline``, the float model."""
    header = ("method", "top-1 %", "top-1 before pack", "BOPs", "BOPs count", "BOPs red.", "file bytes", "file x",
              "weights real x", "weights paper x", "b1 ms", "wall s")
    rows = []
    for r in results:
        report = r.report
        counted = "-" if report is None else ", ".join(report.bops_flags) or "dense"
        rows.append((r.method, f"{r.top1:.2f}", "-" if r.top1_before_packing is None else f"{r.top1_before_packing:.2f}",
                     f"{r.bops:,}", counted, f"{baseline.bops / r.bops:.1f}x", f"{r.file_bytes:,}",
                     f"{baseline.file_bytes / r.file_bytes:.2f}x",
                     "-" if report is None else f"{report.real_rate:.2f}x",
                     "-" if report is None else f"{report.paper_rate:.2f}x",
                     "-" if r.latency_ms is None else f"{r.latency_ms:.2f}", f"{r.seconds:.1f}"))
    legend = ("b1 ms: median latency of one forward at batch 1 (the deployed models as reloaded, timed in "
              "alternation); "
              "BOPs count: dense = kept channels x weight bits x activation bits (SBS, float); "
              + "; ".join(f"{flag} = {text}" for flag, text in BOPS_FLAGS.items()) + " (OPQ)")
    return format_table(header, rows) + "\n" + legend


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
