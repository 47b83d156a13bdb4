"""Plain training and evaluation loops shared by the float baseline, SBS and OPQ finetuning.

Under torchrun, ``fit`` trains data-parallel (mixedprec.distributed) with the same global batches."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mixedprec import distributed

# Extra loss terms (e.g. SBS's BOPs penalty) get the model and return a scalar tensor.
ExtraLoss = Callable[[nn.Module], Tensor]


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
    correct = total = 0
    for images, labels in loader:
        logits = model(images.to(device))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                device: torch.device | str = "cpu", extra_loss: ExtraLoss | None = None,
                scheduler=None, desc: str = "train", quiet: bool = False) -> float:
    """One pass over ``loader`` minimizing CE (+ extra_loss); returns the mean CE.

    ``model`` may be wrapped in DistributedDataParallel (extra_loss gets the module inside)."""
    model.train()
    ce_sum, batches = 0.0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=quiet):
        images, labels = images.to(device), labels.to(device)
        ce = nn.functional.cross_entropy(model(images), labels)
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
        quiet: bool = False) -> nn.Module:
    """Float training with SGD + momentum and a cosine schedule; deterministic for a seed."""
    device = distributed.setup(device)
    quiet = quiet or not distributed.is_main()
    generator = seed_everything(seed)
    model.to(device)
    loader = distributed.shuffled_loader(train_set, batch_size, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    with distributed.failures_named("training"):
        net = distributed.data_parallel(model, device)
        for epoch in tqdm(range(epochs), desc="float training", disable=quiet):
            train_epoch(net, loader, optimizer, device=device, scheduler=scheduler, desc=f"epoch {epoch}",
                        quiet=quiet)
    return model
