"""Pruning as 0-bit: a learnable keep/prune gate per group of B output filters.

Group c of a layer's filters is kept iff mean|w_c| / max|w| > alpha_p (DESIGN.md), with one
learnable alpha_p per layer (default) or one per group (``per_group_thresholds``, as the SBS
authors' reference code does on ImageNet ResNets). The hard
decision is used forward and the sigmoid's gradient backward, like the bit gates; as in the
paper's code the group norms are not detached, so the BOPs term also pulls on the weights of
weak groups. The mask is applied where the pruned channels are consumed (see layers.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mixedprec.sbs.quantizer import load_optional_state


def group_norms(weight: Tensor, group_size: int) -> Tensor:
    """mean|w_c| / max|w| for each group c of ``group_size`` consecutive output filters."""
    return weight.reshape(weight.shape[0] // group_size, -1).abs().mean(1) / weight.abs().max()


class FilterGroupGate(nn.Module):
    """Keep/prune gates for the output filters of one layer, in groups of ``group_size``.

    At most ``floor(n_groups * max_prune_ratio)`` groups are pruned: ``project_`` caps the
    threshold (each group's threshold, with ``per_group_thresholds``) at that group's norm after
    each optimizer step, as the paper's trainer does: a group stronger than the cap is kept.
    """

    def __init__(self, out_channels: int, group_size: int, max_prune_ratio: float,
                 per_group_thresholds: bool = False):
        super().__init__()
        if group_size < 1 or out_channels % group_size:
            raise ValueError(f"FilterGroupGate: group_size must be >= 1 and divide out_channels="
                             f"{out_channels}, got {group_size}")
        if not 0.0 < max_prune_ratio < 1.0:
            raise ValueError(f"FilterGroupGate: max_prune_ratio must be in (0, 1), got {max_prune_ratio}")
        self.group_size = group_size
        self.n_groups = out_channels // group_size
        self.max_pruned = int(self.n_groups * max_prune_ratio)
        if self.max_pruned < 1:
            raise ValueError(f"FilterGroupGate: {self.n_groups} groups with max_prune_ratio="
                             f"{max_prune_ratio} allow no group to be pruned")
        if not isinstance(per_group_thresholds, bool):
            raise ValueError(f"FilterGroupGate: per_group_thresholds must be a bool, got {per_group_thresholds!r}")
        self.per_group_thresholds = per_group_thresholds
        self.threshold = nn.Parameter(torch.zeros((self.n_groups,) if per_group_thresholds else ()))
        self.register_buffer("keep", torch.ones(out_channels, dtype=torch.bool))
        self.fixed = False
        self.group_gates: Tensor | None = None  # differentiable gates of the last search forward

    def channel_mask(self, weight: Tensor) -> Tensor:
        """A 0/1 value per output channel; while searching in training mode, differentiable
        with respect to the threshold (and the weights). Records the hard choice in ``keep``."""
        if self.fixed:
            return self.keep.to(weight.dtype)
        norms = group_norms(weight, self.group_size)
        soft = torch.sigmoid(norms - self.threshold)
        gates = (norms > self.threshold).to(soft.dtype) + (soft - soft.detach())
        with torch.no_grad():
            self.keep.copy_(gates.detach().repeat_interleave(self.group_size) > 0.5)
        if self.training:
            self.group_gates = gates
        return gates.repeat_interleave(self.group_size)

    def kept_channels(self, differentiable: bool) -> Tensor | int:
        """Number of kept channels: B * sum of the group gates, or the hard count."""
        if differentiable and not self.fixed and self.group_gates is not None:
            return self.group_size * self.group_gates.sum()
        return int(self.keep.sum())

    def fix(self) -> None:
        """Freeze the current keep/prune choice (``keep``) for finetuning and export."""
        self.fixed = True
        self.group_gates = None

    @property
    def n_thresholds(self) -> int:
        return self.threshold.numel()

    @torch.no_grad()
    def project_(self, weight: Tensor) -> None:
        """Threshold(s) into [0, norm of the max_pruned-th weakest group]."""
        norms = group_norms(weight.detach(), self.group_size)
        cap = norms.kthvalue(self.max_pruned).values
        self.threshold.copy_(self.threshold.clamp(min=0.0).minimum(cap))

    def get_extra_state(self) -> dict:
        return {"fixed": self.fixed}

    def set_extra_state(self, state: dict) -> None:
        self.fixed = state["fixed"]

    def _load_from_state_dict(self, state_dict, prefix, *args):
        load_optional_state(super()._load_from_state_dict, state_dict, prefix, *args)

    def __getstate__(self):  # the gates hold this step's graph: not copied or pickled
        return {**self.__dict__, "group_gates": None}

    def extra_repr(self) -> str:
        return (f"groups={self.n_groups}x{self.group_size}, thresholds={self.n_thresholds}, "
                f"max_pruned={self.max_pruned}, fixed={self.fixed}")
