import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mf_lightning.data.token_windows import ConsecutiveWindows, RandomWindows, ResumableSampler

NUM_TOKENS = 500
SEQ_LEN = 16


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.bin"
    (np.arange(NUM_TOKENS) % 257).astype(np.uint16).tofile(path)
    return path


def expected_window(start: int) -> torch.Tensor:
    return torch.arange(start, start + SEQ_LEN + 1) % 257


def test_random_windows_are_pure_functions_of_seed_and_index(token_file: Path) -> None:
    windows = RandomWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN, seed=7, samples_per_epoch=100)
    again = RandomWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN, seed=7, samples_per_epoch=100)
    other_seed = RandomWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN, seed=8, samples_per_epoch=100)
    starts = set()
    for index in [0, 1, 5, 99, 12_345]:
        x, y = windows[index]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (SEQ_LEN,)
        assert torch.equal(x, again[index][0])
        start = int(x[0])
        assert torch.equal(torch.cat([x, y[-1:]]), expected_window(start))
        starts.add(start)
    assert len(starts) > 1
    assert any(not torch.equal(windows[index][0], other_seed[index][0]) for index in range(5))


def test_random_windows_stay_in_bounds_and_reach_the_last_token(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    np.arange(SEQ_LEN + 3, dtype=np.uint16).tofile(path)
    windows = RandomWindows(path, "uint16", SEQ_LEN + 3, SEQ_LEN, seed=0, samples_per_epoch=10)
    starts = {int(windows[index][0][0]) for index in range(200)}
    assert starts == {0, 1, 2}
    assert all(len(windows[index][1]) == SEQ_LEN for index in range(20))


def test_consecutive_windows_tile_without_overlap_up_to_the_cap(token_file: Path) -> None:
    windows = ConsecutiveWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN)
    assert len(windows) == (NUM_TOKENS - 1) // SEQ_LEN
    for index in range(len(windows)):
        x, y = windows[index]
        assert torch.equal(torch.cat([x, y[-1:]]), expected_window(index * SEQ_LEN))
    assert len(ConsecutiveWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN, max_windows=3)) == 3
    with pytest.raises(IndexError, match=r"window 31 out of range \[0, 31\)"):
        windows[31]


def test_too_few_tokens_for_one_window_is_an_error(token_file: Path) -> None:
    with pytest.raises(ValueError, match="holds 16 tokens, fewer than one window of seq_len \\+ 1 = 17"):
        ConsecutiveWindows(token_file, "uint16", 16, SEQ_LEN)


def test_datasets_pickle_without_their_memmap(token_file: Path) -> None:
    windows = RandomWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN, seed=3, samples_per_epoch=10)
    first = windows[4]
    copy = pickle.loads(pickle.dumps(windows))
    assert copy._tokens is None
    assert all(torch.equal(a, b) for a, b in zip(copy[4], first))


def test_ranks_take_disjoint_interleaved_indices(token_file: Path) -> None:
    dataset = RandomWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN, seed=0, samples_per_epoch=12)
    ranks = [list(ResumableSampler(dataset, 12, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert ranks == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    assert len(ResumableSampler(dataset, 12, num_replicas=2, rank=1)) == 6


def test_resumed_sampler_continues_the_uninterrupted_stream_across_epochs(token_file: Path) -> None:
    dataset = RandomWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN, seed=0, samples_per_epoch=8)
    uninterrupted = ResumableSampler(dataset, 8)
    stream = list(uninterrupted) + list(uninterrupted) + list(uninterrupted)
    assert stream == list(range(24))
    resumed = ResumableSampler(dataset, 8, start=6)
    assert len(resumed) == 8
    assert list(resumed) + list(resumed) == stream[6:16]


def test_sampler_refuses_epochs_that_ranks_cannot_share_evenly(token_file: Path) -> None:
    dataset = RandomWindows(token_file, "uint16", NUM_TOKENS, SEQ_LEN, seed=0, samples_per_epoch=8)
    with pytest.raises(ValueError, match="samples_per_epoch 9 must be a multiple of num_replicas 2"):
        ResumableSampler(dataset, 9, num_replicas=2)
