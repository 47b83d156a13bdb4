"""OPQ allocation: every layer's pruning threshold and bitwidth, from the pre-trained weights alone.

Per layer l with N_l weights, keeping K of them at b bits has the Laplace-model error
    E_l(b, K) = P(t) + p D_b,   p = K / N_l,  t = -ln p      (laplace.py, codebooks.py)
(mean squared error per weight of the channel-normalized weights) and a cost C_l(b, K): packed
bytes or the papers' bits (metrics/compression.py). ``allocate`` minimizes sum_l E_l subject to
sum_l C_l <= budget = float size / target_rate through the Lagrangian: per layer minimize
E_l + lambda C_l (closed form: t = sqrt(D_b + lambda N_l dC/dK)), bisect lambda to the budget,
and spend what a jump in the discrete bitwidth leaves unspent by moving the layers that jump
along their own best error-for-cost curve (docs/opq.md, "Allocation").
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixedprec import ops
from mixedprec.nn.attention import unfuse_attention
from mixedprec.nn.targets import COMPRESSIBLE, split_layers
from mixedprec.metrics.compression import FLOAT_BITS, packed_layer_bytes, paper_layer_bits
from mixedprec.opq.channels import channel_scales, keep_mask, threshold_keeping
from mixedprec.opq.codebooks import LEVEL_KINDS, MAX_BITS, layer_codebook, quantization_error
from mixedprec.opq.laplace import pruning_error_for_keep
from mixedprec.opq.plan import LayerPlan, Plan

COST_KINDS = ("packed", "paper")

BIT_CHOICES = tuple(range(1, MAX_BITS + 1))  # every width the packed format holds


@dataclass
class _Layer:
    name: str
    weight: Tensor
    channel_scale: Tensor
    scale_dtype: torch.dtype
    magnitude: Tensor  # |u|, channel-normalized

    @property
    def numel(self) -> int:
        return self.weight.numel()

    def cost(self, kept, bits, kind: str):
        if kind == "paper":
            return paper_layer_bits(kept, bits)
        return packed_layer_bytes(self.numel, self.weight.shape[0], kept, bits, self.scale_dtype).total


class _Choice(NamedTuple):  # per layer: bits, kept and their cost
    bits: np.ndarray
    kept: np.ndarray
    cost: np.ndarray


class _Problem:
    """The layers, the candidate bitwidths with their errors D_b, and the budget."""

    def __init__(self, layers: list[_Layer], bits: np.ndarray, levels: str, cost: str, budget: float):
        self.layers, self.bits, self.cost_kind, self.budget = layers, bits, cost, budget
        self.quant_errors = np.array([quantization_error(int(b), levels) for b in bits])
        # cost of one more kept weight at each bitwidth (bytes or bits)
        self.marginal = bits / 8.0 if cost == "packed" else bits.astype(np.float64)

    def error(self, layer: _Layer, kept: np.ndarray, quant_errors: np.ndarray) -> np.ndarray:
        keep = kept / layer.numel
        return pruning_error_for_keep(keep) + keep * quant_errors

    def _candidates(self, layer: _Layer, sparse_kept: np.ndarray):
        """Every bitwidth twice: sparse with the given kept counts, and dense (no bitmap)."""
        n = layer.numel
        kept = np.concatenate([np.minimum(sparse_kept, n - 1), np.full(len(self.bits), n)])
        bits = np.concatenate([self.bits, self.bits])
        errors = self.error(layer, kept, np.concatenate([self.quant_errors, self.quant_errors]))
        return bits, kept, errors, layer.cost(kept, bits, self.cost_kind)

    def lagrangian(self, lam: float) -> _Choice:
        """Each layer's minimizer of E + lam * C; sparse thresholds t = sqrt(D_b + lam N dC/dK)."""
        picks = []
        for layer in self.layers:
            t = np.sqrt(self.quant_errors + lam * layer.numel * self.marginal)
            bits, kept, errors, cost = self._candidates(layer, np.floor(layer.numel * np.exp(-t)).astype(np.int64))
            i = int(np.argmin(errors + lam * cost))
            picks.append((bits[i], kept[i], cost[i]))
        return _Choice(*map(np.array, zip(*picks)))

    def best_within(self, layer: _Layer, budget: float) -> tuple[int, int, int]:
        """Lowest-error (bits, kept) of one layer costing <= budget (sparse keeps at most the
        error-minimizing e^{-sqrt(D_b)} share), with its cost."""
        n = layer.numel
        lo, hi = np.full(len(self.bits), -1), np.full(len(self.bits), n)  # cost(lo) <= budget < cost(hi)
        while np.any(hi - lo > 1):
            mid = (lo + hi) // 2
            ok = (hi - lo > 1) & (layer.cost(np.clip(mid, 0, n - 1), self.bits, self.cost_kind) <= budget)
            lo, hi = np.where(ok, mid, lo), np.where(ok | (hi - lo <= 1), hi, mid)
        best_sparse = np.floor(n * np.exp(-np.sqrt(self.quant_errors))).astype(np.int64)
        bits, kept, errors, cost = self._candidates(layer, np.minimum(np.maximum(lo, 0), best_sparse))
        affordable = (cost <= budget) & np.concatenate([lo >= 0, np.ones(len(self.bits), bool)])
        if not affordable.any():
            raise AssertionError(f"no allocation of layer {layer.name} fits {budget}")  # callers pass costs of choices
        i = int(np.argmin(np.where(affordable, errors, np.inf)))
        return int(bits[i]), int(kept[i]), int(cost[i])

    def total(self, choice: _Choice) -> float:
        return float(choice.cost.sum())


