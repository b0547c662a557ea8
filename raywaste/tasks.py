"""Classification tasks: turn annotations into labelled examples.

A task is chosen by name:

* ``binary:<supercategory>``: one example per image, label 1 when the image contains an
  object of that supercategory (the course's "does this image contain a Bottle").
* ``supercategory``: one example per annotation, the box crop labelled with its
  supercategory. Classes with fewer than ``min_class_examples`` examples merge into "Other".
* ``category``: one example per annotation, labelled with its category (60 in TACO).
* ``map:<csv>``: one example per annotation, labelled through a TACO class map
  (``category name,class`` per line, as in TACO's ``map_10.csv``). Annotations mapped
  to "Background" are left out, as TACO's own detector does. :func:`normalize_task`
  makes the map's path absolute, so that one map named two ways is one task.

What this stage leaves for the next: a list of :class:`Example` and the class names,
indexed by label.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from raywaste.annotations import AnnotationsError, Taco

log = logging.getLogger(__name__)

DEFAULT_TASK = "binary:Bottle"
OTHER_CLASS = "Other"
# Class name in TACO's maps for annotations that are not to be learned.
BACKGROUND_CLASS = "Background"


TASK_KINDS = ("binary", "supercategory", "category", "map")


class TaskError(ValueError):
    """A task name or class map that cannot be used."""


@dataclass(frozen=True)
class ClassMap:
    """A TACO class map as read from its CSV file."""

    path: Path
    lines: list[tuple[int, str, str]]
    """``(line number, category name, class)`` of every non-blank line, in file order."""
    sha256: str
    """SHA-256 of the bytes that were read."""

    @property
    def classes(self) -> dict[str, str]:
        """Case-folded category name -> class."""
        return {name.casefold(): target for _, name, target in self.lines}


@dataclass(frozen=True)
class Example:
    """One labelled example: a whole image (``annotation_id`` None) or one box crop."""

    image_id: int
    annotation_id: int | None
    file_name: str
    bbox: tuple[float, float, float, float] | None
    label: int
    label_name: str


@dataclass
class TaskExamples:
    """The examples of a task and the class names they refer to (``class_names[label]``)."""

    task: str
    class_names: list[str]
    examples: list[Example]
    is_crop_task: bool
    merged_into_other: list[str] = field(default_factory=list)
    excluded_annotations: int = 0
    class_map: ClassMap | None = None
    """The class map of a ``map:`` task."""

    @property
    def is_binary(self) -> bool:
        return self.task.startswith("binary:")

    def class_counts(self) -> dict[str, int]:
        counts = Counter(example.label_name for example in self.examples)
        return {name: counts.get(name, 0) for name in self.class_names}


def normalize_task(task: str) -> str:
    """Check the form of a task name and return it as stored: the kind in lower case, a class map's path absolute.

    Raises :class:`TaskError` for an unknown kind or a missing or extra argument. Whether the
    supercategory or the class map's categories exist is checked by :func:`build_examples`.
    """
    kind, argument = _split_task(task)
    if kind == "map":
        return f"map:{Path(argument).expanduser().resolve()}"
    return f"{kind}:{argument}" if argument else kind


def build_examples(taco: Taco, task: str = DEFAULT_TASK, min_class_examples: int = 0) -> TaskExamples:
    """Build the labelled examples of ``task`` from ``taco``; see the module docstring for task names."""
    kind, argument = _split_task(task)
    if kind == "binary":
        return _binary_examples(taco, argument)
    if kind in ("supercategory", "category"):
        return _crop_examples(taco, task=kind, label_of=_label_getter(taco, kind), min_class_examples=min_class_examples)
    class_map = load_class_map(argument)
    label_of = _map_label_getter(taco, class_map)
    examples = _crop_examples(taco, task=f"map:{argument}", label_of=label_of, min_class_examples=min_class_examples)
    examples.class_map = class_map
    return examples


def _split_task(task: str) -> tuple[str, str]:
    """Split ``task`` into its kind (lower case) and argument, and check that the argument fits the kind."""
    kind, _, argument = task.partition(":")
    kind = kind.strip().lower()
    if kind not in TASK_KINDS:
        raise TaskError(f"unknown task {task!r}; use binary:<supercategory>, supercategory, category or map:<csv>")
    if kind == "binary" and not argument.strip():
        raise TaskError("task 'binary' needs a supercategory, for example 'binary:Bottle'")
    if kind == "map" and not argument.strip():
        raise TaskError("task 'map' needs a CSV file, for example 'map:taco-maps/map_10.csv'")
    if kind in ("supercategory", "category") and argument:
        raise TaskError(f"task {kind!r} takes no argument, got {task!r}")
    return kind, argument


def read_class_map(path: str | Path) -> dict[str, str]:
    """Read a TACO class map: ``category name,class`` per line, no header. Keys are case-folded."""
    return load_class_map(path).classes


def load_class_map(path: str | Path) -> ClassMap:
    """Read and check a TACO class map, keeping the line number of every entry.

    Raises :class:`TaskError` naming the file when it cannot be read, is not UTF-8 text
    (a byte order mark is allowed), has a line that is not ``category name,class``, maps
    a category to two classes, or has no entries.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TaskError(f"cannot read class map {path}: {error}") from error
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        position = bom + error.start
        raise TaskError(f"cannot read class map {path}: not UTF-8 text (invalid byte 0x{data[position]:02x} at position "
                        f"{position}); save it as UTF-8 CSV") from None

    lines: list[tuple[int, str, str]] = []
    targets: dict[str, str] = {}
    for line_number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise TaskError(f"{path}, line {line_number}: expected 'category name,class', got {','.join(row)!r}")
        name, target = row[0].strip(), row[1].strip()
        previous = targets.get(name.casefold())
        if previous is not None and previous != target:
            raise TaskError(f"{path}, line {line_number}: category {name!r} is mapped twice ({previous!r} and {target!r})")
        targets[name.casefold()] = target
        lines.append((line_number, name, target))
    if not lines:
        raise TaskError(f"class map {path} is empty")
    return ClassMap(path=path, lines=lines, sha256=hashlib.sha256(data).hexdigest())


