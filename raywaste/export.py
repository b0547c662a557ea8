"""Export the preprocessed dataset as NumPy arrays, one ``.npy`` file per split and column.

For code that expects plain arrays (``np.load("train_images.npy")``), ``export_npy`` writes

    train_images.npy  val_images.npy  test_images.npy   (n, size, size, channels)
    train_labels.npy  val_labels.npy  test_labels.npy   (n,) int32, indexes into class_names
    class_names.json                                     the class names in label order

Images are uint8 by default, or float32 scaled to [0, 1]. The export streams: it reads the
Parquet files batch by batch and writes into memory-mapped ``.npy`` files, so its memory
use depends on ``batch_rows``, not on the size of the dataset. Rows keep the dataset's
order (image id, then annotation id).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raywaste.dataset import DEFAULT_DATA_DIR, DatasetError, load_dataset_info, split_files
from raywaste.splits import SPLITS

log = logging.getLogger(__name__)

DTYPES = ("uint8", "float32")
DEFAULT_BATCH_ROWS = 1024
"""Rows read from Parquet at a time: 1024 crops of 128x128 RGB are 48 MiB as uint8."""
CLASS_NAMES_FILE = "class_names.json"


@dataclass
class ExportResult:
    """Result of :func:`export_npy`."""

    dest: Path
    counts: dict[str, int]
    files: list[Path]


def export_npy(
    out_dir: str | Path,
    dest: str | Path | None = None,
    dtype: str = "uint8",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    dataset_name: str = "data",
) -> ExportResult:
    """Write each split of ``out_dir/dataset_name`` as ``SPLIT_images.npy`` and ``SPLIT_labels.npy`` in ``dest``.

    ``dest`` defaults to ``out_dir/npy``, or ``out_dir/npy-<suffix>`` for ``data-<suffix>``. Each file is written under a temporary name and
    renamed when complete, so an interrupted export leaves no truncated ``.npy`` file.
    """
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if batch_rows < 1:
        raise ValueError(f"invalid batch_rows {batch_rows}; expected 1 or more")
    data_dir = Path(out_dir) / dataset_name
    info = load_dataset_info(data_dir)
    if dest is None:
        # Each dataset gets its own folder: data -> npy, data-64-grayscale -> npy-64-grayscale.
        dest = Path(out_dir) / ("npy" + dataset_name.removeprefix(DEFAULT_DATA_DIR))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    counts: dict[str, int] = {}
    for split in SPLITS:
        files = split_files(data_dir, split)
        count = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
        counts[split] = count
        images_path = dest / f"{split}_images.npy"
        labels_path = dest / f"{split}_labels.npy"
        _write_split(files, count, info.input_shape, np.dtype(dtype), batch_rows, images_path, labels_path)
        written += [images_path, labels_path]
        log.info("exported %d %s examples to %s", count, split, images_path)

    names_path = dest / CLASS_NAMES_FILE
    names_path.write_text(json.dumps(info.class_names, indent=2) + "\n")
    written.append(names_path)
    return ExportResult(dest, counts, written)


def _write_split(
    files: list[Path],
    count: int,
    input_shape: tuple[int, int, int],
    dtype: np.dtype,
    batch_rows: int,
    images_path: Path,
    labels_path: Path,
) -> None:
    images_tmp = images_path.with_name(images_path.name + ".tmp")
    labels_tmp = labels_path.with_name(labels_path.name + ".tmp")
    images = np.lib.format.open_memmap(images_tmp, mode="w+", dtype=dtype, shape=(count, *input_shape))
    labels = np.lib.format.open_memmap(labels_tmp, mode="w+", dtype=np.int32, shape=(count,))
    try:
        row = 0
        for path in files:
            parquet = pq.ParquetFile(path)
            file_row = 0
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=["image", "label"]):
                pixels = batch_images(batch.column("image"), input_shape, f"{path} row {file_row}")
                end = row + len(pixels)
                if end > count:
                    raise DatasetError(f"{path} has more rows than its Parquet metadata lists; preprocess again")
                images[row:end] = pixels if dtype == np.uint8 else pixels.astype(np.float32) / np.float32(255)
                labels[row:end] = batch.column("label").to_numpy(zero_copy_only=False)
                row, file_row = end, file_row + len(pixels)
        if row != count:
            raise DatasetError(f"read {row} rows but the Parquet metadata promised {count}; preprocess again")
        images.flush()
        labels.flush()
    except BaseException:
        del images, labels
        images_tmp.unlink(missing_ok=True)
        labels_tmp.unlink(missing_ok=True)
        raise
    del images, labels
    os.replace(images_tmp, images_path)
    os.replace(labels_tmp, labels_path)


def batch_images(column: pa.Array, input_shape: tuple[int, int, int], where: str) -> np.ndarray:
    """View a binary ``image`` column as a uint8 array of shape ``(rows, *input_shape)`` without a copy per row.

    Raises :class:`DatasetError` naming ``where`` when a value has the wrong length or is null.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise DatasetError(f"{where}: the image column has null values; preprocess again")
    expected = int(np.prod(input_shape))
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], dtype=offset_type)[column.offset:column.offset + len(column) + 1]
    lengths = np.diff(offsets)
    if len(lengths) and not np.all(lengths == expected):
        bad = int(np.flatnonzero(lengths != expected)[0])
        raise DatasetError(f"{where}: image {bad} has {lengths[bad]} bytes, expected {expected} for shape {input_shape}")
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]] if len(column) else np.empty(0, np.uint8)
    return data.reshape(len(column), *input_shape)
