"""Look at an annotations file before training on it: counts, box sizes, findings, plots.

:func:`summarize_annotations` turns a loaded :class:`~raywaste.annotations.Taco` into an
:class:`AnnotationSummary`: images and annotations, annotations per image, sorted tables
per category and supercategory, scene tags, the distribution of box sizes, and the
validation findings of the loader. :func:`format_summary` renders it as text and
:func:`write_plots` draws it as PNG bar charts, plus a grid of sample photos with their
boxes when the photos are on disk. ``raywaste inspect`` is the command line front end.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raywaste.annotations import CLIP_TOLERANCE_PX, Taco, load_annotations
from raywaste.images import ImageSettings, read_examples
from raywaste.plots import Box, Tile, color_for, plot_buckets, plot_counts, plot_image_grid

log = logging.getLogger(__name__)

# Box area buckets in annotated pixels. The first two limits are COCO's "small" and
# "medium" objects (under 32x32 and under 96x96 pixels).
BOX_SIDE_LIMITS_PX = (32, 96, 256, 512)
# Buckets of annotations per image: (lowest, highest) count, None for no upper limit.
PER_IMAGE_BUCKETS = ((1, 1), (2, 2), (3, 5), (6, 10), (11, 20), (21, None))
SAMPLE_TILE_PX = 320
SAMPLE_COLUMNS = 3
DEFAULT_SAMPLES = 9
# Findings that list ids show at most this many of them in the text output.
MAX_LISTED_IDS = 12

CATEGORIES_PNG = "categories.png"
SUPERCATEGORIES_PNG = "supercategories.png"
PER_IMAGE_PNG = "annotations_per_image.png"
BOX_SIZES_PNG = "box_sizes.png"
SCENE_TAGS_PNG = "scene_tags.png"
SAMPLES_PNG = "samples.png"


@dataclass
class Findings:
    """Validation findings of loading an annotations file; empty lists when there are none."""

    errors: list[str] = field(default_factory=list)
    """Problems that make the file invalid for training; their entries are left out of the counts."""
    repeated_annotation_ids: dict[int, list[int]] = field(default_factory=dict)
    dropped_exact_duplicates: list[int] = field(default_factory=list)
    clipped_boxes: list[int] = field(default_factory=list)
    """Annotation ids of boxes that stuck out of their image by up to CLIP_TOLERANCE_PX and were clipped."""
    oversized_boxes: list[int] = field(default_factory=list)
    """Annotation ids of boxes that stick out further (they may fit once EXIF orientation is applied)."""
    unknown_category_references: dict[int, int] = field(default_factory=dict)
    unknown_image_references: dict[int, int] = field(default_factory=dict)
    unknown_scene_tags: dict[int, int] = field(default_factory=dict)
    """Scene tag id -> images tagged with it, for ids missing from ``scene_categories``."""
    unusual_category_names: list[str] = field(default_factory=list)
    """Category names with a capital letter after the first word, unlike TACO's other names ("Food Can")."""
    unused_categories: list[str] = field(default_factory=list)
    images_without_annotations: int = 0


