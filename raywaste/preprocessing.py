"""Preprocessing stage: TACO photos to Parquet with Ray Data.

1. Load and validate ``annotations.json`` and build the task's examples
   (:func:`check_inputs`, before Ray starts), then stop when ``OUT/data`` already holds
   this dataset, else assign splits.
2. Group the examples by photo, and the photos into small tasks of one split each.
3. Ray Data runs :func:`raywaste.images.read_examples` on every photo (one decode per
   photo) and writes Parquet into a staging folder beside the output.
4. The staged files are checked, sorted into ``train/``, ``val/`` and ``test/``, and the
   folder is moved into place with ``dataset.json``, ``manifest.json``, the split summary,
   ``errors.jsonl`` and ``tasks.jsonl`` only when everything is complete. A run that is
   killed leaves only its staging folder, which the next run in the same output folder
   removes.

What this stage leaves for the next: ``OUT/data`` as described in :mod:`raywaste.dataset`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raywaste import __version__
from raywaste.annotations import Taco, load_annotations
from raywaste.dataset import (
    DATASET_FILE,
    DEFAULT_DATA_DIR,
    ERRORS_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SCHEMA,
    SUMMARY_FILE,
    TASKS_FILE,
    DatasetInfo,
    load_dataset_info,
)
from raywaste.images import ImageSettings, jpeg_decoder_name, read_examples
from raywaste.splits import SPLITS, SplitFractions, assign_splits, format_summary, split_summary
from raywaste.tasks import DEFAULT_TASK, TaskExamples, build_examples, normalize_task

log = logging.getLogger(__name__)

# Reasons that drop an example on purpose; they are reported but do not count as errors.
SKIP_REASONS = frozenset({"box_too_small"})
# Failed photos named one by one in the log; errors.jsonl lists them all.
FAILED_PHOTOS_LOGGED = 20
_STAGED_ERRORS = "_errors"
_STAGED_TASKS = "_tasks"
_STAGING_PREFIX = ".data-staging-"
_OLD_PREFIX = ".data-old-"
# Written into a staging folder while its run is alive: host name and process id.
_OWNER_FILE = ".owner.json"
# A staging folder without an owner file is removed only when older than this (seconds),
# so a run that has just created its folder is never mistaken for a dead one.
_UNOWNED_STAGING_AGE_S = 600
# Automatic task size: about this many tasks per CPU of the cluster, for load balance, with
# at most MAX_PHOTOS_PER_TASK photos each. A photo takes 15 to 60 ms of CPU (8-12 megapixels,
# benchmarks/preprocess_speed.py), and on a quiet 2-CPU machine a Ray worker idled about
# 0.2 s between two tasks (tasks.jsonl), so tasks of up to 128 photos keep that near 10%.
TASKS_PER_CPU = 4
MAX_PHOTOS_PER_TASK = 128


class PreprocessError(RuntimeError):
    """Preprocessing could not produce a usable dataset."""


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that decides the content of the dataset. Stored in ``dataset.json``."""

    task: str = DEFAULT_TASK
    image: ImageSettings = field(default_factory=ImageSettings)
    fractions: SplitFractions = field(default_factory=SplitFractions)
    seed: int = 0
    min_class_examples: int = 0
    """Crop tasks: classes with fewer examples than this merge into "Other" (0: never)."""

    def __post_init__(self) -> None:
        # A mistyped task fails here, before Ray starts, and a class map's path becomes absolute.
        object.__setattr__(self, "task", normalize_task(self.task))

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "image": asdict(self.image),
            "split_fractions": dict(zip(SPLITS, self.fractions.as_tuple())),
            "seed": self.seed,
            "min_class_examples": self.min_class_examples,
        }


