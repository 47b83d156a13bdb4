"""The allocation result: per layer sparsity, bits, codebook, scales and errors; JSON on disk."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixedprec.atomic import write_atomically
from mixedprec.metrics.compression import FLOAT_BITS
from mixedprec.metrics.report import LayerRow, LayerWeight, ModelReport

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """One compressed layer. Errors are mean squared errors per weight of the channel-normalized
    weights u = w / channel_scale (E[u^2] = 2 under the Laplace model)."""
    name: str
    shape: list[int]
    bits: int
    kept: int                  # weights kept (the rest pruned)
    dense: bool                # nothing pruned: no bitmap stored, threshold unused
    threshold: float           # kept iff |u| >= threshold (normalized units)
    codebook: list[float]      # 2^bits ascending fp16 values, normalized units
    channel_scale: list[float]
    scale_dtype: str           # "float16" or "float32": how channel_scale is stored
    predicted_prune_error: float
    predicted_quant_error: float
    measured_prune_error: float
    measured_quant_error: float

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.numel

    @property
    def predicted_error(self) -> float:
        return self.predicted_prune_error + self.predicted_quant_error

    @property
    def measured_error(self) -> float:
        return self.measured_prune_error + self.measured_quant_error

    def report_weight(self) -> LayerWeight:
        return LayerWeight("opq", self.numel, self.kept, self.shape[0], self.bits, FLOAT_BITS, self.numel,
                           getattr(torch, self.scale_dtype))


@dataclass
class Plan:
    """What ``allocate`` decided for a model; ``convert`` applies it to the same weights."""
    method: str                # "opq" (Lagrangian) or "uniform" (one bits/sparsity for all)
    target_rate: float
    cost: str                  # "packed" (real bytes) or "paper" (bits of kept codes)
    levels: str                # "lloyd" or "uniform" codebook levels
    candidate_bits: list[int]
    lagrange_multiplier: float
    layers: list[LayerPlan]
    excluded: dict[str, int] = field(default_factory=dict)  # name -> numel, stored as float32

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"plan has no compressed layer {name!r}")

    @property
    def report(self) -> ModelReport:
        """Bytes and rates the plan gives (no BOPs: no example is run); excluded layers in float32."""
        floats = (LayerWeight("float", n, n, 1, FLOAT_BITS, FLOAT_BITS, n) for n in self.excluded.values())
        return ModelReport(tuple(LayerRow.of(l.name, "x".join(map(str, l.shape)), l.report_weight(), None)
                                 for l in self.layers)
                           + tuple(LayerRow.of(name, "", w, None) for name, w in zip(self.excluded, floats)))

    @property
    def real_rate(self) -> float:
        return self.report.real_rate

    @property
    def paper_rate(self) -> float:
        return self.report.paper_rate

    def table(self) -> str:
        """Per-layer allocation, predicted against measured errors, and bytes."""
        head = (f"{'layer':<24}{'shape':>18}{'bits':>5}{'sparsity':>9}{'t':>7}{'prune pred/meas':>18}"
                f"{'quant pred/meas':>18}{'bytes':>9}")
        rows = [f"OPQ plan ({self.method}, cost={self.cost}, levels={self.levels}, target {self.target_rate:g}x): "
                f"real {self.real_rate:.2f}x, paper {self.paper_rate:.2f}x", head]
        packed = {l.name: l.packed_bytes for l in self.report.layers}
        for l in self.layers:
            rows.append(f"{l.name:<24}{'x'.join(map(str, l.shape)):>18}{l.bits:>5}{l.sparsity:>9.3f}{l.threshold:>7.3f}"
                        f"{l.predicted_prune_error:>9.4f}/{l.measured_prune_error:<8.4f}"
                        f"{l.predicted_quant_error:>9.4f}/{l.measured_quant_error:<8.4f}{packed[l.name]:>9}")
        rows += [f"{name:<24}{'':>18}{'fp32':>5}{'':>9}{'':>7}{'':>18}{'':>18}{packed[name]:>9}" for name in self.excluded]
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if not isinstance(data, dict):
            raise ValueError(f"Plan: a plan is a dict, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", None)
        if version != PLAN_VERSION:
            raise ValueError(f"Plan: unsupported plan version {version!r} (this mixedprec reads {PLAN_VERSION})")
        try:
            data["layers"] = [LayerPlan(**layer) for layer in data["layers"]]
            return cls(**data)
        except (KeyError, TypeError) as exc:  # a missing, unexpected or mistyped field
            raise ValueError(f"Plan: malformed plan: {type(exc).__name__}: {exc}") from None

    def save(self, path: str | Path) -> None:
        write_atomically(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except ValueError as exc:  # json's JSONDecodeError (a truncated or corrupted file) is one
            raise ValueError(f"Plan.load: {path}: {exc}") from None
