"""Pictures of bucket usage for TensorBoard: a heatmap per Memory Layer, a rank-frequency plot per layer kind.

Both take bucket counts ``[num_tables, num_buckets]`` (tokens that picked each row of each table) and
return an RGB image ``[height, width, 3]`` of uint8 for ``SummaryWriter.add_image(..., dataformats="HWC")``,
with a title, axes and a legend. They are drawn with numpy and Pillow, which TensorBoard already needs
to encode images: no plotting library. They are about ``PICTURE_WIDTH`` pixels wide, the width of an
image card in TensorBoard's Images tab, so their text stays legible without "Show actual image size".

Colour encodes a row's share of its table's tokens relative to uniform use (``count * num_buckets /
tokens``): white is 1x (every row used equally), blue rows are used less, red rows more, on a log scale
clipped at ``1/16x`` and ``16x``; black rows were never picked. The scale is the same for every layer and
step, so pictures compare at a glance.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SCALE_OCTAVES = 4
"""The colour scale spans ``2**-4 = 1/16x`` to ``2**4 = 16x`` the uniform share."""
PLOT_WIDTH = 256
"""Width of the heatmap's plot: the rows, sorted by use, are stretched or averaged to it (sorted, they average faithfully)."""
MAX_PLOT_HEIGHT = 512
"""Tables are bands of ``MAX_PLOT_HEIGHT // num_tables`` pixels (2 to 24); beyond 256 tables, neighbours are averaged."""
MIN_BAND_HEIGHT, MAX_BAND_HEIGHT = 2, 24
LABELLED_BAND_HEIGHT = 12
"""Bands at least this tall get their table number and used fraction written beside them."""
PICTURE_WIDTH = 360

DIVERGING = np.array(
    [(5, 48, 97), (33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43), (103, 0, 31)],
    dtype=np.float64,
)
"""Blue - white - red anchors (ColorBrewer RdBu), evenly spaced over ``[-SCALE_OCTAVES, SCALE_OCTAVES]``."""
UNUSED = (0, 0, 0)
INK, GRID, BACKGROUND = (25, 25, 25), (215, 215, 215), (255, 255, 255)
LINE_COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
"""One colour per line of a rank-frequency plot (Tableau 10); more lines than colours shade from blue to red."""
FONT_SIZE, LINE_HEIGHT, MARGIN = 12, 15, 6


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