@dataclass(frozen=True)
class RunOptions:
    """Run options. None of them change the dataset's content."""

    photos_per_task: int | None = None
    """Photos per Ray task; None picks about TASKS_PER_CPU tasks per cluster CPU, at most
    MAX_PHOTOS_PER_TASK photos each. The dataset is the same for any value."""
    max_error_fraction: float = 0.05
    """Fail the run when more than this fraction of examples could not be made."""
    overwrite: bool = False
    dataset_name: str = DEFAULT_DATA_DIR
    """Folder under OUT for the dataset: "data", or "data-<suffix>" for further image sizes or color modes."""

    def __post_init__(self) -> None:
        name = self.dataset_name
        # Tuning finds datasets as OUT/data and OUT/data-*; data-failed-* keeps a failed run's files.
        if not re.fullmatch(r"data(-[A-Za-z0-9._-]+)?", name) or name.startswith("data-failed-"):
            raise ValueError(f"invalid dataset name {name!r}; expected 'data' or 'data-<suffix>', for example 'data-64-grayscale'")


@dataclass
class PreprocessResult:
    """Result of :func:`preprocess`."""

    data_dir: Path
    info: DatasetInfo
    error_count: int
    skipped_count: int
    reused: bool
    """True when an existing dataset with the same inputs and settings was kept."""


@dataclass
class CheckedInputs:
    """The annotations and the task's examples, checked before Ray starts, with the dataset's fingerprint."""

    taco_dir: Path
    annotations_path: Path
    settings: PreprocessSettings
    taco: Taco
    task: TaskExamples
    fingerprint: dict[str, Any]
    """Settings and input checksums, stored in ``manifest.json``; an existing dataset is reused only when they match."""


def check_inputs(
    taco_dir: str | Path,
    settings: PreprocessSettings | None = None,
    annotations: str | Path | None = None,
) -> CheckedInputs:
    """Load ``annotations.json`` and build the task's examples, without Ray.

    Raises :class:`~raywaste.annotations.AnnotationsError` or :class:`~raywaste.tasks.TaskError`
    for an unusable annotations file, an unknown supercategory, or a class map that
    cannot be read or misses categories, so that these stop a run before Ray starts.
    """
    settings = settings or PreprocessSettings()
    taco_dir, annotations_path = _input_paths(taco_dir, annotations)

    taco = load_annotations(annotations_path)
    task = build_examples(taco, settings.task, settings.min_class_examples)
    fingerprint = {
        "settings": settings.to_dict(),
        "annotations_sha256": _sha256(annotations_path),
        # The task names a class map by its path only, so an edited map needs its own checksum.
        "class_map_sha256": task.class_map.sha256 if task.class_map else None,
    }
    return CheckedInputs(taco_dir, annotations_path, settings, taco, task, fingerprint)


def preprocess(
    taco_dir: str | Path,
    out_dir: str | Path,
    settings: PreprocessSettings | None = None,
    annotations: str | Path | None = None,
    options: RunOptions | None = None,
    inputs: CheckedInputs | None = None,
) -> PreprocessResult:
    """Build ``OUT/data`` from the photos in ``taco_dir``; Ray must be initialized (see :mod:`raywaste.runtime`).

    A caller that checked the inputs before starting Ray passes the result of
    :func:`check_inputs` for the same ``taco_dir``, ``settings`` and ``annotations`` as
    ``inputs``. Without ``inputs``, they are checked here.
    """
    settings = settings or (inputs.settings if inputs else PreprocessSettings())
    options = options or RunOptions()
    data_dir = Path(out_dir).resolve() / options.dataset_name

    # 1. Annotations and task, checked before an existing dataset is judged, so that a
    # mistyped task is reported as such and not as a changed setting.
    if inputs is None:
        inputs = check_inputs(taco_dir, settings, annotations)
    else:
        _check_same_inputs(inputs, taco_dir, settings, annotations)
    taco, task, taco_dir, annotations_path = inputs.taco, inputs.task, inputs.taco_dir, inputs.annotations_path
    reused = _check_existing(data_dir, inputs, options.overwrite)
    if reused is not None:
        return reused

    _start_autoscaling_coordinator()
    split_of = assign_splits(task.examples, settings.fractions, settings.seed)
    log.info("task %s: %d examples from %d images in %d classes",
             task.task, len(task.examples), len(split_of), len(task.class_names))

    # 2. Work units: photos grouped by split, in (split, image id) order.
    photos_per_task = options.photos_per_task or _automatic_photos_per_task(len(split_of))
    groups = _task_groups(taco, task, split_of, photos_per_task)
    log.info("%d photos in %d Ray tasks of up to %d photos", len(split_of), len(groups), photos_per_task)

    # 3. Ray Data decodes and writes into a staging folder beside the output.
    _remove_stale_staging(data_dir.parent)
    staging = _create_staging(data_dir.parent)
    try:
        started = time.monotonic()
        _run_ray_pipeline(groups, taco_dir, settings.image, staging)
        tasks = _collect_tasks(staging)
        log.info("decoded %d photos in %.1f s in %d Ray tasks on %d node(s)", sum(len(g["photos"]) for g in groups),
                 time.monotonic() - started, len(tasks), len({t["node_id"] for t in tasks}))

        # 4. Check, sort, describe, and move into place.
        files = _arrange_staged_files(staging)
        errors = _collect_errors(staging)
        _write_jsonl(staging / TASKS_FILE, tasks)
        result = _finish(staging, data_dir, files, errors, task, settings, inputs.fingerprint, annotations_path, taco_dir, options)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _check_same_inputs(inputs: CheckedInputs, taco_dir: str | Path, settings: PreprocessSettings,
                       annotations: str | Path | None) -> None:
    if (inputs.taco_dir, inputs.annotations_path) != _input_paths(taco_dir, annotations) or inputs.settings != settings:
        raise ValueError("the checked inputs belong to another TACO folder, annotations file or settings; "
                         "pass check_inputs the same arguments as preprocess")


