"""The preprocessed dataset on disk: its layout, Parquet schema and readers.

Layout under ``OUT/data/`` (further datasets of other image sizes or color modes may sit
beside it as ``OUT/data-<name>/``, see :func:`find_datasets`)::

    dataset.json        class names, image size, color mode, task, splits, seed, counts
    manifest.json       settings, checksum of annotations.json, counts, checksum per file
    split_summary.csv   examples per class per split
    errors.jsonl        one JSON object per example that could not be made, with its reason
    tasks.jsonl         one JSON object per Ray task: its photos, node, process and timing
    train/ val/ test/   Parquet files ``part-NNNNNN.parquet``, rows sorted by
                        (image id, annotation id) when read in name order

Every Parquet row is one example (see :data:`SCHEMA`). ``image`` contains
``image_size * image_size * channels`` uint8 bytes in row-major (height, width,
channel) order, so with NumPy::

    np.frombuffer(row["image"], np.uint8).reshape(size, size, channels)

The readers here need only pyarrow and NumPy, not Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
DEFAULT_DATA_DIR = "data"
DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.json"
ERRORS_FILE = "errors.jsonl"
SUMMARY_FILE = "split_summary.csv"
TASKS_FILE = "tasks.jsonl"

SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("annotation_id", pa.int64(), nullable=True),  # null for whole-image examples
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("bbox", pa.list_(pa.float64(), 4), nullable=True),  # x, y, width, height as annotated
        pa.field("split", pa.string(), nullable=False),
    ]
)


def manifest_annotations_sha256(data_dir: Path) -> str | None:
    """Return the checksum of the annotations a dataset was made from, from its manifest; None if unreadable."""
    try:
        return json.loads((data_dir / MANIFEST_FILE).read_text()).get("annotations_sha256")
    except (OSError, json.JSONDecodeError):
        return None


class DatasetError(ValueError):
    """A preprocessed dataset that is missing or does not fit the request."""


@dataclass(frozen=True)
class DatasetInfo:
    """The contents of ``dataset.json``."""

    path: Path
    task: str
    class_names: list[str]
    image_size: int
    color_mode: str
    counts: dict[str, int]
    raw: dict = field(repr=False)
    """The whole of dataset.json."""

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "rgb" else 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_binary(self) -> bool:
        return self.num_classes == 2 and self.task.startswith("binary:")

    @property
    def data_dir(self) -> Path:
        return self.path.parent


def load_dataset_info(data_dir: str | Path) -> DatasetInfo:
    """Read ``dataset.json`` from a preprocessed data folder (``OUT/data``)."""
    path = Path(data_dir) / DATASET_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path} not found; run 'raywaste preprocess' first") from None
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
    if raw.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path} has format version {raw.get('format_version')}, expected {FORMAT_VERSION}; preprocess again")
    return DatasetInfo(
        path=path,
        task=raw["task"],
        class_names=list(raw["class_names"]),
        image_size=int(raw["image_size"]),
        color_mode=raw["color_mode"],
        counts={split: int(entry["total"]) for split, entry in raw["counts"].items()},
        raw=raw,
    )


def find_datasets(out_dir: str | Path) -> list[DatasetInfo]:
    """Return the preprocessed datasets under ``out_dir``: ``data`` first, then ``data-*`` by name.

    A folder counts when it contains ``dataset.json``; staging and failed folders of an
    unfinished preprocessing run (``.data-staging-*``, ``data-failed-*``) are skipped.
    """
    out_dir = Path(out_dir)
    folders = [out_dir / DEFAULT_DATA_DIR] + sorted(out_dir.glob(f"{DEFAULT_DATA_DIR}-*"))
    return [
        load_dataset_info(folder)
        for folder in folders
        if (folder / DATASET_FILE).is_file() and not folder.name.startswith(f"{DEFAULT_DATA_DIR}-failed-")
    ]


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """Return the Parquet files of a split in row order."""
    return sorted((Path(data_dir) / split).glob("*.parquet"))


def read_split_table(data_dir: str | Path, split: str, columns: list[str] | None = None) -> pa.Table:
    """Read one split into a pyarrow Table (all files, in row order)."""
    files = split_files(data_dir, split)
    if not files:
        return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(file, columns=columns, schema=SCHEMA) for file in files)


def load_split_arrays(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a split as ``(images, labels)``: uint8 ``(n, size, size, channels)`` and int32 ``(n,)``."""
    info = load_dataset_info(data_dir)
    table = read_split_table(data_dir, split, columns=["image", "label"])
    return table_to_arrays(table, info.input_shape)


def table_to_arrays(table: pa.Table, input_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Turn the ``image`` and ``label`` columns of a table into NumPy arrays."""
    count = table.num_rows
    images = np.empty((count, *input_shape), dtype=np.uint8)
    expected = int(np.prod(input_shape))
    for index, value in enumerate(table.column("image").to_pylist()):
        if len(value) != expected:
            raise DatasetError(f"row {index} has an image of {len(value)} bytes, expected {expected} for shape {input_shape}")
        images[index] = np.frombuffer(value, dtype=np.uint8).reshape(input_shape)
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int32)
    return images, labels