def stretch_columns(values: np.ndarray, width: int) -> np.ndarray:
    """``values [rows, n]`` resampled to exactly ``width`` columns: each column shows the row it falls in."""
    columns = average_groups(values, 1, width)
    return columns[:, np.arange(width) * columns.shape[1] // width]


def text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    return math.ceil(draw.textlength(text, font=font()))


def write(draw: ImageDraw.ImageDraw, position: tuple[float, float], text: str) -> None:
    draw.text(position, text, fill=INK, font=font())


def centred(draw: ImageDraw.ImageDraw, text: str, x: float, low: float, high: float) -> float:
    """Left edge of ``text`` centred on ``x``, kept between ``low`` and ``high`` (its right edge)."""
    width = text_width(draw, text)
    return min(max(x - width // 2, low), high - width)


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text``, or its end after an ellipsis, so it fits in ``width`` pixels (layer paths end in what matters)."""
    if text_width(draw, text) <= width:
        return text
    while text and text_width(draw, "..." + text) > width:
        text = text[1:]
    return "..." + text


def tick_positions(size: int, count: int = 4) -> list[int]:
    """About ``count + 1`` evenly spaced indices of ``range(size)``, first and last included."""
    return sorted({round(i * (size - 1) / count) for i in range(count + 1)})


def plot_pixels(counts: torch.Tensor | np.ndarray) -> tuple[np.ndarray, int]:
    """The heatmap's plot area, RGB ``[height, PLOT_WIDTH, 3]``, and the height of one band.

    A band per table (top to bottom), its rows sorted from most to least used (left to right) and
    stretched or averaged to ``PLOT_WIDTH`` pixels; bands are ``MAX_PLOT_HEIGHT // num_tables`` tall
    (``MIN_BAND_HEIGHT`` to ``MAX_BAND_HEIGHT``), and beyond ``MAX_PLOT_HEIGHT // MIN_BAND_HEIGHT``
    tables neighbours are averaged.
    """
    by_use = -np.sort(-relative_shares(as_counts(counts)), axis=-1)
    relative = average_groups(stretch_columns(by_use, PLOT_WIDTH), 0, MAX_PLOT_HEIGHT // MIN_BAND_HEIGHT)
    band = max(MIN_BAND_HEIGHT, min(MAX_BAND_HEIGHT, MAX_PLOT_HEIGHT // relative.shape[0]))
    return np.repeat(usage_colours(relative), band, 0), band


def usage_heatmap(counts: torch.Tensor | np.ndarray, layer: str, step: int) -> np.ndarray:
    """Heatmap of one layer (``plot_pixels``) with its title, axes, used fraction per table and colour bar.

    Sorting makes each band read like a bar: a table used evenly is white all along, a collapsing one is
    red on the left (a few rows take most tokens) and black on the right (rows never picked). Beside
    each band (when tall enough) the table's number and the fraction of its rows used; below, the
    colour scale with its values and the colour of unused rows.
    """
    counts = as_counts(counts)
    num_tables, num_buckets = counts.shape
    pixels, band = plot_pixels(counts)
    plot_height = pixels.shape[0]
    labelled = plot_height == num_tables * band and band >= LABELLED_BAND_HEIGHT

    left, top = 34, MARGIN + 3 * LINE_HEIGHT + 8
    axis_bottom = top + plot_height + 4 + LINE_HEIGHT
    image = Image.new("RGB", (PICTURE_WIDTH, axis_bottom + LINE_HEIGHT + 3 * LINE_HEIGHT + MARGIN), BACKGROUND)
    image.paste(Image.fromarray(pixels), (left, top))
    draw = ImageDraw.Draw(image)
    write(draw, (MARGIN, MARGIN), fit_text(draw, f"{layer}  (step {step})", PICTURE_WIDTH - 2 * MARGIN))
    write(draw, (MARGIN, MARGIN + LINE_HEIGHT), "rows of each table, most used first")
    write(draw, (MARGIN, top - LINE_HEIGHT - 6), "table")
    draw.rectangle((left - 1, top - 1, left + PLOT_WIDTH, top + plot_height), outline=INK)

    for table in range(num_tables) if labelled else tick_positions(num_tables):
        y = top + int((table + 0.5) / num_tables * plot_height)
        draw.line((left - 4, y, left - 2, y), fill=INK)
        label = str(table)
        write(draw, (left - 6 - text_width(draw, label), y - FONT_SIZE // 2 - 1), label)
    if labelled:
        x = left + PLOT_WIDTH + 6
        write(draw, (x, top - LINE_HEIGHT - 6), "used")
        for table, fraction in enumerate((counts > 0).mean(-1)):
            write(draw, (x, top + table * band + (band - FONT_SIZE) // 2 - 2), f"{fraction:.0%}")

    for rank in sorted({1, *(round(quarter * num_buckets / 4) for quarter in range(1, 5))}):
        x = left + int((rank - 0.5) / num_buckets * PLOT_WIDTH)
        draw.line((x, top + plot_height + 1, x, top + plot_height + 3), fill=INK)
        label = str(rank)
        write(draw, (centred(draw, label, x, left - 4, left + PLOT_WIDTH + 4), top + plot_height + 4), label)
    draw_colour_bar(draw, (left, axis_bottom + LINE_HEIGHT), PLOT_WIDTH)
    return np.asarray(image)


def draw_colour_bar(draw: ImageDraw.ImageDraw, origin: tuple[int, int], bar_width: int) -> None:
    """The colour scale, ``1/16x`` to ``16x`` left to right, its caption, and the colour of unused rows."""
    x, y = origin
    write(draw, (x, y - LINE_HEIGHT + 1), "tokens per row vs uniform use;")
    swatch_x = x + text_width(draw, "tokens per row vs uniform use; ")
    draw.rectangle((swatch_x, y - LINE_HEIGHT + 4, swatch_x + 10, y - LINE_HEIGHT + 13), fill=UNUSED)
    write(draw, (swatch_x + 14, y - LINE_HEIGHT + 1), "unused")
    colours = usage_colours(2.0 ** np.linspace(-SCALE_OCTAVES, SCALE_OCTAVES, bar_width))
    for offset, colour in enumerate(colours):
        draw.line((x + offset, y + 2, x + offset, y + 12), fill=tuple(int(c) for c in colour))
    draw.rectangle((x - 1, y + 1, x + bar_width, y + 13), outline=INK)
    for octave in range(-SCALE_OCTAVES, SCALE_OCTAVES + 1, 2):
        tick_x = x + round((octave + SCALE_OCTAVES) / (2 * SCALE_OCTAVES) * (bar_width - 1))
        draw.line((tick_x, y + 13, tick_x, y + 16), fill=INK)
        label = f"{2**octave:g}x" if octave >= 0 else f"1/{2**-octave}x"
        write(draw, (centred(draw, label, tick_x, x - 4, x + bar_width + 4), y + 17), label)


def rank_frequency(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    """Share of a table's tokens in its k-th most used row (k = 1..num_buckets), averaged over the tables."""
    counts = as_counts(counts)
    shares = counts / np.maximum(counts.sum(-1, keepdims=True), 1e-30)
    return -np.sort(-shares, axis=-1).mean(0)


def line_colour(index: int, count: int) -> tuple[int, int, int]:
    """Colour of line ``index`` of ``count``: Tableau 10, or a blue-to-red ramp when there are more lines."""
    if count <= len(LINE_COLOURS):
        return LINE_COLOURS[index]
    start, end = np.array(LINE_COLOURS[0]), np.array(LINE_COLOURS[3])
    return tuple(int(c) for c in np.rint(start + (end - start) * index / (count - 1)))


def common_prefix(names: list[str]) -> str:
    """The dotted prefix all ``names`` share (``model.blocks.`` of ``model.blocks.0``, ``model.blocks.1``)."""
    if len(names) < 2:
        return ""
    shared = os.path.commonprefix(names)  # noqa: RUF071 (cut back to the last dot below)
    return shared[: shared.rfind(".") + 1]


def rank_frequency_plot(layers: Mapping[str, torch.Tensor | np.ndarray], kind: str, step: int) -> np.ndarray:
    """Log-log plot of ``rank_frequency`` of the layers of one ``kind``, keyed by block (one line each).

    Uniform use is a flat line at ``1/num_buckets``; a collapsing table starts high and falls off a cliff
    where its rows stop being used (drawn down to the bottom edge). The legend gives each block's used fraction.
    """
    if not layers:
        raise ValueError("a rank-frequency plot needs the counts of at least one layer")
    curves = {name: rank_frequency(counts) for name, counts in layers.items()}
    used = {name: (as_counts(counts) > 0).mean().item() for name, counts in layers.items()}
    max_rank = max(len(curve) for curve in curves.values())
    smallest = min([1 / max_rank, *(curve[curve > 0].min() for curve in curves.values() if (curve > 0).any())])
    lowest_decade = min(-1, max(-9, math.floor(math.log10(smallest))))
    prefix = common_prefix(list(curves))

    left, top, plot_width, plot_height = 40, MARGIN + 3 * LINE_HEIGHT, PICTURE_WIDTH - 40 - 2 * MARGIN, 200
    columns = 3
    legend_top = top + plot_height + 4 + LINE_HEIGHT + LINE_HEIGHT + 4
    legend_rows = math.ceil(len(curves) / columns)
    image = Image.new("RGB", (PICTURE_WIDTH, legend_top + legend_rows * LINE_HEIGHT + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(image)
    log_max_rank = max(math.log2(max_rank), 1.0)

    def x_of(rank: float) -> float:
        return left + math.log2(rank) / log_max_rank * plot_width

    def y_of(share: float) -> float:
        return top + math.log10(share) / lowest_decade * plot_height

    for exponent in range(int(log_max_rank) + 1):
        x = x_of(2**exponent)
        draw.line((x, top, x, top + plot_height), fill=GRID)
        draw.line((x, top + plot_height, x, top + plot_height + 3), fill=INK)
        if exponent % 2 == 0 or log_max_rank <= 5:
            label = str(2**exponent)
            write(draw, (centred(draw, label, x, MARGIN, left + plot_width + MARGIN), top + plot_height + 4), label)
    for decade in range(0, lowest_decade - 1, -1):
        y = y_of(10.0**decade)
        draw.line((left, y, left + plot_width, y), fill=GRID)
        draw.line((left - 3, y, left, y), fill=INK)
        label = "1" if decade == 0 else f"1e{decade}"
        write(draw, (left - 5 - text_width(draw, label), y - FONT_SIZE // 2 - 1), label)
    draw.rectangle((left, top, left + plot_width, top + plot_height), outline=INK)

    uniform_y = y_of(1 / max_rank)
    for start in range(left, left + plot_width, 8):
        draw.line((start, uniform_y, min(start + 4, left + plot_width), uniform_y), fill=INK)
    write(draw, (left + plot_width - text_width(draw, "uniform") - 4, uniform_y - LINE_HEIGHT), "uniform")

    for index, (name, curve) in enumerate(curves.items()):
        colour = line_colour(index, len(curves))
        positive = np.flatnonzero(curve > 0)
        points = [(x_of(rank + 1), y_of(curve[rank])) for rank in positive]
        if 0 < len(positive) < len(curve):
            points.append((x_of(positive[-1] + 2), top + plot_height))
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        row, column = divmod(index, columns)
        entry_x, entry_y = MARGIN + column * (PICTURE_WIDTH - 2 * MARGIN) // columns, legend_top + row * LINE_HEIGHT
        draw.line((entry_x, entry_y + 8, entry_x + 14, entry_y + 8), fill=colour, width=3)
        entry_width = (PICTURE_WIDTH - 2 * MARGIN) // columns - 20
        entry = fit_text(draw, f"{name[len(prefix) :]}: {used[name]:.0%} used", entry_width)
        write(draw, (entry_x + 18, entry_y), entry)

    title = f"{kind} in {prefix}*  (step {step})" if prefix else f"{kind}  (step {step})"
    write(draw, (MARGIN, MARGIN), fit_text(draw, title, PICTURE_WIDTH - 2 * MARGIN))
    write(draw, (MARGIN, MARGIN + LINE_HEIGHT), "share of tokens in the k-th most used row (table mean)")
    axis_label = "k (log scale)"
    axis_label_x = centred(draw, axis_label, left + plot_width / 2, 0, PICTURE_WIDTH)
    write(draw, (axis_label_x, top + plot_height + 4 + LINE_HEIGHT), axis_label)
    return np.asarray(image)