def _solve_lagrangian(problem: _Problem) -> tuple[_Choice, float]:
    """Smallest multiplier whose allocation fits the budget, then the budget left by the last
    bitwidth jump spent along the jumping layers' best error-for-cost curves."""
    at_zero = problem.lagrangian(0.0)
    if problem.total(at_zero) <= problem.budget:  # the best allocation fits: nothing to trade
        return at_zero, 0.0
    lo, hi = 0.0, 1e-12
    while problem.total(problem.lagrangian(hi)) > problem.budget:
        lo, hi = hi, hi * 2.0
        if hi > 1e30:
            raise AssertionError("the budget was checked reachable before bisection")
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if problem.total(problem.lagrangian(mid)) <= problem.budget else (mid, hi)
    feasible, over = problem.lagrangian(hi), problem.lagrangian(lo)
    moving = np.flatnonzero(feasible.cost != over.cost)

    def fill(theta: float) -> _Choice:
        bits, kept, cost = (a.copy() for a in feasible)
        for i in moving:
            target = feasible.cost[i] + theta * (over.cost[i] - feasible.cost[i])
            bits[i], kept[i], cost[i] = problem.best_within(problem.layers[i], target)
        return _Choice(bits, kept, cost)

    t_lo, t_hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (t_lo + t_hi)
        t_lo, t_hi = (mid, t_hi) if problem.total(fill(mid)) <= problem.budget else (t_lo, mid)
    return fill(t_lo), hi


def _solve_uniform(problem: _Problem) -> _Choice:
    """One bitwidth and one kept share for every layer: the lowest summed error within budget."""
    best = None
    for b, quant_error in zip(problem.bits, problem.quant_errors):
        def choice(keep: float) -> _Choice:
            kept = [layer.numel if keep >= 1.0 else min(int(layer.numel * keep), layer.numel - 1) for layer in problem.layers]
            return _Choice(np.full(len(kept), b), np.array(kept),
                           np.array([layer.cost(k, b, problem.cost_kind) for layer, k in zip(problem.layers, kept)]))

        options = [choice(1.0)]
        lo, hi = 0.0, math.exp(-math.sqrt(quant_error))  # sparse: no more than the error-minimizing share
        if problem.total(choice(lo)) <= problem.budget:
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if problem.total(choice(mid)) <= problem.budget else (lo, mid)
            options.append(choice(lo))
        for option in options:
            if problem.total(option) > problem.budget:
                continue
            error = sum(float(problem.error(l, np.array(k), quant_error)) for l, k in zip(problem.layers, option.kept))
            if best is None or error < best[0]:
                best = (error, option)
    if best is None:
        raise AssertionError("the budget was checked reachable before the search")
    return best[1]


