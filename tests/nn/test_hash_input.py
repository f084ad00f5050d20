"""Bucket-collapse remedies (HashInput): default off is the paper's block; each remedy's shape, gradient and effect."""

import pytest
import torch

from mf_lightning.config import ModelConfig
from mf_lightning.lit.module import LanguageModel
from mf_lightning.nn.attention import rotary_cos_sin
from mf_lightning.nn.blocks import MemoryBlock
from mf_lightning.nn.hash_input import CENTERING_MOMENTUM, HashInput, balance_loss

REMEDIES = {"hash_centering": True, "bucket_balance_weight": 0.5}


def run_block(block: MemoryBlock, config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    return block(x, *rotary_cos_sin(torch.arange(x.shape[1]), config.rotary_dims, config.rotary_base))


def test_default_block_is_the_papers_exactly() -> None:
    config = ModelConfig.from_preset("debug")
    torch.manual_seed(0)
    block = MemoryBlock(config).train()
    x = torch.randn(2, 7, 64)
    cos, sin = rotary_cos_sin(torch.arange(7), config.rotary_dims, config.rotary_base)
    h = x + block.attention(block.qkv(block.attn_norm(x)), cos, sin)
    expected = h + block.ffn_out(block.ffn_mid_norm(block.ffn_in(block.ffn_norm(h))))
    assert torch.equal(block(x, cos, sin), expected)
    assert not any("hash_input" in key for key in block.state_dict())
    assert balance_loss(block) is None


@pytest.mark.parametrize("remedy", list(REMEDIES))
def test_each_remedy_keeps_shapes_and_trains(remedy: str) -> None:
    config = ModelConfig.from_preset("debug", **{remedy: REMEDIES[remedy]})
    block, x = MemoryBlock(config).train(), torch.randn(2, 5, 64, requires_grad=True)
    y = run_block(block, config, x)
    loss = y.square().sum()
    if remedy == "bucket_balance_weight":
        loss = loss + balance_loss(block)
    loss.backward()
    assert y.shape == x.shape and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_reset_parameters_sets_the_running_mean_to_zero() -> None:
    layer = HashInput(3, centering=True).train()
    layer(torch.ones(2, 3))
    layer.reset_parameters()
    assert torch.equal(layer.running_mean, torch.zeros(3))


def test_centering_uses_only_earlier_batches_and_freezes_in_eval() -> None:
    layer = HashInput(3, centering=True).train()
    first, second = torch.tensor([[1.0, 2.0, -4.0]]), torch.tensor([[5.0, 0.0, 0.0]])
    assert torch.equal(layer(first), first)
    torch.testing.assert_close(layer.running_mean, CENTERING_MOMENTUM * first[0])
    torch.testing.assert_close(layer(second), second - CENTERING_MOMENTUM * first[0])
    mean = layer.running_mean.clone()
    layer.eval()
    torch.testing.assert_close(layer(second), second - mean)
    assert torch.equal(layer.running_mean, mean)


def test_centering_balances_biased_bits() -> None:
    layer = HashInput(8, centering=True).train()
    biased = lambda: torch.randn(256, 8) + torch.linspace(-2, 2, 8)  # noqa: E731
    for _ in range(200):
        layer(biased())
    positive = (layer.eval()(biased()) >= 0).float().mean(0)
    assert ((positive - 0.5).abs() < 0.15).all()
    assert ((biased() >= 0).float().mean(0) - 0.5).abs().max() > 0.4


def test_balance_term_is_zero_when_balanced_and_pulls_bits_to_zero_mean() -> None:
    layer = HashInput(2, balance_weight=2.0).train()
    layer(torch.tensor([[1.0, -3.0], [-1.0, 3.0]]))
    assert layer.balance_term.item() == 0
    x = torch.tensor([[1.0, 0.5], [2.0, 0.1]], requires_grad=True)
    layer(x)
    assert layer.balance_term.item() > 0
    layer.balance_term.backward()
    assert (x.grad > 0).all()
    layer.eval()(x)
    assert layer.balance_term is None


def test_language_model_trains_on_lm_loss_plus_balance() -> None:
    torch.manual_seed(0)
    model = LanguageModel(overrides={"bucket_balance_weight": 1.0})
    x = torch.randint(0, 257, (2, 8))
    with pytest.warns(UserWarning, match="self.log"):
        total = model.training_step((x, x), 0)
    _, lm_loss = model(x, x)
    torch.testing.assert_close(total, lm_loss + balance_loss(model.network))
    assert balance_loss(model.network) > 0


def centre_on_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: a training forward on this rank's own data (shifted by the rank), then its running mean."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        layer = HashInput(4, centering=True).train()
        for step in range(2):
            layer(rank_batch(rank, step))
        torch.save(layer.running_mean, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def rank_batch(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s batch at ``step``: differently distributed on each rank, 3 x 5 tokens of 4 features."""
    return torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(10 * step + rank)) + 3.0 * rank


@pytest.mark.slow
@pytest.mark.multiprocess
def test_centering_keeps_one_running_mean_across_ranks_seeing_different_data(tmp_path) -> None:
    """Two gloo ranks with different data end with the same running mean: that of one process given both
    ranks' tokens (the old per-rank mean left rank 1 near 3 and rank 0 near 0)."""
    torch.multiprocessing.spawn(centre_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    means = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert torch.equal(means[0], means[1])
    whole = HashInput(4, centering=True).train()
    for step in range(2):
        whole(torch.cat([rank_batch(0, step), rank_batch(1, step)]))
    torch.testing.assert_close(means[0], whole.running_mean)