def _input_paths(taco_dir: str | Path, annotations: str | Path | None) -> tuple[Path, Path]:
    taco_dir = Path(taco_dir).resolve()
    return taco_dir, Path(annotations).resolve() if annotations else taco_dir / "annotations.json"


def _check_existing(data_dir: Path, inputs: CheckedInputs, overwrite: bool) -> PreprocessResult | None:
    fingerprint = inputs.fingerprint
    manifest_path = data_dir / MANIFEST_FILE
    if not data_dir.exists():
        return None
    if overwrite:
        return None
    if not manifest_path.is_file():
        raise PreprocessError(f"{data_dir} exists but has no {MANIFEST_FILE}; remove it or pass --overwrite")
    manifest = json.loads(manifest_path.read_text())
    # Manifests written before class maps were checksummed have no class_map_sha256, which
    # reads as None and so still matches the tasks without a class map.
    previous = {key: manifest.get(key) for key in fingerprint}
    if previous != fingerprint:
        changed = sorted(key for key in fingerprint["settings"] if fingerprint["settings"][key] != (previous["settings"] or {}).get(key))
        if previous["annotations_sha256"] != fingerprint["annotations_sha256"]:
            changed.append("annotations")
        class_map = inputs.task.class_map
        if class_map is not None and previous["class_map_sha256"] != class_map.sha256:
            changed.append(f"class map {class_map.path}")
        raise PreprocessError(
            f"{data_dir} contains a dataset made with different inputs or settings (changed: {', '.join(changed) or 'unknown'}); "
            "pass --overwrite to replace it, or choose another output folder"
        )
    missing = [name for name in manifest.get("files", {}) if not (data_dir / name).is_file()]
    if missing:
        raise PreprocessError(f"{data_dir} is incomplete ({len(missing)} file(s) missing, e.g. {missing[0]}); pass --overwrite to rebuild it")
    info = load_dataset_info(data_dir)
    log.info("%s is up to date with these inputs and settings; nothing to do (overwrite rebuilds it)", data_dir)
    errors = info.raw.get("errors", {})
    return PreprocessResult(data_dir, info, errors.get("failed", 0), errors.get("skipped", 0), reused=True)


def _create_staging(parent: Path) -> Path:
    """Create a uniquely named staging folder in ``parent`` that names its owning process."""
    staging = parent / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    (staging / _OWNER_FILE).write_text(json.dumps(owner) + "\n")
    return staging


