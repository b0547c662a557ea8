"""Load and validate a TACO (COCO-format) ``annotations.json``.

Images, categories and annotations are indexed by their ids, never by list position.
Every problem names the file and the id involved. What this stage leaves for the
next: a :class:`Taco` whose boxes are in the displayed (EXIF-rotated) orientation,
with boxes that stuck out of the image by a pixel or so clipped, and with TACO's
repeated annotation ids kept apart by the image they belong to.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A box may stick out of its image by this many pixels and still be clipped silently
# (TACO has boxes that start at -1). Larger overhangs are judged later by the image
# stage, which reads the photo's EXIF orientation and real pixel size.
CLIP_TOLERANCE_PX = 2.0

# Errors beyond this many are summarized, so one broken file does not flood the terminal.
MAX_LISTED_ERRORS = 20


class AnnotationsError(ValueError):
    """An annotations file that cannot be used as it is."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str


@dataclass(frozen=True)
class ImageInfo:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class Annotation:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    """``(x, y, width, height)`` in pixels of the annotated image size, displayed orientation."""


@dataclass
class LoadReport:
    """Changes and findings of loading, for the log and for ``inspect``."""

    clipped_boxes: list[int] = field(default_factory=list)
    oversized_boxes: list[int] = field(default_factory=list)
    repeated_annotation_ids: dict[int, list[int]] = field(default_factory=dict)
    dropped_exact_duplicates: list[int] = field(default_factory=list)
    images_without_annotations: int = 0
    unknown_image_references: dict[int, int] = field(default_factory=dict)
    """Annotation id -> the image id it refers to, for image ids not in the file."""
    unknown_category_references: dict[int, int] = field(default_factory=dict)
    """Annotation id -> the category id it refers to, for category ids not in the file."""
    errors: list[str] = field(default_factory=list)
    """Problems that make the file invalid. ``strict=False`` collects them here and skips the entries."""


@dataclass
class Taco:
    """A validated TACO annotations file."""

    path: Path
    images: dict[int, ImageInfo]
    categories: dict[int, Category]
    annotations: list[Annotation]
    scene_categories: dict[int, str]
    scene_annotations: dict[int, list[int]]
    report: LoadReport
    raw_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_image: dict[int, list[Annotation]] = defaultdict(list)
        for annotation in self.annotations:
            by_image[annotation.image_id].append(annotation)
        self._by_image = dict(by_image)

    def annotations_of(self, image_id: int) -> list[Annotation]:
        return self._by_image.get(image_id, [])

    @property
    def supercategories(self) -> list[str]:
        return sorted({category.supercategory for category in self.categories.values()})

    def find_supercategory(self, name: str) -> str:
        """Return the supercategory spelled as in the file, matching ``name`` case-insensitively."""
        for supercategory in self.supercategories:
            if supercategory.casefold() == name.strip().casefold():
                return supercategory
        raise AnnotationsError(
            f"unknown supercategory {name!r} in {self.path}; known: {', '.join(self.supercategories)}"
        )

    def find_category(self, name: str) -> Category:
        """Return the category called ``name``, compared case-insensitively ("Food Can" and "Food can")."""
        wanted = name.strip().casefold()
        for category in self.categories.values():
            if category.name.casefold() == wanted:
                return category
        raise AnnotationsError(f"unknown category {name!r} in {self.path}")


