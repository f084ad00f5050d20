"""The bucket-usage pictures: colour scale, sizes that show every table, legend, rank-frequency curves."""

import numpy as np
import pytest
import torch
from image_support import find_block

from mf_lightning.callbacks.heatmap import (
    DIVERGING,
    LINE_COLOURS,
    MAX_PLOT_HEIGHT,
    MIN_BAND_HEIGHT,
    PLOT_WIDTH,
    UNUSED,
    average_groups,
    plot_pixels,
    rank_frequency,
    rank_frequency_plot,
    stretch_columns,
    usage_colours,
    usage_heatmap,
)


def staircase(num_tables: int, num_buckets: int) -> torch.Tensor:
    """Counts where table ``t`` uses its first ``(t + 1) / num_tables`` of rows, evenly: a distinct used fraction each."""
    counts = torch.zeros(num_tables, num_buckets, dtype=torch.int64)
    for table in range(num_tables):
        counts[table, : max(1, (table + 1) * num_buckets // num_tables)] = 5
    return counts


def test_colour_scale_is_white_at_uniform_use_black_when_unused_and_clipped() -> None:
    colours = usage_colours(np.array([1.0, 16.0, 1 / 16, 0.0, 1000.0, 1e-6]))
    assert colours[0].tolist() == DIVERGING[len(DIVERGING) // 2].tolist()
    assert colours[1].tolist() == DIVERGING[-1].tolist() == colours[4].tolist()
    assert colours[2].tolist() == DIVERGING[0].tolist() == colours[5].tolist()
    assert colours[3].tolist() == list(UNUSED)


@pytest.mark.parametrize(("num_tables", "num_buckets"), [(4, 16), (8, 256), (32, 1024), (256, 1024), (8, 4096)])
def test_every_table_is_a_band_of_its_rows_sorted_by_use(num_tables: int, num_buckets: int) -> None:
    counts = staircase(num_tables, num_buckets)
    pixels, band = plot_pixels(counts)
    assert band >= MIN_BAND_HEIGHT
    assert pixels.shape[0] == num_tables * band, "every table gets its own band"
    assert pixels.shape[1] == PLOT_WIDTH
    for table in range(num_tables):
        row = pixels[table * band]
        unused = np.all(row == UNUSED, axis=-1)
        used_columns = int((~unused).sum())
        assert used_columns == pytest.approx((table + 1) / num_tables * PLOT_WIDTH, abs=1)
        assert not unused[:used_columns].any(), "used rows come first"

    image = usage_heatmap(counts, "layer", step=10)
    assert find_block(image, pixels) is not None, "the heatmap shows the plot area pixel for pixel"


def test_more_tables_or_rows_than_pixels_are_averaged() -> None:
    pixels, band = plot_pixels(torch.ones(MAX_PLOT_HEIGHT, 16))
    assert (band, pixels.shape) == (MIN_BAND_HEIGHT, (MAX_PLOT_HEIGHT, PLOT_WIDTH, 3))
    assert average_groups(np.arange(11.0)[None], 1, 4).tolist() == [[1.0, 4.0, 7.0, 9.5]]
    assert stretch_columns(np.array([[1.0, 2.0]]), 4).tolist() == [[1.0, 1.0, 2.0, 2.0]]
    assert stretch_columns(np.arange(8.0)[None], 4).tolist() == [[0.5, 2.5, 4.5, 6.5]]


def test_legend_shows_the_whole_colour_scale_and_the_unused_colour() -> None:
    image = usage_heatmap(torch.full((4, 64), 7), "evenly used", step=10)
    colours = {tuple(pixel) for pixel in image.reshape(-1, 3).tolist()}
    plot, _ = plot_pixels(torch.full((4, 64), 7))
    assert {tuple(pixel) for pixel in plot.reshape(-1, 3).tolist()} == {tuple(DIVERGING[3].astype(int))}
    for colour in (DIVERGING[0].astype(int).tolist(), DIVERGING[-1].astype(int).tolist(), UNUSED):
        assert tuple(colour) in colours, f"legend colour {colour} missing"
    assert len(colours) > 60, "the colour bar shades through the scale"


def test_rank_frequency_averages_sorted_shares_over_tables() -> None:
    counts = torch.tensor([[3, 1, 0, 0], [0, 2, 2, 0]])
    assert rank_frequency(counts).tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])


def test_rank_frequency_plot_draws_a_line_per_layer() -> None:
    layers = {"blocks.0": staircase(4, 256), "blocks.1": torch.ones(4, 256), "blocks.2": torch.zeros(4, 256)}
    image = rank_frequency_plot(layers, "qkv", step=10)
    assert image.shape[0] >= 250 and image.shape[1] >= 300
    counts = {colour: int(np.all(image == colour, axis=-1).sum()) for colour in LINE_COLOURS[:3]}
    assert counts[LINE_COLOURS[0]] > 200 and counts[LINE_COLOURS[1]] > 200, "both used layers draw a long line"
    assert 0 < counts[LINE_COLOURS[2]] < 200, "a layer that saw no tokens has its legend entry only"
    with pytest.raises(ValueError, match="at least one layer"):
        rank_frequency_plot({}, "qkv", step=10)