def _remove_stale_staging(parent: Path) -> None:
    """Remove staging folders of runs that were killed, and old datasets left by a killed move.

    A staging folder is removed when its owner ran on this host and that process is gone.
    Folders of live runs, and of runs on other hosts of a shared file system, are left
    alone: every run writes into its own folder, so they never mix.
    """
    if not parent.is_dir():
        return
    host = socket.gethostname()
    for path in sorted(parent.glob(f"{_STAGING_PREFIX}*")):
        try:
            owner = json.loads((path / _OWNER_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            owner = None
        if owner is not None and (owner.get("host") != host or _process_alive(owner.get("pid"))):
            log.info("leaving %s: it belongs to process %s on %s", path, owner.get("pid"), owner.get("host"))
            continue
        if owner is None and time.time() - path.stat().st_mtime < _UNOWNED_STAGING_AGE_S:
            log.info("leaving %s: it has no owner file yet and may belong to a run that is starting", path)
            continue
        log.warning("removing %s, left by a preprocessing run that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
    for path in sorted(parent.glob(f"{_OLD_PREFIX}*")):
        # Only _move_into_place creates these, and it removes them right after the new
        # dataset is in place, so one that remains was left by a killed run.
        log.warning("removing %s, a replaced dataset left by a run that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _task_groups(taco, task: TaskExamples, split_of: dict[int, str], photos_per_task: int) -> list[dict[str, Any]]:
    by_image: dict[int, list] = {}
    for example in task.examples:
        by_image.setdefault(example.image_id, []).append(example)

    groups: list[dict[str, Any]] = []
    for split in SPLITS:
        photos = []
        for image_id in sorted(image_id for image_id in by_image if split_of[image_id] == split):
            image = taco.images[image_id]
            photos.append({
                "image_id": image_id,
                "file_name": image.file_name,
                "width": image.width,
                "height": image.height,
                "examples": [
                    {"annotation_id": e.annotation_id, "bbox": list(e.bbox) if e.bbox else None,
                     "label": e.label, "label_name": e.label_name}
                    for e in sorted(by_image[image_id], key=lambda e: (e.annotation_id is not None, e.annotation_id or 0))
                ],
            })
        for start in range(0, len(photos), photos_per_task):
            groups.append({"split": split, "photos": photos[start:start + photos_per_task]})
    return groups


def _automatic_photos_per_task(photo_count: int) -> int:
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(MAX_PHOTOS_PER_TASK, math.ceil(photo_count / (TASKS_PER_CPU * cpus))))


def _start_autoscaling_coordinator() -> None:
    """Start Ray Data's autoscaling coordinator now, while the annotations load.

    Ray Data 2.60 learns how many CPUs the cluster has from this actor, which it starts on
    the first dataset of a Ray session. Until the actor replies, the executor counts zero
    CPUs and runs one task at a time ("Tasks: 1 [backpressured:tasks(ResourceBudget)]"),
    for several seconds on a loaded machine. Starting the actor early shortens that phase.
    """
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator

        get_or_create_autoscaling_coordinator()
    except (ImportError, AttributeError, RuntimeError, ValueError) as error:
        # NOTE: a private Ray Data function; without it the first tasks only start slower.
        log.debug("could not start Ray Data's autoscaling coordinator early: %s", error)


def _run_ray_pipeline(groups: list[dict], taco_dir: Path, image_settings: ImageSettings, staging: Path) -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    # Keep input order, so files and rows come out in (split, image id) order on any cluster.
    context.execution_options.preserve_order = True

    items = [{"payload": json.dumps(group)} for group in groups]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    dataset = dataset.map_batches(
        process_groups,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={
            "taco_dir": str(taco_dir),
            "image_settings": asdict(image_settings),
            "errors_dir": str(staging / _STAGED_ERRORS),
            "tasks_dir": str(staging / _STAGED_TASKS),
        },
    )
    dataset.write_parquet(str(staging / "_staged"), arrow_parquet_args_fn=lambda: {"compression": "zstd", "schema": SCHEMA})


def process_groups(batch: pa.Table, taco_dir: str, image_settings: dict, errors_dir: str, tasks_dir: str | None = None) -> pa.Table:
    """Ray Data map function: decode the photos of one or more groups into example rows.

    Failed examples are written as JSON lines to ``errors_dir`` (one file per group,
    replaced atomically, so a retried task leaves no duplicates) and left out of the rows.
    With ``tasks_dir``, one JSON record per group records where and how fast it ran.
    """
    settings = ImageSettings(**image_settings)
    root = Path(taco_dir)
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for payload in batch.column("payload").to_pylist():
        group = json.loads(payload)
        failures = []
        started, cpu_started = time.time(), time.process_time()
        draft_factors: Counter = Counter()
        for photo in group["photos"]:
            boxes = [tuple(e["bbox"]) if e["bbox"] else None for e in photo["examples"]]
            arrays, info = read_examples(root, photo["file_name"], (photo["width"], photo["height"]), boxes, settings)
            draft_factors[info.draft_factor] += 1
            for example, array in zip(photo["examples"], arrays):
                if isinstance(array, np.ndarray):
                    columns["image"].append(array.tobytes())
                    columns["label"].append(example["label"])
                    columns["label_name"].append(example["label_name"])
                    columns["image_id"].append(photo["image_id"])
                    columns["annotation_id"].append(example["annotation_id"])
                    columns["file_name"].append(photo["file_name"])
                    columns["bbox"].append(example["bbox"])
                    columns["split"].append(group["split"])
                else:
                    failures.append({
                        "split": group["split"], "image_id": photo["image_id"], "annotation_id": example["annotation_id"],
                        "file_name": photo["file_name"], "reason": array.reason, "message": array.message,
                    })
        if failures:
            _write_group_errors(Path(errors_dir), group, failures)
        if tasks_dir is not None:
            record = {
                "split": group["split"],
                "first_image_id": group["photos"][0]["image_id"],
                "photos": len(group["photos"]),
                "examples": sum(len(photo["examples"]) for photo in group["photos"]),
                "failed": len(failures),
                "node_id": _ray_node_id(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": started,
                "seconds": time.time() - started,
                "cpu_seconds": time.process_time() - cpu_started,
                "decoder": jpeg_decoder_name(),
                "draft_factors": {str(factor): count for factor, count in sorted(draft_factors.items())},
            }
            _write_atomically(Path(tasks_dir) / f"{group['split']}-{record['first_image_id']:012d}.json", json.dumps(record) + "\n")
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except (ImportError, RuntimeError):
        return None


def _write_atomically(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")
    temporary.write_text(text)
    os.replace(temporary, target)


def _log_failed_photos(failed: list[dict], errors_path: Path) -> None:
    """Log one line per photo that failed (not per crop), up to FAILED_PHOTOS_LOGGED photos."""
    photos: dict[tuple[str, str], str] = {}
    for failure in failed:
        photos.setdefault((failure["file_name"], failure["reason"]), failure["message"])
    for (file_name, reason), message in sorted(photos.items())[:FAILED_PHOTOS_LOGGED]:
        log.warning("failed %s (%s): %s", file_name, reason, message)
    if len(photos) > FAILED_PHOTOS_LOGGED:
        log.warning("... and %d more failed photo(s), all listed in %s", len(photos) - FAILED_PHOTOS_LOGGED, errors_path)


def _warn_missing_classes(counts: dict[str, dict[str, Any]], task: TaskExamples) -> None:
    """Warn about classes that no train example or no val example represents."""
    per_class = {split: counts[split]["per_class"] for split in SPLITS}
    untrained = [name for name in task.class_names if per_class["train"][name] == 0]
    if untrained:
        log.warning("%d class(es) have no train example and cannot be learned: %s; merge small classes with "
                    "--min-class-examples N or use a class map", len(untrained), ", ".join(untrained))
    unvalidated = [name for name in task.class_names if per_class["val"][name] == 0 and name not in untrained]
    if task.task.startswith("binary:") and task.class_names[1] in unvalidated:
        log.warning("the val split has no %r example, so the tuning metric (average precision or F1 of %r) is "
                    "undefined; use a larger val fraction (--split) or more photos", task.class_names[1], task.class_names[1])
    elif unvalidated:
        log.warning("%d class(es) have no val example, so tuning cannot measure them: %s", len(unvalidated), ", ".join(unvalidated))


def _write_group_errors(errors_dir: Path, group: dict, failures: list[dict]) -> None:
    first = group["photos"][0]["image_id"]
    _write_atomically(errors_dir / f"{group['split']}-{first:012d}.jsonl", "".join(json.dumps(failure) + "\n" for failure in failures))
    # The driver reports the failures after the run (Ray's log deduplication would fold
    # worker lines that differ only in digits, as TACO's file names do).
    for file_name, reason in sorted({(f["file_name"], f["reason"]) for f in failures}):
        log.debug("%s %s (%s)", "skipped" if reason in SKIP_REASONS else "failed", file_name, reason)


def _arrange_staged_files(staging: Path) -> dict[str, list[Path]]:
    """Move staged Parquet files into per-split folders, named in row order."""
    pieces: list[tuple[tuple[int, int, int], str, pa.Table | Path]] = []
    for path in sorted((staging / "_staged").glob("*.parquet")):
        keys = pq.read_table(path, columns=["split", "image_id", "annotation_id"])
        if keys.num_rows == 0:
            continue
        splits = set(keys.column("split").to_pylist())
        if len(splits) == 1:
            split = splits.pop()
            pieces.append((_row_key(keys, 0), split, path))
            continue
        # A task may have handled groups of two splits; cut its file apart.
        table = pq.read_table(path, schema=SCHEMA)
        for split in sorted(splits):
            part = table.filter(pc.equal(table.column("split"), split))
            pieces.append((_row_key(part, 0), split, part))

    files: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        (staging / split).mkdir()
        ordered = sorted((piece for piece in pieces if piece[1] == split), key=lambda piece: piece[0])
        for index, (_, _, source) in enumerate(ordered):
            target = staging / split / f"part-{index:06d}.parquet"
            if isinstance(source, Path):
                os.replace(source, target)
            else:
                pq.write_table(source, target, compression="zstd")
            files[split].append(target)
    shutil.rmtree(staging / "_staged", ignore_errors=True)
    _check_row_order(files)
    return files


def _row_key(table: pa.Table, index: int) -> tuple[int, int, int]:
    image_id = table.column("image_id")[index].as_py()
    annotation_id = table.column("annotation_id")[index].as_py()
    return (image_id, 0 if annotation_id is None else 1, annotation_id or 0)


def _check_row_order(files: dict[str, list[Path]]) -> None:
    for split, paths in files.items():
        previous = None
        for path in paths:
            keys = pq.read_table(path, columns=["image_id", "annotation_id"])
            for index in range(keys.num_rows):
                key = _row_key(keys, index)
                if previous is not None and key < previous:
                    raise PreprocessError(f"internal error: rows of split {split} are out of order at {path.name} row {index}")
                previous = key


def _collect_errors(staging: Path) -> list[dict]:
    errors_dir = staging / _STAGED_ERRORS
    errors: list[dict] = []
    order = {split: index for index, split in enumerate(SPLITS)}
    for path in sorted(errors_dir.glob("*.jsonl")) if errors_dir.is_dir() else []:
        errors.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    shutil.rmtree(errors_dir, ignore_errors=True)
    errors.sort(key=lambda e: (order[e["split"]], e["image_id"], e["annotation_id"] is not None, e["annotation_id"] or 0))
    return errors


def _collect_tasks(staging: Path) -> list[dict]:
    """Read the per-group records of the Ray tasks, in (split, first image id) order."""
    tasks_dir = staging / _STAGED_TASKS
    order = {split: index for index, split in enumerate(SPLITS)}
    tasks = [json.loads(path.read_text()) for path in tasks_dir.glob("*.json")] if tasks_dir.is_dir() else []
    shutil.rmtree(tasks_dir, ignore_errors=True)
    tasks.sort(key=lambda t: (order[t["split"]], t["first_image_id"]))
    return tasks


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _finish(
    staging: Path,
    data_dir: Path,
    files: dict[str, list[Path]],
    errors: list[dict],
    task: TaskExamples,
    settings: PreprocessSettings,
    fingerprint: dict,
    annotations_path: Path,
    taco_dir: Path,
    options: RunOptions,
) -> PreprocessResult:
    failed = [e for e in errors if e["reason"] not in SKIP_REASONS]
    skipped = [e for e in errors if e["reason"] in SKIP_REASONS]
    total = len(task.examples)

    counts: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        labels = Counter()
        for path in files[split]:
            labels.update(pq.read_table(path, columns=["label_name"]).column("label_name").to_pylist())
        counts[split] = {"total": sum(labels.values()), "per_class": {name: labels.get(name, 0) for name in task.class_names}}

    summary = {split: counts[split]["per_class"] for split in SPLITS}
    print(format_summary(summary))
    _write_summary_csv(staging / SUMMARY_FILE, summary)
    _write_jsonl(staging / ERRORS_FILE, errors)

    _log_failed_photos(failed, data_dir / ERRORS_FILE)
    _warn_missing_classes(counts, task)
    reasons = Counter(e["reason"] for e in errors)
    if errors:
        print(f"{len(failed)} of {total} examples failed and {len(skipped)} were skipped: "
              + ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
              + f" (details in {data_dir / ERRORS_FILE})")

    dataset = {
        "format_version": FORMAT_VERSION,
        "task": task.task,
        "is_crop_task": task.is_crop_task,
        "class_names": task.class_names,
        "image_size": settings.image.size,
        "color_mode": settings.image.color_mode,
        "channels": settings.image.channels,
        "settings": settings.to_dict(),
        "split_fractions": dict(zip(SPLITS, settings.fractions.as_tuple())),
        "seed": settings.seed,
        "merged_into_other": task.merged_into_other,
        "excluded_annotations": task.excluded_annotations,
        "counts": counts,
        "errors": {"failed": len(failed), "skipped": len(skipped), "by_reason": dict(sorted(reasons.items()))},
        "annotations": str(annotations_path),
        "data_root": str(taco_dir),
        "schema": {field.name: str(field.type) for field in SCHEMA},
        "image_layout": "uint8 bytes, row-major (height, width, channels)",
        "created_by": f"raywaste {__version__}",
    }
    (staging / DATASET_FILE).write_text(json.dumps(dataset, indent=2) + "\n")

    (staging / _OWNER_FILE).unlink(missing_ok=True)
    manifest = {
        **fingerprint,
        "raywaste_version": __version__,
        "counts": {split: counts[split]["total"] for split in SPLITS},
        "files": {
            str(path.relative_to(staging)): _sha256(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file() and path.name != MANIFEST_FILE
        },
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    if total and len(failed) / total > options.max_error_fraction:
        kept = data_dir.parent / f"data-failed-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(staging, kept)
        raise PreprocessError(
            f"{len(failed)} of {total} examples failed ({len(failed) / total:.1%}), more than the allowed "
            f"{options.max_error_fraction:.1%}; see {kept / ERRORS_FILE}, fix the inputs or raise --max-error-fraction"
        )

    _move_into_place(staging, data_dir)
    info = load_dataset_info(data_dir)
    return PreprocessResult(data_dir, info, len(failed), len(skipped), reused=False)


def _write_summary_csv(path: Path, summary: dict[str, dict[str, int]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", *SPLITS])
        class_names = list(summary[SPLITS[0]])
        for name in class_names:
            writer.writerow([name, *(summary[split][name] for split in SPLITS)])


def _move_into_place(staging: Path, data_dir: Path) -> None:
    """Replace ``data_dir`` with ``staging``; an old dataset is removed only after the new one is in place."""
    old = None
    if data_dir.exists():
        old = data_dir.parent / f"{_OLD_PREFIX}{uuid.uuid4().hex[:8]}"
        os.replace(data_dir, old)
    os.replace(staging, data_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def settings_with(settings: PreprocessSettings, **changes: Any) -> PreprocessSettings:
    """Return a copy of ``settings`` with top-level fields or image fields changed by name."""
    image_fields = set(ImageSettings.__dataclass_fields__)
    # The CLI's --image-size is the image field "size".
    if "image_size" in changes and "size" not in changes:
        changes["size"] = changes.pop("image_size")
    known = image_fields | set(PreprocessSettings.__dataclass_fields__) - {"image"}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    image_changes = {key: value for key, value in changes.items() if key in image_fields}
    other = {key: value for key, value in changes.items() if key not in image_fields}
    return replace(settings, image=replace(settings.image, **image_changes), **other)
