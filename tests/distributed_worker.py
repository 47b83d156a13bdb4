"""One rank of the data-parallel runs of tests/test_distributed.py (started by torchrun, or as a
plain process with torchrun's environment). Also imported by the test for the same model, data
and settings in a single process.

    python distributed_worker.py train OUT     SBS search (interrupted once, resumed), SBS finetune,
                                               OPQ finetune; the search resumed from OUT/single.ckpt
    python distributed_worker.py die OUT       SBS search in which rank 1 dies at its 3rd step
    python distributed_worker.py hang OUT      ... in which rank 1 stops responding there
The train run writes OUT/rank<r>.pt with what each rank ended with.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import time

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from mixedprec import opq, sbs
from mixedprec.data.digits import load_digits

from crashing import CrashingDataset  # this directory: tests/

# cpu: ranks on gloo. MIXEDPREC_TEST_DEVICE=cuda (benchmarks/gpu_check.py): one GPU per rank on
# nccl, cuDNN deterministic and without TF32, so that two ranks and one process differ only in
# summation order, as on the CPU.
DEVICE = os.environ.get("MIXEDPREC_TEST_DEVICE", "cpu")
if DEVICE == "cuda":
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = True, False

EXAMPLES, BATCH = 256, 32  # 8 global batches per epoch: 16 examples per rank at world size 2
SEARCH = dict(epochs=2, bops_weight=0.5, lr=0.05, batch_size=BATCH, seed=0, quiet=True, device=DEVICE)
FINETUNE = dict(epochs=1, lr=0.05, batch_size=BATCH, seed=0, quiet=True, device=DEVICE)
POLICY = sbs.SBSPolicy(first_last_bits=None)  # every layer searched, signs decided from the first batch


def float_model() -> nn.Module:
    """A small CNN without BatchNorm: under DDP each rank normalizes with its own batch's
    statistics, which would make the run differ from a single process on the whole batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def train_set() -> Dataset:
    return Subset(load_digits().train, range(EXAMPLES))


class FailAfter(CrashingDataset):
    """Dies (exit status 3) or hangs after a number of item reads: a rank lost mid-epoch."""

    def __init__(self, base: Dataset, reads: int, how: str):
        super().__init__(base, reads)
        self.how = how

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            if self.how == "die":
                os._exit(3)
            time.sleep(3600)
        return self.base[i]


def reads_into_epoch_1(world_size: int) -> int:
    """Item reads until the 3rd step of the second epoch (one read is the input shape probe)."""
    return 1 + EXAMPLES // world_size + 2 * BATCH // world_size


def decisions(model: nn.Module) -> dict:
    """Everything SBS decided, by layer: bits, activation gates and sign, kept channels."""
    out = {}
    for name, layer in sbs.sbs_layers(model).items():
        gate = layer.output_gate()
        out[name] = {"bits": layer.bits(), "signed": layer.a_quant.signed,
                     "keep": None if gate is None else gate.keep.tolist()}
    return out


def main(scenario: str, out: str) -> None:
    from mixedprec import distributed

    torch.set_num_threads(1)
    distributed.setup(DEVICE)
    rank = distributed.rank()
    data = train_set()
    if scenario in ("die", "hang"):
        net = sbs.convert(float_model(), POLICY)
        sbs.search(net, FailAfter(data, 1 + 2 * BATCH // 2, scenario) if rank == 1 else data, **SEARCH)
        return

    reduced = []  # (numel of each all_reduce from Python: DDP's own go through its C++ reducer)
    all_reduce = torch.distributed.all_reduce

    def counting(t, *args, **kwargs):
        reduced.append(t.numel())
        return all_reduce(t, *args, **kwargs)

    torch.distributed.all_reduce = counting
    net = sbs.convert(float_model(), POLICY)
    try:  # stopped in epoch 1, after rank 0 wrote the epoch-0 checkpoint
        sbs.search(net, CrashingDataset(data, reads_into_epoch_1(distributed.world_size())),
                   checkpoint=f"{out}/two.ckpt", **SEARCH)
    except KeyboardInterrupt:
        pass
    if rank == 0:  # kept for the test to resume at world size 1
        shutil.copy(f"{out}/two.ckpt", f"{out}/two_epoch0.ckpt")
    torch.distributed.barrier()
    reduced.clear()  # count over the resumed epoch only
    searched = sbs.convert(float_model(), POLICY)
    history = sbs.search(searched, data, checkpoint=f"{out}/two.ckpt", **SEARCH)
    result = {"search": copy.deepcopy(searched.state_dict()), "decisions": decisions(searched),
              "history": history, "reduced": list(reduced)}

    from_single = sbs.convert(float_model(), POLICY)  # a checkpoint written by a single process
    sbs.search(from_single, data, checkpoint=f"{out}/single.ckpt", **SEARCH)
    result["from_single"] = copy.deepcopy(from_single.state_dict())

    sbs.finetune(searched, data, **FINETUNE)
    result["finetune"] = searched.state_dict()
    plain = float_model()
    opq_model = opq.convert(plain, opq.allocate(plain, 8.0, quiet=True))
    opq.finetune(opq_model, data, **FINETUNE)
    result["opq"] = opq_model.state_dict()
    torch.save(result, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