def _check_args(target_rate, bits, cost, levels) -> np.ndarray:
    if isinstance(target_rate, bool) or not isinstance(target_rate, (int, float)) or not math.isfinite(target_rate) \
            or target_rate <= 1.0:
        raise ValueError(f"allocate: target_rate must be a finite number > 1, got {target_rate!r}")
    try:
        bits = sorted(set(bits))
    except TypeError:
        raise ValueError(f"allocate: bits must be an iterable of ints, got {bits!r}") from None
    if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BITS for b in bits):
        raise ValueError(f"allocate: bits must be a non-empty set of ints in 1..{MAX_BITS}, got {bits!r}")
    if cost not in COST_KINDS:
        raise ValueError(f"allocate: cost must be one of {COST_KINDS}, got {cost!r}")
    if levels not in LEVEL_KINDS:
        raise ValueError(f"allocate: levels must be one of {LEVEL_KINDS}, got {levels!r}")
    return np.array(bits, dtype=np.int64)


def _collect(model: nn.Module, exclude: Iterable[str], quiet: bool) -> tuple[list[_Layer], dict[str, int]]:
    """Compressible layers (normalized once), named as ``convert`` will find them (attention made
    of nn.Linear projections), and the conv/linear layers that stay float32."""
    if isinstance(exclude, str):
        exclude = [exclude]
    exclude = set(exclude)
    view = unfused_view(model)
    modules = dict(view.named_modules())
    for name in exclude:
        if type(modules.get(name)) not in COMPRESSIBLE:
            raise ValueError(f"allocate: exclude names {name!r}, which is not a Conv2d or Linear of the model")
    chosen = split_layers(view, "opq.allocate", exclude)
    layers = []
    excluded = {name: m.weight.numel() for name, m in modules.items()
                if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and name not in chosen}
    for name, module in tqdm(list(chosen.items()), desc="OPQ fit", disable=quiet):
        weight = module.weight.detach()
        if weight.is_meta:
            raise ValueError(f"allocate: layer {name!r} has no weight values (meta device); load its weights first")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"allocate: layer {name!r} has non-finite weights (NaN or inf)")
        scale, magnitude, scale_dtype = channel_scales(weight)
        layers.append(_Layer(name, weight, scale, scale_dtype, magnitude))
    if not layers:
        raise ValueError("allocate: model has no Conv2d or Linear layer left to compress")
    return layers, excluded


def unfused_view(model: nn.Module) -> nn.Module:
    """The model as ``convert`` compresses it (attention made of nn.Linear projections), sharing
    the model's parameters and buffers rather than copying them."""
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return model
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, shared)
    unfuse_attention(view)
    return view


def _layer_plan(layer: _Layer, bits: int, kept: int, levels: str) -> LayerPlan:
    """Threshold, mask and fp16 codebook for a (bits, kept) choice; predicted and measured errors."""
    dense = kept == layer.numel
    threshold = 0.0 if dense else threshold_keeping(layer.magnitude, kept)
    mask = keep_mask(layer.magnitude, threshold, dense)
    codebook = torch.tensor(layer_codebook(threshold, bits, levels), dtype=torch.float16).float()
    if not bool((codebook[1:] > codebook[:-1]).all()):
        raise ValueError(f"allocate: layer {layer.name}: fp16 cannot hold its {bits}-bit codebook at "
                         f"threshold {threshold:.4g} with distinct levels")
    device = layer.weight.device
    with torch.no_grad():
        quantized = ops.codebook_quant(layer.weight.float(), codebook.to(device), layer.channel_scale, mask)
    channel_shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    error = ((layer.weight.float() - quantized) * (1.0 / layer.channel_scale).reshape(channel_shape)).square_()
    numel, kept = layer.numel, int(mask.sum())
    keep = kept / numel
    quant_error = float(torch.where(mask, error, 0.0).sum(dtype=torch.float64)) / numel
    prune_error = float(error.sum(dtype=torch.float64)) / numel - quant_error  # y = 0 where pruned
    return LayerPlan(
        name=layer.name, shape=list(layer.weight.shape), bits=bits, kept=kept, dense=dense, threshold=threshold,
        codebook=codebook.tolist(), channel_scale=layer.channel_scale.tolist(),
        scale_dtype=str(layer.scale_dtype).removeprefix("torch."),
        predicted_prune_error=float(pruning_error_for_keep(keep)),
        predicted_quant_error=keep * quantization_error(bits, levels),
        measured_prune_error=prune_error,
        measured_quant_error=quant_error,
    )


