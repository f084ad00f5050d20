"""Datasets of ``(x, y)`` token windows over a token memmap, and the resumable, rank-aware training sampler and loader.

Datasets hold only the file path and sizes, and open the memmap lazily in whichever process reads
them, so they pickle cheaply into DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class TokenWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens from a flat token file, as ``(x, y)`` with ``y`` = ``x`` shifted by one."""

    def __init__(self, path: str | Path, dtype: str, num_tokens: int, seq_len: int) -> None:
        if num_tokens < seq_len + 1:
            raise ValueError(f"{path} holds {num_tokens} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.path = str(path)
        self.dtype = dtype
        self.num_tokens = num_tokens
        self.seq_len = seq_len
        self._tokens: np.memmap | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def window(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, int64 tensors of ``seq_len`` tokens starting at ``start`` and ``start + 1``."""
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        tokens = torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))
        return tokens[:-1], tokens[1:]


class RandomWindows(TokenWindows):
    """Training windows: item ``i`` (any ``i >= 0``) starts at an offset drawn from ``default_rng([seed, i])``.

    Items are pure functions of ``(seed, i)``, so which sample indices a run consumes fully decides its
    data: reproducible, shardable across ranks, and resumable by index. ``len`` is one epoch.
    """

    def __init__(
        self, path: str | Path, dtype: str, num_tokens: int, seq_len: int, seed: int, samples_per_epoch: int
    ) -> None:
        super().__init__(path, dtype, num_tokens, seq_len)
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = np.random.default_rng([self.seed, index]).integers(self.num_tokens - self.seq_len)
        return self.window(int(start))


class ConsecutiveWindows(TokenWindows):
    """Evaluation windows: non-overlapping, in order from the first token, at most ``max_windows`` of them."""

    def __init__(
        self, path: str | Path, dtype: str, num_tokens: int, seq_len: int, max_windows: int | None = None
    ) -> None:
        super().__init__(path, dtype, num_tokens, seq_len)
        available = (num_tokens - 1) // seq_len
        self.length = available if max_windows is None else min(available, max_windows)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"window {index} out of range [0, {self.length})")
        return self.window(index * self.seq_len)


class ResumableSampler(DistributedSampler):
    """Training sample indices from ``start`` on, split across ranks; one epoch is ``samples_per_epoch`` indices.

    The run consumes the global index stream ``0, 1, 2, ...`` in order, rank ``r`` of ``W`` taking every
    ``W``-th index from ``start + r``, so ranks never share a sample and a run restarted with ``start`` = the
    number of samples already consumed continues exactly where it stopped. Each ``iter()`` yields the
    rest of the epoch its position lies in, then moves the position to the next epoch; ``len`` is the
    full epoch per rank, as Lightning counts a resumed epoch's earlier batches itself.

    It is a ``DistributedSampler`` so that Lightning keeps it instead of wrapping it in its own.
    """

    def __init__(
        self, dataset: Dataset, samples_per_epoch: int, start: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if samples_per_epoch % num_replicas:
            raise ValueError(f"samples_per_epoch {samples_per_epoch} must be a multiple of num_replicas {num_replicas}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.samples_per_epoch = samples_per_epoch
        self.position = start

    def __len__(self) -> int:
        return self.samples_per_epoch // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        end = (self.position // self.samples_per_epoch + 1) * self.samples_per_epoch
        indices = range(self.position + self.rank, end, self.num_replicas)
        self.position = end
        return iter(indices)


class ResumableLoader(DataLoader):
    """Batches of a ``ResumableSampler`` whose state is the number of samples handed to the training loop.

    Lightning treats a loader with ``state_dict`` / ``load_state_dict`` as resumable: it stores the state
    in the checkpoint's fit-loop state and loads it before iterating on resume. The count covers every
    rank (each batch stands for ``batch_size * num_replicas`` samples of the global stream) and only
    batches actually yielded, not indices the sampler or worker processes read ahead, so a run resumed
    from any checkpoint continues with exactly the next batch, also in the middle of an accumulation
    window. ``check``, when given, is called before every batch is handed over (the token cache's
    background check raises through it).
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: ResumableSampler,
        batch_size: int,
        check: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **options)
        self.consumed_samples = sampler.position
        self.check = check

    def __iter__(self) -> Iterator[Any]:
        self.sampler.position = self.consumed_samples
        samples_per_batch = self.batch_size * self.sampler.num_replicas
        for batch in super().__iter__():
            if self.check is not None:
                self.check()
            self.consumed_samples += samples_per_batch
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        consumed = state_dict.get("consumed_samples")
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"training loader state needs consumed_samples as an int >= 0, got {state_dict!r}")
        self.consumed_samples = consumed
