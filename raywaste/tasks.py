"""Classification tasks: turn annotations into labelled examples.

A task is chosen by name:

* ``binary:<supercategory>``: one example per image, label 1 when the image contains an
  object of that supercategory (the course's "does this image contain a Bottle").
* ``supercategory``: one example per annotation, the box crop labelled with its
  supercategory. Classes with fewer than ``min_class_examples`` examples merge into "Other".
* ``category``: one example per annotation, labelled with its category (60 in TACO).
* ``map:<csv>``: one example per annotation, labelled through a TACO class map
  (``category name,class`` per line, as in TACO's ``map_10.csv``). Annotations mapped
  to "Background" are left out, as TACO's own detector does.

What this stage leaves for the next: a list of :class:`Example` and the class names,
indexed by label.
"""

from __future__ import annotations

import csv
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


class TaskError(ValueError):
    """A task name or class map that cannot be used."""


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

    @property
    def is_binary(self) -> bool:
        return self.task.startswith("binary:")

    def class_counts(self) -> dict[str, int]:
        counts = Counter(example.label_name for example in self.examples)
        return {name: counts.get(name, 0) for name in self.class_names}


def build_examples(taco: Taco, task: str = DEFAULT_TASK, min_class_examples: int = 0) -> TaskExamples:
    """Build the labelled examples of ``task`` from ``taco``; see the module docstring for task names."""
    kind, _, argument = task.partition(":")
    kind = kind.strip().lower()
    if kind == "binary":
        if not argument:
            raise TaskError("task 'binary' needs a supercategory, for example 'binary:Bottle'")
        return _binary_examples(taco, argument)
    if kind in ("supercategory", "category"):
        if argument:
            raise TaskError(f"task {kind!r} takes no argument, got {task!r}")
        return _crop_examples(taco, task=kind, label_of=_label_getter(taco, kind), min_class_examples=min_class_examples)
    if kind == "map":
        if not argument:
            raise TaskError("task 'map' needs a CSV file, for example 'map:taco-maps/map_10.csv'")
        class_map = read_class_map(argument)
        label_of = _map_label_getter(taco, class_map, argument)
        return _crop_examples(taco, task=f"map:{argument}", label_of=label_of, min_class_examples=min_class_examples)
    raise TaskError(f"unknown task {task!r}; use binary:<supercategory>, supercategory, category or map:<csv>")


def read_class_map(path: str | Path) -> dict[str, str]:
    """Read a TACO class map: ``category name,class`` per line, no header. Keys are case-folded."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise TaskError(f"cannot read class map {path}: {error}") from error
    mapping: dict[str, str] = {}
    for line_number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise TaskError(f"{path}, line {line_number}: expected 'category name,class', got {','.join(row)!r}")
        name, target = row[0].strip(), row[1].strip()
        previous = mapping.get(name.casefold())
        if previous is not None and previous != target:
            raise TaskError(f"{path}, line {line_number}: category {name!r} is mapped twice ({previous!r} and {target!r})")
        mapping[name.casefold()] = target
    if not mapping:
        raise TaskError(f"class map {path} is empty")
    return mapping


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


def _map_label_getter(taco: Taco, class_map: dict[str, str], map_path: str):
    used = {taco.categories[a.category_id].name for a in taco.annotations}
    unmapped = sorted(name for name in used if name.casefold() not in class_map)
    if unmapped:
        raise TaskError(f"class map {map_path} has no line for categories used in {taco.path}: {', '.join(unmapped)}")
    return lambda annotation: class_map[taco.categories[annotation.category_id].name.casefold()]


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
