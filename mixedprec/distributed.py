"""Data-parallel training on torch.distributed: what the training loops need to run under torchrun.

The loops (``sbs.search``/``finetune``, ``opq.finetune``, ``training.fit``) call ``setup`` and
``data_parallel`` themselves, so a script or ``mixedprec compress`` runs unchanged under
``torchrun --nproc-per-node N``: every process joins the group torchrun describes in its
environment (gloo on CPU, nccl on CUDA), trains a DistributedDataParallel copy of the model on
its share of every batch, and only rank 0 logs, shows progress and writes checkpoints. Without
torchrun's environment nothing here does anything.

``batch_size`` stays the global batch: each of W ranks loads batch_size / W examples of every
batch a single process would load (same seed, same order), so a run gives the same result at
any world size (up to float summation order) and resumes from a checkpoint at another one.
See docs/distributed.md.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

# Seconds a collective may wait for the other ranks before this rank gives up (a hung peer; a
# dead one is noticed at once when its connection closes). Override: MIXEDPREC_DIST_TIMEOUT.
DEFAULT_TIMEOUT_S = 300.0


class RankLostError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the network broke."""


def is_active() -> bool:
    """Whether this process is one rank of an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0, or a plain single process: the one that logs and writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group (what torchrun sets for each worker)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def setup(device: torch.device | str = "cpu", timeout_s: float | None = None) -> torch.device:
    """Joins the process group torchrun set up in the environment (once per process) and returns
    the device this rank works on: ``cuda`` becomes ``cuda:LOCAL_RANK``, one GPU per process.

    Backend: nccl for CUDA devices, gloo for the CPU. timeout_s (default MIXEDPREC_DIST_TIMEOUT or
    300) bounds how long any collective waits for the other ranks. Outside torchrun (no RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) it only returns ``device``.
    """
    device = torch.device(device)
    if not (is_active() or launched_by_torchrun()):
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if is_active():
        return device
    if timeout_s is None:
        timeout_s = float(os.environ.get("MIXEDPREC_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"distributed.setup: timeout_s (or MIXEDPREC_DIST_TIMEOUT) must be > 0, got {timeout_s!r}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    atexit.register(_leave)
    return device


def _leave() -> None:
    if is_active():
        dist.destroy_process_group()


def barrier() -> None:
    """Waits for every rank (e.g. while rank 0 prepares files the others read); nothing alone."""
    if is_active():
        dist.barrier()


def data_parallel(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """The module to train: ``model`` wrapped in DistributedDataParallel when a process group is
    active (parameters and buffers start from rank 0's; gradients are averaged), else ``model``.
    Optimizers, checkpoints and model-wide controls keep using ``model`` itself."""
    if not is_active():
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def batches_per_epoch(examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``shuffled_loader``; checks that the world size divides
    the (global) batch size."""
    world = world_size()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is the global batch and must be divisible by the "
                         f"world size {world}")
    return math.ceil(math.ceil(examples / world) / (batch_size // world))


class _EpochShards:
    """Iterating gives one epoch: this rank's share of each global batch (see shuffled_loader)."""

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator | None):
        self.dataset, self.world, self.rank = dataset, world_size(), rank()
        self.steps = batches_per_epoch(len(dataset), batch_size)
        self.rank_batch = batch_size // self.world
        # The loader a single process would use, over positions: it draws from `generator`
        # exactly as that loader does, so the order matches at every world size.
        self.order = DataLoader(range(len(dataset)), batch_size, shuffle=True, generator=generator)

    def __iter__(self):
        # Like any DataLoader iterator, draw the worker seed now and the permutation at the first
        # batch: iterators made and dropped unused (tqdm.auto makes one) then cost the same draws.
        positions = iter(self.order)
        return self._shares(positions)

    def _shares(self, positions):
        shuffled = Subset(self.dataset, torch.cat(list(positions)).tolist())
        # Rank r takes positions r, r + W, ...: its batch k lies inside global batch k. The
        # sampler pads the epoch with its first examples so that every rank gets equal shares.
        sampler = DistributedSampler(shuffled, self.world, self.rank, shuffle=False)
        # (a generator of its own: its worker seed must not come from torch's global one)
        yield from DataLoader(shuffled, self.rank_batch, sampler=sampler, generator=torch.Generator())

    def __len__(self) -> int:
        return self.steps


def shuffled_loader(dataset: Dataset, batch_size: int, generator: torch.Generator | None):
    """Shuffled batches of ``batch_size`` in the order ``DataLoader(shuffle=True, generator=...)``
    gives; under an active process group, this rank's batch_size / W share of each of them."""
    if not is_active():
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    return _EpochShards(dataset, batch_size, generator)


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number over all ranks (the value itself in a single process)."""
    if not is_active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.item() / world_size()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class ProcessGroupStatistics:
    """Batch statistics over every rank (``mixedprec.sbs.BatchStatistics``): what the SBS
    activation quantizers need to take the same gate decision everywhere."""

    def sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t

    def gather(self, t: Tensor) -> Tensor:
        sizes = torch.tensor([t.numel()], device=t.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world_size())]
        dist.all_gather(all_sizes, sizes)
        longest = int(max(s.item() for s in all_sizes))
        padded = torch.cat([t, t.new_zeros(longest - t.numel())])
        parts = [torch.empty_like(padded) for _ in all_sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, all_sizes)])


# How c10d and its transports word a lost or silent peer when they raise a plain RuntimeError
# (gloo does, from DDP's buffer broadcast and gradient reduction too).
_PEER_FAILURE_WORDS = ("gloo", "NCCL", "ProcessGroup", "c10d", "pair closure", "Connection closed",
                       "Connection reset", "Timed out waiting")


def _is_collective_failure(exc: BaseException) -> bool:
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(w in str(exc) for w in _PEER_FAILURE_WORDS))


@contextlib.contextmanager
def failures_named(what: str) -> Iterator[None]:
    """Turns a failed collective inside the block into a RankLostError that says which rank
    stopped where and why that happens, instead of a transport message."""
    try:
        yield
    except Exception as exc:
        if not (is_active() and _is_collective_failure(exc)):
            raise
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RankLostError(f"rank {rank()} of {world_size()} stopped in {what}: a collective with the other "
                            f"ranks failed, so one of them died, hung past the timeout, or lost its connection "
                            f"(see that rank's log): {cause}") from exc
