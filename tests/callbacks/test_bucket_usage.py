"""BucketUsageMonitor in real CPU Trainer runs, read back from the TensorBoard event files."""

import lightning.pytorch as pl
import pytest
import torch
from image_support import decode, find_block
from lightning.pytorch.strategies import SingleDeviceStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mf_lightning.callbacks import BucketUsageMonitor, bucket_usage
from mf_lightning.callbacks.heatmap import DIVERGING, LABELLED_BAND_HEIGHT, PICTURE_WIDTH, UNUSED, plot_pixels
from mf_lightning.callbacks.usage_metrics import USAGE_METRICS, used_fraction

BATCH = 8
LAYERS = ("hidden", "head")


def test_logs_scalars_histograms_and_heatmaps(tiny_module, inputs, fit, read_events, count_buckets) -> None:
    logger = fit(tiny_module, [BucketUsageMonitor(log_every_n_steps=2, image_every_n_steps=4)], max_steps=4)
    events = read_events(logger)
    tags = events.Tags()
    for metric in USAGE_METRICS:
        assert [e.step for e in events.Scalars(bucket_usage.model_usage_tag(metric))] == [2, 4]
        for layer in LAYERS:
            assert [e.step for e in events.Scalars(bucket_usage.layer_usage_tag(metric, layer))] == [2, 4]
            assert bucket_usage.per_table_usage_tag(metric, layer) in tags["histograms"]
    windows = [inputs[: 2 * BATCH], inputs[2 * BATCH : 4 * BATCH]]
    for layer in LAYERS:
        assert [e.step for e in events.Histograms(bucket_usage.bucket_counts_tag(layer))] == [2, 4]
        (heatmap,) = events.Images(bucket_usage.heatmap_tag(layer))
        (rank_plot,) = events.Images(bucket_usage.rank_frequency_tag(layer))  # each layer is a kind of its own here
        assert heatmap.step == rank_plot.step == 4
        assert heatmap.height >= 12 * getattr(tiny_module, layer).num_tables and rank_plot.width >= 300
    plot, band = plot_pixels(count_buckets(tiny_module.hidden, windows[1]))
    assert band >= 12, "each table is a band tall enough to read"
    (heatmap,) = events.Images(bucket_usage.heatmap_tag("hidden"))
    assert find_block(decode(heatmap.encoded_image_string), plot) is not None, "it shows the last window's counts"
    assert (heatmap.height, heatmap.width) > plot.shape[:2], "with axes and a legend around them"

    expected = [used_fraction(count_buckets(tiny_module.hidden, x)).mean().item() for x in windows]
    logged = [e.value for e in events.Scalars(bucket_usage.layer_usage_tag("used_fraction", "hidden"))]
    assert logged == pytest.approx(expected, rel=1e-6)
    for metric in ("used_fraction", "normalized_entropy", "top1pct_share"):
        assert all(0 < e.value <= 1 for e in events.Scalars(bucket_usage.model_usage_tag(metric)))
    tokens_per_table = 2 * BATCH * inputs.shape[1]
    for histogram in events.Histograms(bucket_usage.bucket_counts_tag("hidden")):
        assert histogram.histogram_value.sum == tiny_module.hidden.num_tables * tokens_per_table


def test_counts_equal_direct_computation_and_skip_validation(
    tiny_module, inputs, fit, read_events, count_buckets
) -> None:
    monitor = BucketUsageMonitor(log_every_n_steps=1000, image_every_n_steps=1000)
    logger = fit(tiny_module, [monitor], max_steps=3, limit_val_batches=2, val_check_interval=2)
    assert len(read_events(logger).Scalars("val_loss")) == 1, "validation must have run once"
    torch.testing.assert_close(monitor.counts["hidden"], count_buckets(tiny_module.hidden, inputs[: 3 * BATCH]))
    tokens = 3 * BATCH * inputs.shape[1]
    assert monitor.counts["head"].shape == (2, 16)
    assert torch.equal(monitor.counts["head"].sum(-1), torch.full((2,), tokens))

    before = monitor.counts["hidden"].clone()
    tiny_module.train()(inputs)
    assert torch.equal(monitor.counts["hidden"], before), "hooks must be removed when fitting ends"