@dataclass
class AnnotationSummary:
    """The summary of one annotations file that ``raywaste inspect`` prints."""

    path: str
    images: int
    annotations: int
    annotations_per_image: dict[str, float]
    """min, median, mean and max over all images, those without annotations included."""
    annotations_per_image_buckets: dict[str, int]
    categories: list[dict[str, Any]]
    """name, supercategory, annotations and images per category, most annotations first."""
    supercategories: list[dict[str, Any]]
    """name, categories, annotations and images per supercategory, most annotations first."""
    scene_tags: list[dict[str, Any]]
    """name and images per scene tag, most images first."""
    images_without_scene_tags: int
    box_sizes: dict[str, int]
    """Boxes per area bucket, in annotated pixels."""
    box_shorter_side_px: dict[str, float]
    """min, 10th percentile, median, 90th percentile and max of the boxes' shorter sides."""
    median_box_area_fraction: float
    """Median box area as a fraction of its image's area."""
    findings: Findings
    photos: dict[str, Any] = field(default_factory=dict)
    """Photo folder and how many of the listed photos it contains, when one was searched."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_annotations(path: str | Path) -> tuple[Taco, AnnotationSummary]:
    """Load ``path`` without stopping at validation errors and summarize it."""
    taco = load_annotations(path, strict=False)
    return taco, summarize_annotations(taco)


def summarize_annotations(taco: Taco) -> AnnotationSummary:
    """Count what ``taco`` contains and collect its loader's findings."""
    per_image = [len(taco.annotations_of(image_id)) for image_id in taco.images]
    category_counts = Counter(annotation.category_id for annotation in taco.annotations)
    category_images = Counter(category_id for image_id in taco.images
                              for category_id in {a.category_id for a in taco.annotations_of(image_id)})

    categories = [
        {"name": category.name, "supercategory": category.supercategory,
         "annotations": category_counts.get(category.id, 0), "images": category_images.get(category.id, 0)}
        for category in taco.categories.values()
    ]
    categories.sort(key=lambda row: (-row["annotations"], row["name"].casefold()))

    supercategory_of = {category.id: category.supercategory for category in taco.categories.values()}
    supercategory_images = Counter(name for image_id in taco.images
                                   for name in {supercategory_of[a.category_id] for a in taco.annotations_of(image_id)})
    supercategories = [
        {"name": name,
         "categories": sum(1 for category in taco.categories.values() if category.supercategory == name),
         "annotations": sum(row["annotations"] for row in categories if row["supercategory"] == name),
         "images": supercategory_images.get(name, 0)}
        for name in taco.supercategories
    ]
    supercategories.sort(key=lambda row: (-row["annotations"], row["name"].casefold()))

    tag_counts = Counter(tag for tags in taco.scene_annotations.values() for tag in set(tags))
    scene_tags = [{"name": taco.scene_categories.get(tag_id, f"unknown (id {tag_id})"), "images": count}
                  for tag_id, count in tag_counts.items()]
    scene_tags.sort(key=lambda row: (-row["images"], row["name"]))
    tagged = sum(1 for image_id in taco.images if taco.scene_annotations.get(image_id))

    return AnnotationSummary(
        path=str(taco.path),
        images=len(taco.images),
        annotations=len(taco.annotations),
        annotations_per_image=_spread(per_image),
        annotations_per_image_buckets=_per_image_buckets(per_image),
        categories=categories,
        supercategories=supercategories,
        scene_tags=scene_tags,
        images_without_scene_tags=len(taco.images) - tagged,
        box_sizes=box_size_buckets([a.bbox for a in taco.annotations]),
        box_shorter_side_px=_percentiles([min(a.bbox[2], a.bbox[3]) for a in taco.annotations]),
        median_box_area_fraction=_median_area_fraction(taco),
        findings=_findings(taco, categories, tag_counts),
    )


def box_size_buckets(boxes: list[tuple[float, float, float, float]]) -> dict[str, int]:
    """Count boxes by area: under 32x32 pixels, under 96x96, and so on (see BOX_SIDE_LIMITS_PX)."""
    labels = [f"under {BOX_SIDE_LIMITS_PX[0]}x{BOX_SIDE_LIMITS_PX[0]}"]
    labels += [f"{low}x{low} to {high}x{high}" for low, high in zip(BOX_SIDE_LIMITS_PX, BOX_SIDE_LIMITS_PX[1:])]
    labels.append(f"{BOX_SIDE_LIMITS_PX[-1]}x{BOX_SIDE_LIMITS_PX[-1]} and over")
    limits = np.array([side * side for side in BOX_SIDE_LIMITS_PX], dtype=np.float64)
    areas = np.array([width * height for _, _, width, height in boxes], dtype=np.float64)
    indices = np.searchsorted(limits, areas, side="right")
    counts = np.bincount(indices, minlength=len(labels))
    return {label: int(count) for label, count in zip(labels, counts)}


def _spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 2), "max": max(values)}


