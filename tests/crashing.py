"""A data set that raises KeyboardInterrupt after a given number of item reads: a training run
killed mid-epoch (for the checkpoint/resume tests)."""
from __future__ import annotations

from torch.utils.data import Dataset


class CrashingDataset(Dataset):
    def __init__(self, base: Dataset, reads_before_crash: int):
        self.base, self.left = base, reads_before_crash

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return self.base[i]
