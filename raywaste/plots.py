"""PNG figures for inspect, evaluate and the run report: bar charts, curves, image grids.

Each function draws one figure with matplotlib's object API (no pyplot state, so it is
safe in threads and never opens a window) and writes it as a PNG. Sizes are given in
pixels and the figure is saved without cropping, so a PNG is exactly the size that
the function returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DPI = 100
CHART_WIDTH_PX = 900
BAR_HEIGHT_PX = 22
"""Height per bar of a horizontal bar chart."""
CHART_MARGIN_PX = 110
"""Room above and below the bars for the title and the axis label."""
CLASS_ROW_PX = 48
"""Height per class of the per-class score chart (three bars)."""
CURVE_SIZE_PX = (640, 560)
BUCKET_CHART_SIZE_PX = (800, 450)
CAPTION_LINE_PX = 13
TITLE_PX = 36
SCORE_COLORS = {"precision": "#4c72b0", "recall": "#dd8452", "f1": "#55a868"}


@dataclass(frozen=True)
class Box:
    """A rectangle to draw on a tile, in the tile's own pixels (``x, y, width, height``)."""

    x: float
    y: float
    width: float
    height: float
    label: str = ""
    color: str = "#ffcc00"


@dataclass
class Tile:
    """One picture of an image grid: a uint8 ``(height, width, channels)`` array, caption lines and boxes."""

    image: np.ndarray
    caption: list[str]
    boxes: list[Box] = field(default_factory=list)


def bar_chart_height(bars: int) -> int:
    """Return the pixel height of a horizontal bar chart with ``bars`` bars."""
    return CHART_MARGIN_PX + BAR_HEIGHT_PX * max(bars, 1)


def plot_counts(counts: dict[str, float], path: Path, title: str, xlabel: str) -> tuple[int, int]:
    """Draw one horizontal bar per entry, in the given order from the top, with its value at the end.

    Returns the PNG's ``(width, height)`` in pixels.
    """
    size = (CHART_WIDTH_PX, bar_chart_height(len(counts)))
    figure, axes = _figure(size)
    names = list(counts)
    values = [counts[name] for name in names]
    positions = np.arange(len(names))
    bars = axes.barh(positions, values, color="#4c72b0")
    axes.set_yticks(positions, labels=names, fontsize=8)
    axes.invert_yaxis()
    axes.bar_label(bars, labels=[_format_value(value) for value in values], padding=3, fontsize=7)
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    axes.margins(x=0.08)
    axes.set_ylim(len(names) - 0.5, -0.5)
    _save(figure, path)
    return size


def plot_buckets(counts: dict[str, int], path: Path, title: str, xlabel: str, ylabel: str) -> tuple[int, int]:
    """Draw one vertical bar per bucket, in the given order from the left (a histogram of labelled bins)."""
    figure, axes = _figure(BUCKET_CHART_SIZE_PX)
    names = list(counts)
    positions = np.arange(len(names))
    bars = axes.bar(positions, [counts[name] for name in names], color="#4c72b0")
    axes.set_xticks(positions, labels=names, fontsize=8, rotation=20, ha="right")
    axes.bar_label(bars, padding=2, fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.margins(y=0.12)
    _save(figure, path)
    return BUCKET_CHART_SIZE_PX


def plot_class_scores(per_class: dict[str, dict[str, float]], path: Path, title: str) -> tuple[int, int]:
    """Draw precision, recall and F1 of each class as three bars side by side."""
    size = (CHART_WIDTH_PX, CHART_MARGIN_PX + CLASS_ROW_PX * max(len(per_class), 1))
    figure, axes = _figure(size)
    names = list(per_class)
    positions = np.arange(len(names))
    height = 0.27
    for offset, key in zip((-height, 0.0, height), ("precision", "recall", "f1")):
        values = [per_class[name][key] for name in names]
        axes.barh(positions + offset, values, height=height, label=key, color=SCORE_COLORS[key])
    labels = [f"{name} ({per_class[name].get('support', 0)})" for name in names]
    axes.set_yticks(positions, labels=labels, fontsize=8)
    axes.set_ylim(len(names) - 0.5, -0.5)
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("score (class support in brackets)")
    axes.set_title(title, pad=22)
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, fontsize=8, frameon=False)
    _save(figure, path)
    return size


def plot_split_counts(summary: dict[str, dict[str, int]], path: Path, title: str) -> tuple[int, int]:
    """Draw examples per class as one stacked bar per class, a segment per split (``{split: {class: count}}``)."""
    splits = list(summary)
    names = list(next(iter(summary.values()), {}))
    size = (CHART_WIDTH_PX, bar_chart_height(len(names)))
    figure, axes = _figure(size)
    positions = np.arange(len(names))
    left = np.zeros(len(names))
    for index, split in enumerate(splits):
        values = np.array([summary[split][name] for name in names], dtype=np.float64)
        axes.barh(positions, values, left=left, label=split, color=color_for(2 * index))
        left += values
    for position, total in zip(positions, left):
        axes.text(total, position, f" {int(total)}", va="center", fontsize=7)
    axes.set_yticks(positions, labels=names, fontsize=8)
    axes.set_ylim(len(names) - 0.5, -0.5)
    axes.margins(x=0.08)
    axes.set_xlabel("examples")
    axes.set_title(title, pad=22)
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(splits), fontsize=8, frameon=False)
    _save(figure, path)
    return size