def _per_image_buckets(per_image: list[int]) -> dict[str, int]:
    buckets = {"0": sum(1 for count in per_image if count == 0)}
    for low, high in PER_IMAGE_BUCKETS:
        if high is None:
            label = f"{low} or more"
        elif low == high:
            label = str(low)
        else:
            label = f"{low}-{high}"
        buckets[label] = sum(1 for count in per_image if count >= low and (high is None or count <= high))
    return buckets


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    points = np.percentile(np.asarray(values, dtype=np.float64), [0, 10, 50, 90, 100])
    return {name: round(float(value), 1) for name, value in zip(("min", "p10", "median", "p90", "max"), points)}


def _median_area_fraction(taco: Taco) -> float:
    fractions = []
    for annotation in taco.annotations:
        image = taco.images[annotation.image_id]
        if image.width > 0 and image.height > 0:
            fractions.append(annotation.bbox[2] * annotation.bbox[3] / (image.width * image.height))
    return round(float(np.median(fractions)), 5) if fractions else 0.0


def _findings(taco: Taco, categories: list[dict[str, Any]], tag_counts: Counter) -> Findings:
    report = taco.report
    return Findings(
        errors=list(report.errors),
        repeated_annotation_ids={key: list(value) for key, value in sorted(report.repeated_annotation_ids.items())},
        dropped_exact_duplicates=sorted(report.dropped_exact_duplicates),
        clipped_boxes=sorted(report.clipped_boxes),
        oversized_boxes=sorted(report.oversized_boxes),
        unknown_category_references=dict(sorted(report.unknown_category_references.items())),
        unknown_image_references=dict(sorted(report.unknown_image_references.items())),
        unknown_scene_tags={tag_id: count for tag_id, count in sorted(tag_counts.items()) if tag_id not in taco.scene_categories},
        unusual_category_names=sorted(category.name for category in taco.categories.values() if _has_inner_capital(category.name)),
        unused_categories=sorted(row["name"] for row in categories if row["annotations"] == 0),
        images_without_annotations=report.images_without_annotations,
    )


def _has_inner_capital(name: str) -> bool:
    """Tell whether a word after the first starts with a capital, acronyms such as "PET" aside."""
    return any(word[:1].isupper() and not word.isupper() for word in name.split()[1:])


def count_photos(taco: Taco, root: Path) -> dict[str, Any]:
    """Count the listed photos that exist under ``root``."""
    present = sum(1 for image in taco.images.values() if (root / image.file_name).is_file())
    return {"folder": str(root), "listed": len(taco.images), "found": present}


def format_summary(summary: AnnotationSummary) -> str:
    """Render a summary as text tables, the way ``raywaste inspect`` prints it."""
    lines = [
        f"{summary.path}",
        f"  {summary.images} images, {summary.annotations} annotations, {len(summary.categories)} categories "
        f"in {len(summary.supercategories)} supercategories",
    ]
    if summary.photos:
        lines.append(f"  photos: {summary.photos['found']} of {summary.photos['listed']} found under {summary.photos['folder']}")
    spread = summary.annotations_per_image
    lines += ["", f"annotations per image: min {spread['min']}, median {spread['median']}, mean {spread['mean']}, max {spread['max']}"]
    lines += [f"  {label:>10}  {count:6d} images" for label, count in summary.annotations_per_image_buckets.items()]

    lines += ["", "categories, most annotations first:"]
    lines += _table(summary.categories, ("name", "supercategory", "annotations", "images"))
    lines += ["", "supercategories, most annotations first (images: how many contain one):"]
    lines += _table(summary.supercategories, ("name", "categories", "annotations", "images"))

    lines += ["", f"scene tags ({summary.images - summary.images_without_scene_tags} of {summary.images} images tagged; "
                  "an image may have several):"]
    lines += _table(summary.scene_tags, ("name", "images"))

    lines += ["", "box sizes (area in annotated pixels):"]
    lines += [f"  {label:>20}  {count:6d} boxes" for label, count in summary.box_sizes.items()]
    if summary.box_shorter_side_px:
        sides = summary.box_shorter_side_px
        lines.append(f"  shorter side: min {sides['min']}, 10th percentile {sides['p10']}, median {sides['median']}, "
                     f"90th percentile {sides['p90']}, max {sides['max']} px")
    lines.append(f"  median box area: {summary.median_box_area_fraction:.3%} of its image")

    lines += ["", "findings:"]
    lines += format_findings(summary.findings) or ["  none"]
    return "\n".join(lines)


