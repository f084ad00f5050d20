"""Pictures of bucket usage for TensorBoard: a heatmap per Memory Layer, a rank-frequency plot per layer kind.

Both take bucket counts ``[num_tables, num_buckets]`` (tokens that picked each row of each table) and
return an RGB image ``[height, width, 3]`` of uint8 for ``SummaryWriter.add_image(..., dataformats="HWC")``,
with a title, axes and a legend, large enough that every table shows. They are drawn with numpy and
Pillow, which TensorBoard already needs to encode images: no plotting library.

Colour encodes a row's share of its table's tokens relative to uniform use (``count * num_buckets /
tokens``): white is 1x (every row used equally), blue rows are used less, red rows more, on a log scale
clipped at ``1/16x`` and ``16x``; black rows were never picked. The scale is the same for every layer and
step, so pictures compare at a glance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SCALE_OCTAVES = 4
"""The colour scale spans ``2**-4 = 1/16x`` to ``2**4 = 16x`` the uniform share."""
MAX_PLOT_WIDTH = 1024
"""Buckets are drawn ``MAX_PLOT_WIDTH // num_buckets`` pixels wide (up to 8); beyond 1024 buckets, neighbours are averaged."""
MAX_PLOT_HEIGHT = 512
"""Tables are drawn as bands of ``MAX_PLOT_HEIGHT // num_tables`` pixels (2 to 24); beyond 512 tables, neighbours are averaged."""
MIN_BAND_HEIGHT, MAX_BAND_HEIGHT, MAX_BUCKET_WIDTH = 2, 24, 8
LABELLED_BAND_HEIGHT = 12
"""Bands at least this tall get their table number and used fraction written beside them."""

DIVERGING = np.array(
    [(5, 48, 97), (33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43), (103, 0, 31)],
    dtype=np.float64,
)
"""Blue - white - red anchors (ColorBrewer RdBu), evenly spaced over ``[-SCALE_OCTAVES, SCALE_OCTAVES]``."""
UNUSED = (0, 0, 0)
INK, GRID, BACKGROUND = (25, 25, 25), (215, 215, 215), (255, 255, 255)
LINE_COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
FONT_SIZE = 12
LINE_HEIGHT = 16


@functools.cache
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``FONT_SIZE`` (a bitmap font when Pillow has no FreeType)."""
    return ImageFont.load_default(size=FONT_SIZE)


def as_counts(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    """``counts`` as a float64 array ``[num_tables, num_buckets]``."""
    array = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"bucket counts must be [num_tables, num_buckets], got shape {array.shape}")
    return array.astype(np.float64)


def relative_shares(counts: np.ndarray) -> np.ndarray:
    """Each row's share of its table's tokens times ``num_buckets``: 1 under uniform use, 0 when unused."""
    totals = counts.sum(-1, keepdims=True)
    return counts * counts.shape[-1] / np.maximum(totals, 1e-30)


def usage_colours(relative: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[..., 3]`` of relative shares: the diverging scale on ``log2``, black where unused."""
    octaves = np.clip(np.log2(np.maximum(relative, 1e-300)), -SCALE_OCTAVES, SCALE_OCTAVES)
    position = (octaves + SCALE_OCTAVES) / (2 * SCALE_OCTAVES) * (len(DIVERGING) - 1)
    low = np.minimum(np.floor(position).astype(int), len(DIVERGING) - 2)
    weight = (position - low)[..., None]
    colours = DIVERGING[low] * (1 - weight) + DIVERGING[low + 1] * weight
    colours[relative <= 0] = UNUSED
    return np.rint(colours).astype(np.uint8)


def average_groups(values: np.ndarray, axis: int, max_size: int) -> np.ndarray:
    """Means of runs of ``ceil(n / max_size)`` neighbours along ``axis``, so at most ``max_size`` remain."""
    size = values.shape[axis]
    group = math.ceil(size / max_size)
    if group == 1:
        return values
    starts = np.arange(0, size, group)
    lengths = np.minimum(starts + group, size) - starts
    shape = [1] * values.ndim
    shape[axis] = len(starts)
    return np.add.reduceat(values, starts, axis=axis) / lengths.reshape(shape)


def text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    return math.ceil(draw.textlength(text, font=font()))


def tick_positions(size: int, count: int = 4) -> list[int]:
    """About ``count + 1`` evenly spaced indices of ``range(size)``, first and last included."""
    return sorted({round(i * (size - 1) / count) for i in range(count + 1)})