@dataclass(frozen=True)
class Curve:
    """A precision-recall curve to draw, with the points to mark on it."""

    label: str
    precision: np.ndarray
    recall: np.ndarray
    points: list[tuple[str, float, float]] = field(default_factory=list)
    """``(label, recall, precision)`` of operating points, such as decision thresholds."""


def plot_precision_recall(curves: Sequence[Curve], path: Path, title: str) -> tuple[int, int]:
    """Draw precision over recall as steps, one line per curve, with marked operating points."""
    figure, axes = _figure(CURVE_SIZE_PX)
    markers = ("o", "s", "^", "D")
    for curve_index, curve in enumerate(curves):
        # Precision P[k] holds on the recall interval (R[k-1], R[k]], as in average precision's step sum.
        recall = np.r_[0.0, curve.recall]
        precision = np.r_[curve.precision[:1] if len(curve.precision) else [1.0], curve.precision]
        line = axes.step(recall, precision, where="pre", label=curve.label)[0]
        for point_index, (label, point_recall, point_precision) in enumerate(curve.points):
            axes.plot([point_recall], [point_precision], markers[point_index % len(markers)], color=line.get_color(),
                      markersize=8, markeredgecolor="black", label=f"{label}, {curve.label.split(' ')[0]}")
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8, frameon=False)
    _save(figure, path)
    return CURVE_SIZE_PX


def image_grid_size(count: int, columns: int, tile_px: int, caption_lines: int) -> tuple[int, int]:
    """Return the pixel size of an image grid of ``count`` tiles."""
    rows = max(1, -(-count // columns))
    cell_height = tile_px + caption_lines * CAPTION_LINE_PX + 8
    return columns * (tile_px + 8), TITLE_PX + rows * cell_height


def plot_image_grid(tiles: Sequence[Tile], path: Path, title: str, columns: int = 4, tile_px: int = 160) -> tuple[int, int]:
    """Draw tiles in rows of ``columns``, each scaled to ``tile_px`` square, with boxes and captions.

    Box coordinates are in the pixels of each tile's own array. Small arrays are enlarged
    without smoothing, so every stored pixel stays visible.
    """
    caption_lines = max((len(tile.caption) for tile in tiles), default=1)
    width, height = image_grid_size(len(tiles), columns, tile_px, caption_lines)
    figure, _ = _figure((width, height), axes=False)
    figure.suptitle(title, y=1 - 8 / height, va="top", fontsize=11)
    cell_height = tile_px + caption_lines * CAPTION_LINE_PX + 8

    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        left = (column * (tile_px + 8) + 4) / width
        top = TITLE_PX + row * cell_height
        bottom = 1 - (top + tile_px) / height
        axes = figure.add_axes((left, bottom, tile_px / width, tile_px / height))
        _draw_tile(axes, tile)
        for line_number, line in enumerate(tile.caption):
            y = 1 - (top + tile_px + 2 + line_number * CAPTION_LINE_PX) / height
            figure.text(left + tile_px / width / 2, y, line, ha="center", va="top", fontsize=7)
    _save(figure, path)
    return width, height


# Fraction of a tile's height that a box label needs above its box.
LABEL_ROOM = 0.06


def _draw_tile(axes, tile: Tile) -> None:
    from matplotlib.patches import Rectangle

    image = tile.image
    if image.ndim == 3 and image.shape[2] == 1:
        axes.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        axes.imshow(image, interpolation="nearest")
    for box in tile.boxes:
        axes.add_patch(Rectangle((box.x, box.y), box.width, box.height, fill=False, edgecolor=box.color, linewidth=1.2))
        if box.label:
            # Above the box, unless that is off the image: then inside its top edge.
            above = box.y > LABEL_ROOM * image.shape[0]
            axes.text(box.x, box.y, box.label, fontsize=5.5, color="black", va="bottom" if above else "top", ha="left",
                      bbox={"facecolor": box.color, "edgecolor": "none", "pad": 0.8, "alpha": 0.85}, clip_on=True)
    axes.set_xlim(-0.5, image.shape[1] - 0.5)
    axes.set_ylim(image.shape[0] - 0.5, -0.5)
    axes.set_axis_off()


def color_for(index: int) -> str:
    """Return a distinct color for a class or category index (matplotlib's tab20, repeating)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return to_hex(colormaps["tab20"](index % 20))


def _figure(size_px: tuple[int, int], axes: bool = True):
    from matplotlib.figure import Figure

    # Constrained layout fits the labels inside the fixed figure size.
    figure = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, layout="constrained" if axes else None)
    return figure, figure.add_subplot() if axes else None


def _save(figure, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)


def _format_value(value: float) -> str:
    return f"{value:,}" if float(value).is_integer() else f"{value:.3f}"