def format_findings(findings: Findings) -> list[str]:
    """Render the findings as indented lines, one per kind; no lines when there are none."""
    lines = []
    if findings.errors:
        lines.append(f"  {len(findings.errors)} error(s) that stop preprocessing; their entries are left out above:")
        lines += [f"    {message}" for message in findings.errors[:MAX_LISTED_IDS]]
        if len(findings.errors) > MAX_LISTED_IDS:
            lines.append(f"    ... and {len(findings.errors) - MAX_LISTED_IDS} more")

    for annotation_id, image_ids in findings.repeated_annotation_ids.items():
        lines.append(f"  annotation id {annotation_id} occurs on {len(image_ids)} images (image ids "
                     f"{', '.join(map(str, image_ids))}); raywaste keeps both, keyed by image id and annotation id")
    if findings.dropped_exact_duplicates:
        lines.append(f"  exact duplicate annotations dropped: ids {_listed(findings.dropped_exact_duplicates)}")

    if findings.clipped_boxes:
        lines.append(f"  {len(findings.clipped_boxes)} box(es) stick out of their image by up to {CLIP_TOLERANCE_PX:g} px "
                     f"(for example start at -1) and are clipped: annotation ids {_listed(findings.clipped_boxes)}")
    if findings.oversized_boxes:
        lines.append(f"  {len(findings.oversized_boxes)} box(es) extend beyond the annotated image size; they are checked "
                     f"against the photo's EXIF orientation when it is read: annotation ids {_listed(findings.oversized_boxes)}")

    if findings.unknown_category_references:
        pairs = [f"{a} -> {c}" for a, c in findings.unknown_category_references.items()]
        lines.append(f"  {len(pairs)} annotation(s) refer to unknown category ids (annotation -> category): {_listed(pairs)}")
    if findings.unknown_image_references:
        pairs = [f"{a} -> {i}" for a, i in findings.unknown_image_references.items()]
        lines.append(f"  {len(pairs)} annotation(s) refer to unknown image ids (annotation -> image): {_listed(pairs)}")

    for tag_id, images in findings.unknown_scene_tags.items():
        lines.append(f"  scene tag id {tag_id} on {images} image(s) is not among the file's scene categories")
    if findings.unusual_category_names:
        names = ", ".join(repr(name) for name in findings.unusual_category_names)
        lines.append(f"  category names capitalized unlike the others: {names}; raywaste compares names case-insensitively, "
                     "so class maps may write them either way")
    if findings.unused_categories:
        count = len(findings.unused_categories)
        lines.append(f"  {count} {'category' if count == 1 else 'categories'} without annotations: "
                     f"{', '.join(findings.unused_categories)}")
    if findings.images_without_annotations:
        lines.append(f"  {findings.images_without_annotations} image(s) without annotations")
    return lines


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    widths = {column: max([len(column)] + [len(str(row[column])) for row in rows]) for column in columns}
    numeric = {column for column in columns if rows and all(isinstance(row[column], (int, float)) for row in rows)}

    def cell(column: str, value: Any) -> str:
        return f"{value:>{widths[column]}}" if column in numeric else f"{value:<{widths[column]}}"

    lines = ["  " + "  ".join(cell(column, column) for column in columns)]
    lines += ["  " + "  ".join(cell(column, row[column]) for column in columns) for row in rows]
    return lines


def _listed(values: list) -> str:
    shown = ", ".join(str(value) for value in values[:MAX_LISTED_IDS])
    return shown + (f", ... ({len(values)} in all)" if len(values) > MAX_LISTED_IDS else "")


