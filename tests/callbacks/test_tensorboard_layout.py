"""The Overview layout (TensorBoard's Custom Scalars) of ``mf fit``, read back from the event files."""

import re

from lightning.pytorch.callbacks import ThroughputMonitor
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from mf_lightning.callbacks import (
    BucketUsageMonitor,
    GradientCoverageMonitor,
    OverviewLayout,
)
from mf_lightning.callbacks.monitoring import block_and_kind, group_layers

HEADLINE_TAGS = {
    "loss/train",
    "loss/val",
    "val/bpb",
    "memory_usage/used_fraction",
    "memory_grad_summary/table_row_coverage",
}
LAYER_FAMILIES = ("lr-", "memory_used_fraction/", "memory_grad_coverage/")


def read_layout(log_dir) -> tuple[layout_pb2.Layout, set[str]]:
    """The run's Custom Scalars layout and every scalar tag it logged."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    (config,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    return layout_pb2.Layout.FromString(config.tensor_proto.string_val[0]), set(events.Tags()["scalars"])


def charted_tags(layout: layout_pb2.Layout, logged: set[str]) -> dict[tuple[str, str], list[str]]:
    """(category, chart) -> the logged tag each line selects; each line must select exactly one (as TensorBoard matches)."""
    charts = {}
    for category in layout.category:
        for chart in category.chart:
            lines = []
            for regex in chart.multiline.tag:
                matches = [tag for tag in logged if re.match(regex, tag)]
                assert len(matches) == 1, f"{chart.title!r}: {regex!r} selects {matches}, not one logged tag"
                lines.append(matches[0])
            charts[category.title, chart.title] = lines
    return charts


def test_overview_lists_exactly_the_tags_the_run_logs(mf_fit_run) -> None:
    layout, logged = read_layout(mf_fit_run / "tensorboard")
    charts = charted_tags(layout, logged)
    shown = {tag for lines in charts.values() for tag in lines}
    expected = {tag for tag in logged if tag in HEADLINE_TAGS or tag.startswith(LAYER_FAMILIES)}
    assert shown == expected
    assert [category.title for category in layout.category] == [
        "Overview",
        "Memory Layers by block",
        "Memory Layers by kind",
    ]
    assert charts["Overview", "loss"] == ["loss/train", "loss/val"]
    assert sorted(charts["Overview", "learning rate"]) == ["lr-AdamW/decay", "lr-AdamW/no_decay", "lr-AdamW/tables"]

    layers = sorted(tag.split("/", 1)[1] for tag in logged if tag.startswith("memory_grad_coverage/"))
    assert len(layers) == 6, "debug preset: 2 blocks of qkv, ffn_in, ffn_out"
    for block, paths in group_layers(layers, by="block").items():
        assert sorted(charts["Memory Layers by block", f"{block}: used fraction"]) == [
            f"memory_used_fraction/{path}" for path in sorted(paths)
        ]
    for kind in ("qkv", "ffn_in", "ffn_out"):
        lines = charts["Memory Layers by kind", f"{kind}: used fraction"]
        assert [block_and_kind(tag.split("/", 1)[1]) for tag in lines] == [
            ("model.blocks.0", kind),
            ("model.blocks.1", kind),
        ]
        assert len(charts["Memory Layers by kind", f"{kind}: rows with a gradient"]) == 2


def test_tokens_per_second_and_monitor_tags_follow_the_callbacks(tiny_module, fit, tmp_path) -> None:
    callbacks = [
        ThroughputMonitor(
            batch_size_fn=len, length_fn=lambda batch: batch[0].shape[0] * batch[0].shape[1], window_size=2
        ),
        BucketUsageMonitor(log_every_n_steps=2, image_every_n_steps=2),
        GradientCoverageMonitor(log_every_n_steps=2),
        OverviewLayout(),
    ]
    layout, logged = read_layout(fit(tiny_module, callbacks, max_steps=4).log_dir)
    charts = charted_tags(layout, logged)
    assert charts["Overview", "training tokens per second"] == ["train/device/items_per_sec"]
    assert charts["Memory Layers by block", "model: used fraction"] == [
        "memory_used_fraction/hidden",
        "memory_used_fraction/head",
    ]
    assert ("Overview", "loss") not in charts, "a LightningModule of its own logs no LanguageModel losses"


def test_switched_off_monitors_leave_their_charts_out(tiny_module, fit) -> None:
    callbacks = [BucketUsageMonitor(enabled=False), GradientCoverageMonitor(enabled=False), OverviewLayout()]
    logger = fit(tiny_module, callbacks, max_steps=2)
    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert metadata.CONFIG_SUMMARY_TAG not in events.Tags()["tensors"], "nothing to chart, no layout"
