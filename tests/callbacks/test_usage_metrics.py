"""Bucket-usage metrics on hand-made index streams with known answers."""

import math

import pytest
import torch

from mf_lightning.callbacks.usage_metrics import (
    USAGE_METRICS,
    gini,
    kl_to_uniform,
    normalized_entropy,
    top_share,
    usage_metrics,
    used_fraction,
)


def counts_of(stream: list[int], num_buckets: int) -> torch.Tensor:
    """Tokens per bucket of a stream of bucket indices."""
    return torch.bincount(torch.tensor(stream), minlength=num_buckets)


def test_all_tokens_in_one_bucket() -> None:
    counts = counts_of([5] * 40, 256)
    metrics = usage_metrics(counts)
    assert metrics["used_fraction"].item() == pytest.approx(1 / 256)
    assert metrics["normalized_entropy"].item() == pytest.approx(0.0, abs=1e-7)
    assert metrics["kl_to_uniform"].item() == pytest.approx(math.log(256), rel=1e-6)
    assert metrics["gini"].item() == pytest.approx(1 - 1 / 256, rel=1e-6)
    assert metrics["top1pct_share"].item() == pytest.approx(1.0)


def test_exactly_uniform_spread() -> None:
    counts = counts_of(list(range(200)) * 3, 200)
    metrics = usage_metrics(counts)
    assert metrics["used_fraction"].item() == 1.0
    assert metrics["normalized_entropy"].item() == pytest.approx(1.0, rel=1e-6)
    assert metrics["kl_to_uniform"].item() == pytest.approx(0.0, abs=1e-5)
    assert metrics["gini"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["top1pct_share"].item() == pytest.approx(2 / 200)


def test_two_bucket_case_by_hand() -> None:
    counts = counts_of([0, 1, 1, 1], 2)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert used_fraction(counts).item() == 1.0
    assert normalized_entropy(counts).item() == pytest.approx(h / math.log(2), rel=1e-6)
    assert kl_to_uniform(counts).item() == pytest.approx(math.log(2) - h, rel=1e-5)
    assert gini(counts).item() == pytest.approx(2 * (1 * 1 + 2 * 3) / (2 * 4) - 3 / 2, rel=1e-6)
    assert top_share(counts).item() == pytest.approx(0.75)


def test_batched_tables_reduce_last_dimension_only() -> None:
    one_bucket, uniform = counts_of([3] * 8, 4), counts_of([0, 1, 2, 3], 4)
    counts = torch.stack([torch.stack([one_bucket, uniform])] * 3)
    metrics = usage_metrics(counts)
    for values in metrics.values():
        assert values.shape == (3, 2) and values.dtype == torch.float32
    torch.testing.assert_close(metrics["used_fraction"][1], torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(metrics["gini"][2], torch.tensor([0.75, 0.0]))


def test_all_zero_counts_give_zero_for_every_metric() -> None:
    metrics = usage_metrics(torch.zeros(2, 16, dtype=torch.int64))
    assert set(metrics) == set(USAGE_METRICS)
    for name, values in metrics.items():
        assert torch.equal(values, torch.zeros(2)), name


def test_single_bucket_table_reads_uniform_when_used() -> None:
    counts = torch.tensor([[7], [0]])
    torch.testing.assert_close(normalized_entropy(counts), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(kl_to_uniform(counts), torch.zeros(2))
    torch.testing.assert_close(gini(counts), torch.zeros(2))


def test_top_share_uses_at_least_one_and_one_percent_of_buckets() -> None:
    counts = torch.arange(1000, 0, -1)
    assert top_share(counts).item() == pytest.approx(sum(range(991, 1001)) / counts.sum().item())
    assert top_share(counts, fraction=0.5).item() == pytest.approx(sum(range(501, 1001)) / counts.sum().item())


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        (torch.tensor(3), "last dimension"),
        (torch.zeros(2, 0), "last dimension"),
        (torch.tensor([1, -2]), "non-negative"),
        (torch.tensor([1.0, float("nan")]), "finite"),
        ([1, 2], "torch.Tensor"),
    ],
)
def test_bad_counts_are_rejected_with_the_offending_value(counts, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        usage_metrics(counts)


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1])
def test_bad_top_fraction_is_rejected(fraction: float) -> None:
    with pytest.raises(ValueError, match=f"got {fraction}"):
        top_share(torch.ones(4), fraction)