def write_plots(taco: Taco, summary: AnnotationSummary, plots_dir: Path, photos_root: Path | None,
                samples: int = DEFAULT_SAMPLES) -> list[Path]:
    """Write the bar charts, and the sample grid when ``photos_root`` has photos; return the paths."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    name = Path(summary.path).name
    written = []

    charts = [
        (CATEGORIES_PNG, {row["name"]: row["annotations"] for row in summary.categories}, "annotations per category", "annotations"),
        (SUPERCATEGORIES_PNG, {row["name"]: row["annotations"] for row in summary.supercategories},
         "annotations per supercategory", "annotations"),
        (SCENE_TAGS_PNG, {row["name"]: row["images"] for row in summary.scene_tags}, "images per scene tag", "images"),
    ]
    for file_name, counts, title, xlabel in charts:
        if counts:
            plot_counts(counts, plots_dir / file_name, f"{title} ({name})", xlabel)
            written.append(plots_dir / file_name)

    plot_buckets(summary.annotations_per_image_buckets, plots_dir / PER_IMAGE_PNG,
                 f"annotations per image ({name})", "annotations in the image", "images")
    plot_buckets(summary.box_sizes, plots_dir / BOX_SIZES_PNG, f"box sizes ({name})", "box area in annotated pixels", "boxes")
    written += [plots_dir / PER_IMAGE_PNG, plots_dir / BOX_SIZES_PNG]

    if photos_root is not None and samples > 0:
        tiles = sample_tiles(taco, photos_root, samples)
        if tiles:
            plot_image_grid(tiles, plots_dir / SAMPLES_PNG, f"sample photos with their boxes ({name})",
                            columns=SAMPLE_COLUMNS, tile_px=SAMPLE_TILE_PX)
            written.append(plots_dir / SAMPLES_PNG)
        else:
            log.warning("no photo of %s could be read under %s; the sample grid is left out", name, photos_root)
    return written


def sample_tiles(taco: Taco, root: Path, count: int) -> list[Tile]:
    """Read up to ``count`` annotated photos, spread evenly over the image ids, with their boxes.

    Photos go through :func:`raywaste.images.read_examples` as whole, letterboxed squares,
    so they are oriented and scaled as preprocessing reads them.
    """
    candidates = [image_id for image_id in sorted(taco.images)
                  if taco.annotations_of(image_id) and (root / taco.images[image_id].file_name).is_file()]
    if not candidates:
        return []
    if len(candidates) > count:
        picks = np.linspace(0, len(candidates) - 1, count).round().astype(int)
        candidates = [candidates[index] for index in picks]

    settings = ImageSettings(size=SAMPLE_TILE_PX, square="pad")
    supercategory_index = {name: index for index, name in enumerate(taco.supercategories)}
    tiles = []
    for image_id in candidates:
        image = taco.images[image_id]
        arrays, info = read_examples(root, image.file_name, (image.width, image.height), [None], settings)
        if not isinstance(arrays[0], np.ndarray):
            log.warning("sample photo %s left out: %s", image.file_name, arrays[0].message)
            continue
        # The whole photo is letterboxed into the square: scale and center its displayed size.
        stored_width, stored_height = info.stored_size
        displayed = (stored_height, stored_width) if info.orientation in (5, 6, 7, 8) else (stored_width, stored_height)
        side = max(displayed)
        to_tile = SAMPLE_TILE_PX / side
        offset_x, offset_y = (side - displayed[0]) / 2, (side - displayed[1]) / 2
        boxes = []
        for annotation in taco.annotations_of(image_id):
            category = taco.categories[annotation.category_id]
            x, y, width, height = (value * info.scale for value in annotation.bbox)
            boxes.append(Box((x + offset_x) * to_tile, (y + offset_y) * to_tile, width * to_tile, height * to_tile,
                             label=category.name, color=color_for(supercategory_index[category.supercategory])))
        caption = [f"{image.file_name} (image id {image_id})", f"{len(boxes)} annotation(s)"]
        tiles.append(Tile(arrays[0], caption, boxes))
    return tiles