def load_annotations(path: str | Path, strict: bool = True) -> Taco:
    """Read, validate and index a TACO ``annotations.json``.

    Raises :class:`AnnotationsError` that names the file and every offending id when
    the file is unreadable, entries lack required fields, ids repeat where they must
    be unique, or an annotation points to an image or category that does not exist.
    With ``strict=False`` only an unreadable file or one that is not COCO raises. The
    other problems are listed in ``report.errors`` and their entries are left out,
    so that ``raywaste inspect`` can show every finding of a broken file at once.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise AnnotationsError(f"annotations file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise AnnotationsError(f"cannot read annotations file {path}: not JSON text ({error.reason} at byte "
                               f"{error.start}); pass TACO's annotations.json") from error
    except (OSError, json.JSONDecodeError) as error:
        raise AnnotationsError(f"cannot read annotations file {path}: {error}") from error
    if not isinstance(document, dict):
        raise AnnotationsError(f"{path} is not a COCO annotations file: the top level is not a JSON object")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(document.get(key), list)]
    if missing:
        raise AnnotationsError(f"{path} is not a COCO annotations file: missing list(s) {', '.join(missing)}")

    errors: list[str] = []
    categories = _index_categories(document["categories"], errors)
    images = _index_images(document["images"], errors)
    if strict:
        _raise_if_any(path, errors)

    report = LoadReport()
    annotations = _read_annotations(document["annotations"], images, categories, report, errors)
    if strict:
        _raise_if_any(path, errors)
    report.errors = errors

    scene_categories = {
        int(entry["id"]): str(entry["name"])
        for entry in document.get("scene_categories") or []
        if isinstance(entry, dict) and "id" in entry and "name" in entry
    }
    scene_annotations: dict[int, list[int]] = {}
    for entry in document.get("scene_annotations") or []:
        if isinstance(entry, dict) and entry.get("image_id") in images:
            scene_annotations.setdefault(int(entry["image_id"]), []).extend(int(i) for i in entry.get("background_ids") or [])

    annotated = {annotation.image_id for annotation in annotations}
    report.images_without_annotations = sum(1 for image_id in images if image_id not in annotated)
    _log_report(path, report)
    return Taco(
        path=path,
        images=images,
        categories=categories,
        annotations=annotations,
        scene_categories=scene_categories,
        scene_annotations=scene_annotations,
        report=report,
        raw_info=document.get("info") or {},
    )


def _index_categories(entries: list[Any], errors: list[str]) -> dict[int, Category]:
    categories: dict[int, Category] = {}
    for position, entry in enumerate(entries):
        try:
            category = Category(int(entry["id"]), str(entry["name"]).strip(), str(entry.get("supercategory") or entry["name"]).strip())
        except (KeyError, TypeError, ValueError):
            errors.append(f"category entry #{position} lacks an integer 'id' or a 'name': {entry!r:.120}")
            continue
        if category.id in categories:
            errors.append(f"category id {category.id} occurs twice ({categories[category.id].name!r}, {category.name!r})")
            continue
        categories[category.id] = category

    names: dict[str, int] = {}
    for category in categories.values():
        folded = category.name.casefold()
        if folded in names:
            errors.append(f"category names differ only in case: ids {names[folded]} and {category.id} ({category.name!r})")
        names[folded] = category.id
    return categories


def _index_images(entries: list[Any], errors: list[str]) -> dict[int, ImageInfo]:
    images: dict[int, ImageInfo] = {}
    for position, entry in enumerate(entries):
        try:
            image = ImageInfo(int(entry["id"]), str(entry["file_name"]), int(entry["width"]), int(entry["height"]))
        except (KeyError, TypeError, ValueError):
            errors.append(f"image entry #{position} lacks an integer 'id', 'width', 'height' or a 'file_name': {entry!r:.120}")
            continue
        if image.id in images:
            errors.append(f"image id {image.id} occurs twice ({images[image.id].file_name}, {image.file_name})")
            continue
        if image.width <= 0 or image.height <= 0:
            errors.append(f"image id {image.id} ({image.file_name}) has a non-positive size {image.width}x{image.height}")
        images[image.id] = image
    return images


def _read_annotations(
    entries: list[Any],
    images: dict[int, ImageInfo],
    categories: dict[int, Category],
    report: LoadReport,
    errors: list[str],
) -> list[Annotation]:
    annotations: list[Annotation] = []
    seen: dict[tuple[int, int], Annotation] = {}
    images_by_annotation_id: dict[int, list[int]] = defaultdict(list)

    for position, entry in enumerate(entries):
        try:
            annotation_id = int(entry["id"])
            image_id = int(entry["image_id"])
            category_id = int(entry["category_id"])
            x, y, width, height = (float(value) for value in entry["bbox"])
        except (KeyError, TypeError, ValueError):
            errors.append(
                f"annotation entry #{position} lacks an integer 'id', 'image_id', 'category_id' or a 4-number 'bbox': {entry!r:.120}"
            )
            continue
        if image_id not in images:
            errors.append(f"annotation id {annotation_id} refers to image id {image_id}, which is not in the file")
            report.unknown_image_references[annotation_id] = image_id
            continue
        if category_id not in categories:
            errors.append(f"annotation id {annotation_id} refers to category id {category_id}, which is not in the file")
            report.unknown_category_references[annotation_id] = category_id
            continue
        if not all(math.isfinite(value) for value in (x, y, width, height)) or width <= 0 or height <= 0:
            errors.append(f"annotation id {annotation_id} (image id {image_id}) has an invalid box {[x, y, width, height]}: width and height must be positive")
            continue

        image = images[image_id]
        box = (x, y, width, height)
        clipped = _clip_box(box, image.width, image.height)
        if clipped is None:
            # Too far outside to be a rounding slip. It may still fit the photo once its
            # EXIF orientation is applied, so the image stage decides.
            report.oversized_boxes.append(annotation_id)
        elif clipped != box:
            report.clipped_boxes.append(annotation_id)
            box = clipped

        annotation = Annotation(annotation_id, image_id, category_id, box)
        previous = seen.get((image_id, annotation_id))
        if previous is not None:
            if previous == annotation:
                report.dropped_exact_duplicates.append(annotation_id)
                continue
            errors.append(f"annotation id {annotation_id} occurs twice on image id {image_id} with different contents")
            continue
        seen[(image_id, annotation_id)] = annotation
        images_by_annotation_id[annotation_id].append(image_id)
        annotations.append(annotation)

    # TACO repeats a few annotation ids on different images. Both annotations are kept:
    # downstream, an annotation is identified by (image id, annotation id).
    report.repeated_annotation_ids = {
        annotation_id: image_ids for annotation_id, image_ids in images_by_annotation_id.items() if len(image_ids) > 1
    }
    return annotations


def _clip_box(
    box: tuple[float, float, float, float], image_width: float, image_height: float
) -> tuple[float, float, float, float] | None:
    """Clip a box that sticks out by at most :data:`CLIP_TOLERANCE_PX`; return None if it sticks out further."""
    x, y, width, height = box
    right, bottom = x + width, y + height
    overhang = max(-x, -y, right - image_width, bottom - image_height)
    if overhang <= 0:
        return box
    if overhang > CLIP_TOLERANCE_PX:
        return None
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(right, float(image_width)), min(bottom, float(image_height))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def _raise_if_any(path: Path, errors: list[str]) -> None:
    if not errors:
        return
    listed = "\n  ".join(errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    raise AnnotationsError(f"{path}: {len(errors)} problem(s); fix or remove these entries:\n  {listed}{more}")


def _log_report(path: Path, report: LoadReport) -> None:
    if report.clipped_boxes:
        log.info("%s: clipped %d box(es) that stuck out of their image by up to %.0f px (annotation ids %s)",
                 path, len(report.clipped_boxes), CLIP_TOLERANCE_PX, _short_list(report.clipped_boxes))
    if report.oversized_boxes:
        log.warning("%s: %d box(es) extend beyond the annotated image size; they are checked against the photo's "
                    "orientation and size when it is read (annotation ids %s)",
                    path, len(report.oversized_boxes), _short_list(report.oversized_boxes))
    for annotation_id, image_ids in sorted(report.repeated_annotation_ids.items()):
        log.info("%s: annotation id %d occurs on %d images (ids %s); all are kept", path, annotation_id, len(image_ids), _short_list(image_ids))
    if report.dropped_exact_duplicates:
        log.warning("%s: dropped %d exact duplicate annotation(s) (ids %s)",
                    path, len(report.dropped_exact_duplicates), _short_list(report.dropped_exact_duplicates))
    if report.errors:
        log.warning("%s: left out the entries of %d problem(s); the first: %s", path, len(report.errors), report.errors[0])


def _short_list(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(value) for value in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")
