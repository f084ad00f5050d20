"""Which tags a fit will log, asked of the code that logs them (the runs themselves are in test_tensorboard_layout)."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ThroughputMonitor

from mf_lightning.callbacks.run_tags import loss_tags, tokens_per_second_tags
from mf_lightning.lit.module import LanguageModel


@pytest.mark.parametrize(("weight", "validating"), [(0.0, True), (0.1, True), (0.1, False)])
def test_loss_tags_follow_the_balance_loss_and_validation(weight: float, validating: bool) -> None:
    model = LanguageModel(preset="debug", vocab_size=257, overrides={"bucket_balance_weight": weight})
    expected = ["loss/train"] + ["train/balance_loss"] * (weight > 0) + ["loss/val"] * validating
    assert loss_tags(SimpleNamespace(enable_validation=validating), model) == expected


@pytest.mark.parametrize(
    ("world_size", "max_steps", "global_step", "expected"),
    [
        (1, 1000, 0, ["train/device/items_per_sec"]),
        (2, 1000, 0, ["train/device/items_per_sec", "train/items_per_sec"]),
        (1, 50, 0, []),
        (1, 1000, 950, []),
        (1, -1, 0, ["train/device/items_per_sec"]),
    ],
    ids=["one-rank", "two-ranks", "shorter-than-window", "resumed-near-the-end", "unbounded"],
)
def test_tokens_per_second_tags_come_from_lightnings_throughput(world_size, max_steps, global_step, expected) -> None:
    monitor = ThroughputMonitor(batch_size_fn=len, length_fn=len)
    trainer = SimpleNamespace(
        callbacks=[monitor, ThroughputMonitor(batch_size_fn=len)],
        world_size=world_size,
        max_steps=max_steps,
        global_step=global_step,
        accumulate_grad_batches=1,
    )
    assert sorted(tokens_per_second_tags(trainer)) == sorted(expected)