def _plan(model, target_rate, bits, cost, levels, exclude, quiet, method: str) -> Plan:
    if not isinstance(model, nn.Module):
        raise ValueError(f"allocate: model must be an nn.Module, got {type(model).__name__}")
    candidate_bits = _check_args(target_rate, bits, cost, levels)
    layers, excluded = _collect(model, exclude, quiet)
    float_numel = sum(l.numel for l in layers) + sum(excluded.values())
    unit_bits = 8 if cost == "packed" else 1  # budget in bytes or bits
    budget = float_numel * FLOAT_BITS / unit_bits / target_rate - sum(excluded.values()) * FLOAT_BITS / unit_bits
    problem = _Problem(layers, candidate_bits, levels, cost, budget)
    floor_cost = sum(min(min(l.cost(0, int(b), cost), l.cost(l.numel, int(b), cost)) for b in candidate_bits)
                     for l in layers)
    if floor_cost > budget:
        reachable = float_numel * FLOAT_BITS / unit_bits / (floor_cost + sum(excluded.values()) * FLOAT_BITS / unit_bits)
        raise ValueError(f"allocate: target_rate {target_rate:g} is out of reach: pruning every weight of the "
                         f"compressed layers or keeping them at the fewest bits gives at most {reachable:.2f}x with cost={cost!r} and these exclusions")
    if method == "opq":
        choice, multiplier = _solve_lagrangian(problem)
    else:
        choice, multiplier = _solve_uniform(problem), float("nan")
    plans = [_layer_plan(layer, int(b), int(k), levels)
             for layer, b, k in tqdm(list(zip(layers, choice.bits, choice.kept)), desc="OPQ quantize", disable=quiet)]
    return Plan(method, float(target_rate), cost, levels, candidate_bits.tolist(), multiplier, plans, excluded)


def allocate(model: nn.Module, target_rate: float, *, bits: Iterable[int] = BIT_CHOICES,
             cost: str = "packed", levels: str = "lloyd", exclude: Iterable[str] = (), quiet: bool = False) -> Plan:
    """OPQ: each Conv2d/Linear layer's sparsity and bitwidth for ``target_rate``, in one shot.

    target_rate: compression of all Conv/Linear weights, counted as ``cost``: "packed" (float32
        bytes over packed bytes with bitmaps, codebooks, scales and headers) or "paper" (32 bits
        per weight over b bits per kept weight). Layers named in ``exclude`` (and conv/linear
        layers other than nn.Conv2d and nn.Linear, named in a warning) stay float32 and are
        counted at that size. Attention layers count as their q/k/v/out projections
        (``mixedprec.nn.attention``), named ``<attention>.q_proj`` etc. in the plan.
    bits: candidate bitwidths (1..8). levels: "lloyd" (Lloyd-Max) or "uniform" codebook levels.
    The result is deterministic; if even the best allocation of every layer fits the budget it is
    returned as is (rate above target).
    """
    return _plan(model, target_rate, bits, cost, levels, exclude, quiet, "opq")


def allocate_uniform(model: nn.Module, target_rate: float, *, bits: Iterable[int] = BIT_CHOICES,
                     cost: str = "packed", levels: str = "lloyd", exclude: Iterable[str] = (),
                     quiet: bool = False) -> Plan:
    """The baseline: the same bitwidth and kept share in every layer, the same budget as ``allocate``."""
    return _plan(model, target_rate, bits, cost, levels, exclude, quiet, "uniform")