def _binary_examples(taco: Taco, supercategory_name: str) -> TaskExamples:
    try:
        supercategory = taco.find_supercategory(supercategory_name)
    except AnnotationsError as error:
        raise TaskError(str(error)) from None
    positive_categories = {category.id for category in taco.categories.values() if category.supercategory == supercategory}
    class_names = [f"no {supercategory}", supercategory]
    examples = []
    for image_id in sorted(taco.images):
        image = taco.images[image_id]
        label = int(any(a.category_id in positive_categories for a in taco.annotations_of(image_id)))
        examples.append(Example(image_id, None, image.file_name, None, label, class_names[label]))
    return TaskExamples(task=f"binary:{supercategory}", class_names=class_names, examples=examples, is_crop_task=False)


def _label_getter(taco: Taco, kind: str):
    if kind == "supercategory":
        return lambda annotation: taco.categories[annotation.category_id].supercategory
    return lambda annotation: taco.categories[annotation.category_id].name


def _map_label_getter(taco: Taco, class_map: ClassMap):
    # A line for a category that the annotations do not have is most likely a typo, and
    # would otherwise be ignored without a trace. TACO's own maps have four such lines.
    known = {category.name.casefold() for category in taco.categories.values()}
    unknown = [f"line {line_number} {name!r}" for line_number, name, _ in class_map.lines if name.casefold() not in known]
    if unknown:
        log.warning("class map %s: %d line(s) name categories that are not in %s, and are ignored: %s",
                    class_map.path, len(unknown), taco.path, ", ".join(unknown))

    classes = class_map.classes
    used = {taco.categories[a.category_id].name for a in taco.annotations}
    unmapped = sorted(name for name in used if name.casefold() not in classes)
    if unmapped:
        raise TaskError(f"class map {class_map.path} has no line for categories used in {taco.path}: {', '.join(unmapped)}")
    return lambda annotation: classes[taco.categories[annotation.category_id].name.casefold()]


def _crop_examples(taco: Taco, task: str, label_of, min_class_examples: int) -> TaskExamples:
    labelled = []
    excluded = 0
    for annotation in sorted(taco.annotations, key=lambda a: (a.image_id, a.id)):
        name = label_of(annotation)
        if name.casefold() == BACKGROUND_CLASS.casefold():
            excluded += 1
            continue
        labelled.append((annotation, name))
    if excluded:
        log.info("task %s: left out %d annotation(s) mapped to %r", task, excluded, BACKGROUND_CLASS)

    counts = Counter(name for _, name in labelled)
    merged = sorted(name for name, count in counts.items() if count < min_class_examples and name != OTHER_CLASS)
    if merged:
        log.warning("task %s: merged %d class(es) with fewer than %d examples into %r: %s",
                    task, len(merged), min_class_examples, OTHER_CLASS, ", ".join(f"{name} ({counts[name]})" for name in merged))
        merged_set = set(merged)
        labelled = [(annotation, OTHER_CLASS if name in merged_set else name) for annotation, name in labelled]

    class_names = sorted({name for _, name in labelled})
    if len(class_names) < 2:
        raise TaskError(f"task {task} on {taco.path} has {len(class_names)} class(es); a classifier needs at least 2")
    index = {name: label for label, name in enumerate(class_names)}
    examples = [
        Example(annotation.image_id, annotation.id, taco.images[annotation.image_id].file_name,
                annotation.bbox, index[name], name)
        for annotation, name in labelled
    ]
    return TaskExamples(task=task, class_names=class_names, examples=examples, is_crop_task=True,
                        merged_into_other=merged, excluded_annotations=excluded)