def plot_pixels(counts: torch.Tensor | np.ndarray) -> tuple[np.ndarray, int]:
    """The heatmap's plot area, RGB ``[height, width, 3]``, and the height of one band.

    A band per table (top to bottom), its rows sorted from most to least used (left to right), each
    row ``MAX_PLOT_WIDTH // num_buckets`` pixels wide (up to ``MAX_BUCKET_WIDTH``) and each band
    ``MAX_PLOT_HEIGHT // num_tables`` tall (``MIN_BAND_HEIGHT`` to ``MAX_BAND_HEIGHT``); beyond
    ``MAX_PLOT_WIDTH`` rows or ``MAX_PLOT_HEIGHT`` tables, neighbours are averaged.
    """
    by_use = -np.sort(-relative_shares(as_counts(counts)), axis=-1)
    relative = average_groups(average_groups(by_use, 1, MAX_PLOT_WIDTH), 0, MAX_PLOT_HEIGHT)
    rows, columns = relative.shape
    bucket_width = max(1, min(MAX_BUCKET_WIDTH, MAX_PLOT_WIDTH // columns))
    band = max(MIN_BAND_HEIGHT, min(MAX_BAND_HEIGHT, MAX_PLOT_HEIGHT // rows))
    return np.repeat(np.repeat(usage_colours(relative), band, 0), bucket_width, 1), band


def usage_heatmap(counts: torch.Tensor | np.ndarray, title: str) -> np.ndarray:
    """Heatmap of one layer (``plot_pixels``) with its title, axes, colour bar and used fraction per table.

    Sorting makes each band read like a bar: a table used evenly is white all along, a collapsing one is
    red on the left (a few rows take most tokens) and black on the right (rows never picked). Beside
    each band (when tall enough) the table's number and the fraction of its rows used; right of the
    plot, the colour bar with its values and the colour of unused rows.
    """
    counts = as_counts(counts)
    num_tables, num_buckets = counts.shape
    pixels, band = plot_pixels(counts)
    plot_height, plot_width = pixels.shape[:2]
    labelled = plot_height == num_tables * band and band >= LABELLED_BAND_HEIGHT

    left, top, bottom, used_column, legend_width = 56, 2 * LINE_HEIGHT + 6, 2 * LINE_HEIGHT + 10, 52, 150
    legend_height = 8 * LINE_HEIGHT
    width = left + plot_width + (used_column if labelled else 12) + legend_width
    height = top + max(plot_height, legend_height) + bottom
    image = Image.new("RGB", (width, height), BACKGROUND)
    image.paste(Image.fromarray(pixels), (left, top))
    draw = ImageDraw.Draw(image)
    draw.text((left, 4), title, fill=INK, font=font())
    draw.text((4, top - LINE_HEIGHT - 2), "table", fill=INK, font=font())
    draw.rectangle((left - 1, top - 1, left + plot_width, top + plot_height), outline=INK)

    for table in range(num_tables) if labelled else tick_positions(num_tables):
        y = top + int((table + 0.5) / num_tables * plot_height)
        draw.line((left - 5, y, left - 2, y), fill=INK)
        label = str(table)
        draw.text((left - 8 - text_width(draw, label), y - FONT_SIZE // 2 - 1), label, fill=INK, font=font())
    if labelled:
        used = (counts > 0).mean(-1)
        x = left + plot_width + 6
        draw.text((x, top - LINE_HEIGHT - 2), "used", fill=INK, font=font())
        for table, fraction in enumerate(used):
            draw.text((x, top + table * band + (band - FONT_SIZE) // 2 - 2), f"{fraction:.0%}", fill=INK, font=font())

    for rank in tick_positions(num_buckets):
        x = left + int((rank + 0.5) / num_buckets * plot_width)
        draw.line((x, top + plot_height + 1, x, top + plot_height + 4), fill=INK)
        label = str(rank + 1)
        draw.text((x - text_width(draw, label) // 2, top + plot_height + 5), label, fill=INK, font=font())
    axis_label = f"rows of the table, most used first ({num_buckets} rows)"
    draw.text((left + (plot_width - text_width(draw, axis_label)) // 2, height - LINE_HEIGHT - 2), axis_label, fill=INK, font=font())
    draw_colour_bar(draw, (width - legend_width + 10, top), legend_height - 2 * LINE_HEIGHT)
    return np.asarray(image)


def draw_colour_bar(draw: ImageDraw.ImageDraw, origin: tuple[int, int], bar_height: int) -> None:
    """The colour scale, ``16x`` at the top to ``1/16x`` at the bottom, its header and the colour of unused rows."""
    x, y = origin
    draw.text((x, y - LINE_HEIGHT - 2), "tokens vs uniform", fill=INK, font=font())
    octaves = np.linspace(SCALE_OCTAVES, -SCALE_OCTAVES, bar_height)
    colours = usage_colours(2.0**octaves)
    for offset, colour in enumerate(colours):
        draw.line((x, y + offset, x + 14, y + offset), fill=tuple(int(c) for c in colour))
    draw.rectangle((x - 1, y - 1, x + 15, y + bar_height), outline=INK)
    for octave in range(SCALE_OCTAVES, -SCALE_OCTAVES - 1, -2):
        tick_y = y + round((SCALE_OCTAVES - octave) / (2 * SCALE_OCTAVES) * (bar_height - 1))
        draw.line((x + 15, tick_y, x + 19, tick_y), fill=INK)
        label = f"{2**octave:g}x" if octave >= 0 else f"1/{2**-octave}x"
        if abs(octave) == SCALE_OCTAVES:
            label = (">= " if octave > 0 else "<= ") + label
        draw.text((x + 22, tick_y - FONT_SIZE // 2 - 1), label, fill=INK, font=font())
    swatch_y = y + bar_height + LINE_HEIGHT // 2
    draw.rectangle((x, swatch_y, x + 14, swatch_y + 10), fill=UNUSED, outline=INK)
    draw.text((x + 22, swatch_y - 2), "unused", fill=INK, font=font())


def rank_frequency(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    """Share of a table's tokens in its k-th most used row (k = 1..num_buckets), averaged over the tables."""
    counts = as_counts(counts)
    shares = counts / np.maximum(counts.sum(-1, keepdims=True), 1e-30)
    return -np.sort(-shares, axis=-1).mean(0)


def rank_frequency_plot(layers: Mapping[str, torch.Tensor | np.ndarray], title: str) -> np.ndarray:
    """Log-log plot of ``rank_frequency`` for each named layer (one line each), against uniform use.

    Uniform use is a flat line at ``1/num_buckets``; a collapsing table starts high and falls off a cliff
    where its rows stop being used (drawn down to the bottom edge). The legend gives each layer's used fraction.
    """
    if not layers:
        raise ValueError("a rank-frequency plot needs the counts of at least one layer")
    curves = {name: rank_frequency(counts) for name, counts in layers.items()}
    used = {name: (as_counts(counts) > 0).mean().item() for name, counts in layers.items()}
    max_rank = max(len(curve) for curve in curves.values())
    smallest = min([1 / max_rank, *(curve[curve > 0].min() for curve in curves.values() if (curve > 0).any())])
    lowest_decade = max(-9, math.floor(math.log10(smallest)))

    left, top, plot_width, plot_height = 56, 2 * LINE_HEIGHT + 6, 560, 320
    labels = [f"{name} (used {used[name]:.0%})" for name in curves]
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_width = 40 + max(text_width(scratch, label) for label in labels)
    width, height = left + plot_width + 20 + legend_width, top + plot_height + 2 * LINE_HEIGHT + 10
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    log_max_rank = max(math.log2(max_rank), 1.0)

    def x_of(rank: float) -> float:
        return left + math.log2(rank) / log_max_rank * plot_width

    def y_of(share: float) -> float:
        return top + (0 - math.log10(share)) / -lowest_decade * plot_height if lowest_decade else top

    for exponent in range(int(log_max_rank) + 1):
        x = x_of(2**exponent)
        draw.line((x, top, x, top + plot_height), fill=GRID)
        draw.line((x, top + plot_height, x, top + plot_height + 4), fill=INK)
        if exponent % 2 == 0 or log_max_rank <= 6:
            label = str(2**exponent)
            draw.text((x - text_width(draw, label) // 2, top + plot_height + 5), label, fill=INK, font=font())
    for decade in range(0, lowest_decade - 1, -1):
        y = y_of(10.0**decade)
        draw.line((left, y, left + plot_width, y), fill=GRID)
        draw.line((left - 4, y, left, y), fill=INK)
        label = "1" if decade == 0 else f"1e{decade}"
        draw.text((left - 7 - text_width(draw, label), y - FONT_SIZE // 2 - 1), label, fill=INK, font=font())
    draw.rectangle((left, top, left + plot_width, top + plot_height), outline=INK)

    uniform_y = y_of(1 / max_rank)
    for start in range(left, left + plot_width, 10):
        draw.line((start, uniform_y, min(start + 5, left + plot_width), uniform_y), fill=INK)
    draw.text((left + 6, uniform_y - LINE_HEIGHT), f"uniform: 1/{max_rank}", fill=INK, font=font())

    for index, (name, curve) in enumerate(curves.items()):
        colour = LINE_COLOURS[index % len(LINE_COLOURS)]
        positive = np.flatnonzero(curve > 0)
        points = [(x_of(rank + 1), y_of(curve[rank])) for rank in positive]
        if len(positive) < len(curve) and len(positive):
            points.append((x_of(positive[-1] + 2), top + plot_height))
        if len(points) > 1:
            draw.line(points, fill=colour, width=2, joint="curve")
        legend_y = top + index * LINE_HEIGHT
        draw.line((left + plot_width + 20, legend_y + 7, left + plot_width + 44, legend_y + 7), fill=colour, width=3)
        draw.text((left + plot_width + 50, legend_y), labels[index], fill=INK, font=font())

    draw.text((left, 4), title, fill=INK, font=font())
    draw.text((4, top - LINE_HEIGHT - 2), "share of tokens", fill=INK, font=font())
    axis_label = "rank of the row, most used first (log scale)"
    draw.text((left + (plot_width - text_width(draw, axis_label)) // 2, height - LINE_HEIGHT - 2), axis_label, fill=INK, font=font())
    return np.asarray(image)
