"""Plain training and evaluation loops shared by the float baseline, SBS and OPQ finetuning.

The loss is cross-entropy over classes: logits (N, C) or (N, C, d1, ...) with labels (N, d1, ...)
as ``F.cross_entropy`` takes them, and per-position logits (N, ..., C) with labels (N, ...), as a
language model gives them (logits whose shape minus the last dim is the labels' shape).
Under torchrun, ``fit`` trains data-parallel (mixedprec.distributed) with the same global batches."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mixedprec import checkpoint as checkpoints
from mixedprec import distributed

# Extra loss terms (e.g. SBS's BOPs penalty) get the model and return a scalar tensor.
ExtraLoss = Callable[[nn.Module], Tensor]


def _class_dim(logits: Tensor, labels: Tensor) -> int:
    return -1 if logits.dim() > 2 and labels.shape == logits.shape[:-1] else 1


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy, with the classes in dim 1 or, for per-position logits, the last dim."""
    if _class_dim(logits, labels) == -1:
        return nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())
    return nn.functional.cross_entropy(logits, labels)


def correct(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """(correct top-1 predictions, predictions made), the classes laid out as ``cross_entropy`` takes them."""
    predictions = logits.argmax(_class_dim(logits, labels))
    return int((predictions == labels).sum()), labels.numel()


def seed_everything(seed: int) -> torch.Generator:
    """Seeds torch's global RNG and returns a generator for data order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy in percent; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    hits = total = 0
    for inputs, labels in loader:
        batch_hits, batch_total = correct(model(inputs.to(device)), labels.to(device))
        hits, total = hits + batch_hits, total + batch_total
    model.train(was_training)
    return 100.0 * hits / max(total, 1)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                device: torch.device | str = "cpu", extra_loss: ExtraLoss | None = None,
                scheduler=None, desc: str = "train", quiet: bool = False) -> float:
    """One pass over ``loader`` minimizing CE (+ extra_loss); returns the mean CE.

    ``model`` may be wrapped in DistributedDataParallel (extra_loss gets the module inside)."""
    model.train()
    ce_sum, batches = 0.0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=quiet):
        images, labels = images.to(device), labels.to(device)
        ce = cross_entropy(model(images), labels)
        loss = ce if extra_loss is None else ce + extra_loss(distributed.unwrap(model))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        ce_sum += ce.item()
        batches += 1
    return ce_sum / max(batches, 1)


def fit(model: nn.Module, train_set: Dataset, *, epochs: int, lr: float = 1e-2, batch_size: int = 64,
        weight_decay: float = 5e-4, seed: int = 0, device: torch.device | str = "cpu",
        checkpoint: str | os.PathLike | None = None, phase: str = "training", quiet: bool = False) -> nn.Module:
    """Training with SGD + momentum and a cosine schedule; deterministic for a seed.

    With ``checkpoint``, the state is saved after every epoch (``mixedprec.checkpoint``) and a run
    restarted with the same arguments resumes after the last saved epoch, with the data order and
    results of an uninterrupted run. ``phase`` names the loop in messages and in the checkpoint."""
    device = distributed.setup(device)
    quiet = quiet or not distributed.is_main()
    generator = seed_everything(seed)
    model.to(device)
    loader = distributed.shuffled_loader(train_set, batch_size, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * len(loader), 1))
    history: list[dict] = []
    if checkpoint is not None and os.path.exists(checkpoint):
        history = checkpoints.resume(checkpoint, phase, model, optimizer, scheduler, generator)
    with distributed.failures_named(phase):
        net = distributed.data_parallel(model, device)
        for epoch in tqdm(range(len(history), epochs), desc=phase, disable=quiet, initial=len(history), total=epochs):
            ce = train_epoch(net, loader, optimizer, device=device, scheduler=scheduler, desc=f"epoch {epoch}",
                             quiet=quiet)
            history.append({"phase": phase, "epoch": epoch, "ce": distributed.mean_over_ranks(ce)})
            if checkpoint is not None and distributed.is_main():
                checkpoints.save(checkpoint, phase, model, optimizer, scheduler, history, generator)
    return model