def test_counts_restart_after_each_window(tiny_module, fit) -> None:
    monitor = BucketUsageMonitor(log_every_n_steps=2, image_every_n_steps=2)
    fit(tiny_module, [monitor], max_steps=3)
    assert monitor.counts["hidden"].sum().item() == tiny_module.hidden.num_tables * BATCH * 3


def test_model_without_memory_layers_gets_one_info_and_no_logs(dense_module, fit, read_events, monkeypatch) -> None:
    messages = []
    monkeypatch.setattr(bucket_usage, "rank_zero_info", messages.append)
    monitor = BucketUsageMonitor(log_every_n_steps=1, image_every_n_steps=1)
    events = read_events(fit(dense_module, [monitor], max_steps=2))
    assert len(messages) == 1 and "no MemoryLayer" in messages[0]
    assert monitor.counts == {}
    tags = events.Tags()
    assert not any(tag.startswith("memory_") for kind in ("scalars", "histograms", "images") for tag in tags[kind])


def test_every_rank_reduces_and_only_rank_zero_writes(tiny_module, fit, read_events, monkeypatch) -> None:
    counts_size = sum(layer.num_tables * 2**layer.code_bits for layer in (tiny_module.hidden, tiny_module.head))
    reduced_steps = []
    strategy_reduce = SingleDeviceStrategy.reduce

    def spy(strategy, tensor, *args, **kwargs):
        if isinstance(tensor, torch.Tensor) and tensor.shape == (counts_size,):
            assert kwargs.get("reduce_op") == "sum"
            reduced_steps.append(strategy.lightning_module.trainer.global_step)
        return strategy_reduce(strategy, tensor, *args, **kwargs)

    monkeypatch.setattr(SingleDeviceStrategy, "reduce", spy)
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda trainer: False))
    monitor = BucketUsageMonitor(log_every_n_steps=2, image_every_n_steps=2)
    events = read_events(fit(tiny_module, [monitor], max_steps=4))
    assert reduced_steps == [2, 4]
    assert not any(tag.startswith("memory_") for tag in events.Tags()["scalars"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps must be a positive integer.*got 0"),
        ({"log_every_n_steps": 2.5}, "log_every_n_steps must be a positive integer.*got 2.5"),
        ({"image_every_n_steps": -1}, "image_every_n_steps must be a positive integer.*got -1"),
        ({"log_every_n_steps": 50, "image_every_n_steps": 120}, "multiple of log_every_n_steps=50.*try 150"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BucketUsageMonitor(**kwargs)


def test_mf_fit_draws_a_readable_picture_of_every_layer_and_kind(mf_fit_run) -> None:
    events = EventAccumulator(str(mf_fit_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Tags()["images"]
    heatmaps = [tag for tag in images if tag.startswith(bucket_usage.heatmap_tag(""))]
    assert len(heatmaps) == 6, "debug preset: 2 blocks of qkv, ffn_in, ffn_out"
    assert sorted(tag for tag in images if tag.startswith(bucket_usage.rank_frequency_tag(""))) == [
        bucket_usage.rank_frequency_tag(kind) for kind in ("ffn_in", "ffn_out", "qkv")
    ]
    legend = {tuple(DIVERGING[0].astype(int)), tuple(DIVERGING[-1].astype(int)), UNUSED}
    for tag in heatmaps:
        latest = events.Images(tag)[-1]
        pixels = decode(latest.encoded_image_string)
        assert latest.width == PICTURE_WIDTH and latest.height >= 8 * LABELLED_BAND_HEIGHT, "8 tables, each labelled"
        assert legend <= {tuple(pixel) for pixel in pixels.reshape(-1, 3).tolist()}, f"{tag} lacks its colour bar"
