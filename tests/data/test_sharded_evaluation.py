"""Evaluation shards: every validation window counts exactly once, whatever the number of ranks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from mf_lightning.data.sharded_evaluation import sharded_evaluation
from mf_lightning.models.base import IGNORE_INDEX


class NumberedWindows(Dataset):
    """Window ``i`` is ``(i, i + 100)`` repeated over 3 tokens."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((3,), index), torch.full((3,), index + 100)


@pytest.mark.parametrize("windows, ranks", [(5, 1), (5, 2), (5, 3), (8, 2), (2, 4)])
def test_each_window_counts_once_and_ranks_stay_in_step(windows: int, ranks: int) -> None:
    counted, shares = [], []
    for rank in range(ranks):
        dataset, sampler = sharded_evaluation(NumberedWindows(windows), ranks, rank)
        items = [dataset[index] for index in sampler]
        assert len(items) == len(sampler)
        shares.append(len(items))
        counted += [int(y[0]) - 100 for _, y in items if (y != IGNORE_INDEX).all()]
        assert all((y == IGNORE_INDEX).all() for _, y in items if (y == IGNORE_INDEX).any())
    assert sorted(counted) == list(range(windows))
    assert len(set(shares)) == 1
