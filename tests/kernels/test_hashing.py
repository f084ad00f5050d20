"""Bucket index and both score variants against hand-computed values (SPEC §1 steps 2-3)."""

import math

import pytest
import torch

from mf_lightning.kernels import bucket_indices, chunk_scores
from mf_lightning.kernels.hashing import check_score


def test_bucket_is_sign_pattern_most_significant_bit_first():
    chunks = torch.tensor([[1.0, -2.0, 3.0], [-1.0, -1.0, -1.0], [0.5, 0.5, 0.5], [-0.1, 0.2, -0.3]])
    assert bucket_indices(chunks).tolist() == [0b101, 0, 0b111, 0b010]


def test_zero_and_negative_zero_hash_to_bit_one():
    chunks = torch.tensor([[0.0, -0.0, -1.0, 0.0]])
    assert bucket_indices(chunks).tolist() == [0b1101]


def test_paper_score_is_softmax_probability_of_chosen_pattern():
    z = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    patterns = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * 3)
    for t in (1.0, 0.5):
        logits = patterns @ z / t
        chosen = (patterns == torch.where(z >= 0, 1.0, -1.0)).all(-1)
        expected = torch.softmax(logits, 0)[chosen].item()
        assert chunk_scores(z, "paper", t).item() == pytest.approx(expected, rel=1e-12)


def test_scaled_score_matches_authors_formula():
    z = torch.tensor([[0.3, -1.2, 0.7, 0.0]], dtype=torch.float64)
    expected = z.abs().sum() / torch.prod(1 + torch.exp(-2 * z.abs()))
    assert chunk_scores(z, "scaled").item() == pytest.approx(expected.item(), rel=1e-12)


def test_paper_score_is_stable_for_long_chunks():
    z = torch.full((16,), 1e-4)
    expected = (1 / (1 + math.exp(-2e-4))) ** 16
    assert chunk_scores(z, "paper").item() == pytest.approx(expected, rel=1e-5)
    assert chunk_scores(torch.full((16,), 1e4), "paper").item() == 1.0


@pytest.mark.parametrize(
    "score, temperature, message",
    [
        ("cosine", 1.0, "score must be one of .*'cosine'"),
        ("paper", float("nan"), "temperature .* got nan"),
        ("paper", True, "temperature .* got True"),
    ],
)
def test_bad_score_settings_are_rejected(score, temperature, message):
    with pytest.raises(ValueError, match=message):
        check_score(score, temperature)
