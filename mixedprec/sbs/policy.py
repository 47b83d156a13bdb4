"""What ``convert`` does to a model: the SBS search space and its switches."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mixedprec.sbs.presets import PRESETS, preset_settings
from mixedprec.sbs.quantizer import ACT_GRIDS, check_candidate_bits


@dataclass(frozen=True)
class SBSPolicy:
    """The search space of ``mixedprec.sbs.convert``.

    weight_bits, act_bits: candidate bitwidths (ascending, each dividing the next).
    quantize: False for a pruning-only search (layers stay float, counted at 32 bits).
    prune: False for a quantization-only search.
    group_size: filters per pruning group (B); a layer whose width it does not divide is not pruned.
    per_group_thresholds: one learnable pruning threshold per group instead of one per layer.
    max_prune_ratio: at most this share of a layer's groups may be pruned.
    first_last_bits: bits of the first and last converted layer (in execution order), not
        searched; None searches them too.
    act_signed: signed activation quantization; None decides per layer from its first batch
        (signed iff that batch has a negative value: images normalized to zero mean, the
        linear bottlenecks of MobileNetV2), False/True forces it for every layer.
    act_grid: the grid of inputs that hold negative values, in every layer but the first in
        execution order (the model's input, e.g. normalized images, which keeps "signed"):
        "signed" (symmetric around 0, no zero level), "unsigned" (negative values clipped to 0),
        "asymmetric" (the unsigned grid shifted by a learnable offset: an exact zero level and
        the unsigned grid's resolution; docs/sbs.md).
        Non-negative inputs always use the unsigned grid.
    weight_clip_init: start value of the weight clip, in units of the weights' std.
    exclude: names of Conv2d/Linear modules to leave as they are.
    """

    weight_bits: tuple[int, ...] = (2, 4, 8)
    act_bits: tuple[int, ...] = (2, 4, 8)
    quantize: bool = True
    prune: bool = True
    group_size: int = 4
    per_group_thresholds: bool = False
    max_prune_ratio: float = 0.5
    first_last_bits: int | None = 8
    act_signed: bool | None = None
    act_grid: str = "signed"
    weight_clip_init: float = 3.0
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalize the sequences to tuples
        set_(self, "weight_bits", check_candidate_bits("SBSPolicy: weight_bits", self.weight_bits))
        set_(self, "act_bits", check_candidate_bits("SBSPolicy: act_bits", self.act_bits))
        set_(self, "exclude", tuple(self.exclude))
        for name in ("quantize", "prune", "per_group_thresholds"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SBSPolicy: {name} must be a bool, got {getattr(self, name)!r}")
        if not self.quantize and not self.prune:
            raise ValueError("SBSPolicy: quantize and prune are both False: nothing to search")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"SBSPolicy: group_size must be an int >= 1, got {self.group_size!r}")
        if not 0.0 < self.max_prune_ratio < 1.0:
            raise ValueError(f"SBSPolicy: max_prune_ratio must be in (0, 1), got {self.max_prune_ratio!r}")
        if self.first_last_bits is not None and not 1 <= self.first_last_bits <= 8:
            raise ValueError(f"SBSPolicy: first_last_bits must be in 1..8 or None, got {self.first_last_bits!r}")
        if self.act_signed is not None and not isinstance(self.act_signed, bool):
            raise ValueError(f"SBSPolicy: act_signed must be a bool or None, got {self.act_signed!r}")
        if self.act_grid not in ACT_GRIDS:
            raise ValueError(f"SBSPolicy: act_grid must be one of {ACT_GRIDS}, got {self.act_grid!r}")
        if self.act_signed is True and self.act_grid == "unsigned":
            raise ValueError("SBSPolicy: act_signed=True asks for signed inputs everywhere, act_grid='unsigned' "
                             "clips them: choose one")
        if not self.weight_clip_init > 0:
            raise ValueError(f"SBSPolicy: weight_clip_init must be > 0, got {self.weight_clip_init!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> SBSPolicy:
        """The settings of the SBS authors' experiments for a family of networks ("cifar-preresnet",
        "imagenet-resnet", "mobilenet-v2"; ``sbs.presets.PRESETS`` gives each value's source),
        with ``overrides`` on top."""
        return cls(**{**preset_settings(name), **overrides})

    PRESET_NAMES = tuple(PRESETS)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SBSPolicy:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"SBSPolicy: unknown fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
