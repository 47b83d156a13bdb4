"""SBS search and finetuning loops.

Search: minimize CE + lambda * log(BOPs) over weights, clip values and gate thresholds jointly;
weight and activation bit gates learn on alternate steps (the other kind's thresholds are
frozen and its bits enter BOPs as constants, as in the paper's trainer), pruning gates on every
step. After each optimizer step thresholds are projected to >= 0 (pruning thresholds also
capped at max_prune_ratio) and clip values to > 0; thresholds get no weight decay.
Finetune: fix the configuration (bits and kept channels), then train weights and clip values
on CE alone. Both loops checkpoint after every epoch and resume from their checkpoint.

Under torchrun both run data-parallel (mixedprec.distributed): DDP averages the gradients, the
activation quantizers all-reduce their gate statistics, and rank 0 alone logs and checkpoints.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mixedprec import checkpoint as checkpoints
from mixedprec import distributed
# A module import, not a from-import: mixedprec.metrics.bops imports the SBS layers in turn.
from mixedprec.metrics import bops as bops_metrics
from mixedprec.metrics.examples import Example
from mixedprec.sbs.convert import fix_configuration, project_, sbs_layers, set_batch_statistics
from mixedprec.sbs.pruning import FilterGroupGate
from mixedprec.sbs.quantizer import BitSharingQuantizer
from mixedprec.training import cross_entropy, evaluate, make_loader

SEARCH, FINETUNE = "search", "finetune"


def search(model: nn.Module, train_set: Dataset, *, epochs: int, bops_weight: float, lr: float = 0.01,
           batch_size: int = 64, weight_decay: float = 5e-4, momentum: float = 0.9, seed: int = 0,
           device: torch.device | str = "cpu", eval_set: Dataset | None = None,
           checkpoint: str | os.PathLike | None = None, example_inputs: Example | None = None,
           quiet: bool = False) -> list[dict]:
    """Search bits and pruning of a converted model (in place); returns per-epoch logs.

    bops_weight is lambda in CE + lambda * log(BOPs). With ``checkpoint``, state is saved after
    every epoch and a run restarted with the same arguments resumes where it stopped. BOPs are
    counted per example of ``example_inputs`` (a shape or tensors, ``mixedprec.metrics.examples``;
    default: the first training input, so token ids and other non-float inputs just work).
    """
    if not bops_weight >= 0:
        raise ValueError(f"search: bops_weight must be >= 0, got {bops_weight!r}")
    return _train(model, train_set, SEARCH, epochs=epochs, bops_weight=bops_weight, lr=lr, batch_size=batch_size,
                  weight_decay=weight_decay, momentum=momentum, seed=seed, device=device, eval_set=eval_set,
                  checkpoint=checkpoint, example_inputs=example_inputs, quiet=quiet)


def finetune(model: nn.Module, train_set: Dataset, *, epochs: int, lr: float = 0.01, batch_size: int = 64,
             weight_decay: float = 5e-4, momentum: float = 0.9, seed: int = 0, device: torch.device | str = "cpu",
             eval_set: Dataset | None = None, checkpoint: str | os.PathLike | None = None,
             example_inputs: Example | None = None, quiet: bool = False) -> list[dict]:
    """Fix the current configuration of a searched model and finetune it (in place)."""
    fix_configuration(model)
    return _train(model, train_set, FINETUNE, epochs=epochs, bops_weight=0.0, lr=lr, batch_size=batch_size,
                  weight_decay=weight_decay, momentum=momentum, seed=seed, device=device, eval_set=eval_set,
                  checkpoint=checkpoint, example_inputs=example_inputs, quiet=quiet)


def _train(model: nn.Module, train_set: Dataset, phase: str, *, epochs: int, bops_weight: float, lr: float,
           batch_size: int, weight_decay: float, momentum: float, seed: int, device, eval_set: Dataset | None,
           checkpoint, example_inputs: Example | None, quiet: bool) -> list[dict]:
    if not sbs_layers(model):
        raise ValueError(f"{phase}: model has no SBS layers; convert it with mixedprec.sbs.convert first")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{phase}: epochs must be an int >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{phase}: batch_size must be an int >= 1, got {batch_size!r}")
    device = distributed.setup(device)
    steps_per_epoch = distributed.batches_per_epoch(len(train_set), batch_size)
    quiet = quiet or not distributed.is_main()
    model.to(device)
    example = train_set[0][0].unsqueeze(0) if example_inputs is None else example_inputs
    positions = bops_metrics.output_positions(model, example)
    optimizer = torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=momentum > 0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * steps_per_epoch, 1))
    torch.manual_seed(seed)
    history: list[dict] = []
    if checkpoint is not None and os.path.exists(checkpoint):
        history = checkpoints.resume(checkpoint, phase, model, optimizer, scheduler)

    set_batch_statistics(model, distributed.ProcessGroupStatistics() if distributed.is_active() else None)
    try:
        with distributed.failures_named(f"SBS {phase}"):
            # Thresholds whose gates do not learn on a step have requires_grad off, and fixed
            # pruning gates are unused: DDP must look for parameters without gradient.
            net = distributed.data_parallel(model, device, find_unused_parameters=True)
            for epoch in tqdm(range(len(history), epochs), desc=phase, disable=quiet, initial=len(history),
                              total=epochs):
                log = _train_epoch(net, train_set, phase, epoch, steps_per_epoch, optimizer, scheduler,
                                   positions=positions, bops_weight=bops_weight, batch_size=batch_size, seed=seed,
                                   device=device, quiet=quiet)
                log["bops"] = bops_metrics.count_bops(model, positions)
                if eval_set is not None:  # every rank evaluates the whole set: no collectives
                    log["eval_acc"] = evaluate(model, make_loader(eval_set, 256, shuffle=False), device)
                history.append(log)
                if checkpoint is not None and distributed.is_main():
                    checkpoints.save(checkpoint, phase, model, optimizer, scheduler, history)
    finally:
        set_batch_statistics(model, None)
    if phase == SEARCH:
        for quant in _modules_of(model, BitSharingQuantizer):
            quant.thresholds.requires_grad_(True)
    return history


def _train_epoch(net: nn.Module, train_set: Dataset, phase: str, epoch: int, steps_per_epoch: int, optimizer,
                 scheduler, *, positions: dict[str, int], bops_weight: float, batch_size: int, seed: int, device,
                 quiet: bool) -> dict:
    order = torch.Generator().manual_seed(seed + epoch)  # data order depends on (seed, epoch) only
    loader = distributed.shuffled_loader(train_set, batch_size, order)
    net.train()
    ce_sum = 0.0
    for step, (images, labels) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=quiet)):
        ce = train_step(net, images.to(device), labels.to(device), optimizer,
                        positions=positions if phase == SEARCH else None, bops_weight=bops_weight,
                        learn_weights=(epoch * steps_per_epoch + step) % 2 == 0)
        scheduler.step()
        ce_sum += ce.item()
    return {"phase": phase, "epoch": epoch, "ce": distributed.mean_over_ranks(ce_sum / steps_per_epoch)}


def train_step(model: nn.Module, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer, *,
               positions: dict[str, int] | None = None, bops_weight: float = 0.0,
               learn_weights: bool = True) -> Tensor:
    """One optimizer step on CE, followed by the projection of the SBS parameters; returns the CE.

    A search step when ``positions`` (from ``output_positions``) is given: the loss gains
    bops_weight * log(BOPs) and only the weight (learn_weights) or activation bit gates learn.
    ``model`` may be wrapped in DistributedDataParallel: every rank then adds the same BOPs
    term, and DDP's gradient average keeps it once.
    """
    inner = distributed.unwrap(model)
    if positions is not None:
        _learn_gates(inner, weights=learn_weights)
    ce = cross_entropy(model(images), labels)
    loss = ce
    if positions is not None:
        bops = bops_metrics.differentiable_bops(inner, positions, weights=learn_weights,
                                                activations=not learn_weights)
        loss = ce + bops_weight * torch.log(bops)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    project_(inner)
    return ce.detach()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Gate thresholds get no weight decay; everything else (weights, clip values) does."""
    thresholds = [q.thresholds for q in _modules_of(model, BitSharingQuantizer)]
    thresholds += [g.threshold for g in _modules_of(model, FilterGroupGate)]
    ids = {id(t) for t in thresholds}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "weight_decay": weight_decay}, {"params": thresholds, "weight_decay": 0.0}]


def _modules_of(model: nn.Module, kind: type) -> Iterator:
    return (m for m in model.modules() if isinstance(m, kind))


def _learn_gates(model: nn.Module, *, weights: bool) -> None:
    """Weight bit gates learn on one step, activation bit gates on the next."""
    for layer in sbs_layers(model).values():
        layer.w_quant.thresholds.requires_grad_(weights)
        layer.a_quant.thresholds.requires_grad_(not weights)
