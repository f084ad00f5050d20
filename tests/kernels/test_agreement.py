"""``kernels/agreement``: one Memory Layer implementation against another, as the guard and ``mf doctor`` use it."""

from __future__ import annotations

import math

import pytest
import torch

from mf_lightning.kernels.agreement import compare, tolerance
from mf_lightning.kernels.embedding_bag import embedding_bag_memory_layer
from mf_lightning.kernels.reference import reference_memory_layer

LAYER = (4, "scaled", 1.0)


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(9, 12).to(dtype), (0.1 * torch.randn(3, 16, 7)).to(dtype), (0.1 * torch.randn(7)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_agree_forward_and_in_every_gradient(dtype):
    agreement = compare(embedding_bag_memory_layer, reference_memory_layer, inputs(dtype), LAYER)
    assert set(agreement.errors) == {"output", "buckets", "grad x", "grad tables", "grad bias"}
    assert agreement.agrees and agreement.errors["buckets"] == 0
    assert agreement.tolerance == tolerance(dtype, 9)


def test_forward_only_compares_no_gradient():
    agreement = compare(embedding_bag_memory_layer, reference_memory_layer, inputs(), LAYER, backward=False)
    assert set(agreement.errors) == {"output", "buckets"} and agreement.agrees


def test_one_wrong_bucket_disagrees_and_is_named():
    def wrong_bucket(*args):
        y, buckets = reference_memory_layer(*args)
        return y, torch.where(torch.arange(buckets.numel()).view_as(buckets) == 0, buckets + 1, buckets)

    agreement = compare(wrong_bucket, reference_memory_layer, inputs(), LAYER)
    assert not agreement.agrees
    assert agreement.describe() == "buckets differ in 3.7% of the hits"


def test_a_non_finite_output_disagrees():
    def nan_output(*args):
        y, buckets = reference_memory_layer(*args)
        return y * torch.where(torch.arange(y.shape[-1]) == 3, math.nan, 1.0), buckets

    agreement = compare(nan_output, reference_memory_layer, inputs(), LAYER, backward=False)
    assert agreement.errors["output"] == math.inf and not agreement.agrees
    assert agreement.describe().startswith("worst output error inf")


def test_tolerance_grows_with_the_longest_sum_and_the_dtype():
    assert tolerance(torch.float32, 4) == pytest.approx(4 * 2**-24 * 2)
    assert tolerance(torch.bfloat16, 100) == pytest.approx(4 * 2**-8 * 10)
