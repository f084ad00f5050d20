"""Evaluation windows split over ranks so that every window counts exactly once, on any number of ranks.

Lightning's ``DistributedSampler`` makes the ranks' shares equal by repeating windows, which then count
twice: the validation loss would depend on the number of ranks. Here every rank still runs the same
number of batches (FSDP gathers parameters in every forward, so the ranks must stay in step), but the
windows that only fill up the last shares have every target set to ``IGNORE_INDEX``: they cost a forward
and add no token to the loss, whose mean is weighted by the tokens that count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

from mf_lightning.models.base import IGNORE_INDEX


class PaddedWindows(Dataset):
    """``windows`` followed by filler items: index ``i >= len(windows)`` is window 0 with all targets ignored."""

    def __init__(self, windows: Dataset, length: int) -> None:
        self.windows = windows
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"item {index} out of range [0, {self.length})")
        if index < len(self.windows):
            return self.windows[index]
        x, y = self.windows[0]
        return x, torch.full_like(y, IGNORE_INDEX)


class EvenShardSampler(DistributedSampler):
    """Rank ``r`` of ``W`` takes items ``r, r + W, ...`` of a ``PaddedWindows`` whose length is a multiple of ``W``.

    It is a ``DistributedSampler`` so that Lightning keeps it instead of wrapping the loader in its own.
    """

    def __init__(self, dataset: PaddedWindows, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __len__(self) -> int:
        return len(self.dataset) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def sharded_evaluation(windows: Dataset, num_replicas: int, rank: int) -> tuple[PaddedWindows, EvenShardSampler]:
    """``windows`` padded to equal shares of ``num_replicas`` ranks, and rank ``rank``'s sampler over them."""
    padded = PaddedWindows(windows, math.ceil(len(windows) / num_replicas) * num_replicas)
    return padded, EvenShardSampler(padded, num_replicas, rank)
