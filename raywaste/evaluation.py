"""Evaluation stage: the best model on the held-out test split.

Loads ``OUT/best_model.keras``, predicts the test split and writes ``OUT/metrics.json``
(accuracy, per-class precision, recall, F1 and support, macro F1, confusion matrix),
prints the table, and draws the confusion matrix to ``OUT/confusion_matrix.png``.
Only test rows are read; the validation split stays with tuning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raywaste.dataset import DEFAULT_DATA_DIR, load_dataset_info, read_split_table, table_to_arrays
from raywaste.metrics import average_precision, classification_report, format_report
from raywaste.tuning import BEST_MODEL, BEST_MODEL_INFO

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"


class EvaluationError(RuntimeError):
    """Evaluation could not run."""


@dataclass
class EvaluationResult:
    """Result of :func:`evaluate`. ``report`` is the content of ``metrics.json``."""

    report: dict[str, Any]
    metrics_path: Path
    confusion_png: Path

    @property
    def accuracy(self) -> float:
        return self.report["accuracy"]

    @property
    def macro_f1(self) -> float:
        return self.report["macro_f1"]


def evaluate(out_dir: str | Path, model_path: str | Path | None = None, split: str = "test") -> EvaluationResult:
    """Score the best model (or ``model_path``) on ``split`` of ``OUT/data`` and write the results."""
    from raywaste.training import configure_tensorflow

    out_dir = Path(out_dir).resolve()
    model_path = Path(model_path) if model_path else out_dir / BEST_MODEL
    if not model_path.is_file():
        raise EvaluationError(f"model not found: {model_path}; run 'raywaste tune' first")
    info = load_dataset_info(out_dir / _model_data_dir(model_path))
    table = read_split_table(info.data_dir, split, columns=["image", "label", "image_id"])
    if table.num_rows == 0:
        raise EvaluationError(f"the {split} split in {info.data_dir} is empty; preprocess with a larger {split} fraction")
    images, labels = table_to_arrays(table, info.input_shape)

    configure_tensorflow(None)
    import keras

    from raywaste.model import class_probabilities

    model = keras.models.load_model(model_path)
    expected_shape = tuple(model.input_shape[1:])
    if expected_shape != info.input_shape:
        raise EvaluationError(f"{model_path} expects inputs of shape {expected_shape}, but the dataset has {info.input_shape}")
    probabilities = class_probabilities(model, images)
    predicted = probabilities.argmax(axis=1)

    report = classification_report(labels, predicted, info.class_names)
    report.update({
        "split": split,
        "task": info.task,
        "model": str(model_path),
        "image_ids": sorted(set(int(i) for i in table.column("image_id").to_pylist())),
    })
    if info.is_binary:
        report["average_precision"] = average_precision(labels == 1, probabilities[:, 1])
        report["decision_threshold"] = 0.5

    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(report, indent=2) + "\n")
    confusion_png = out_dir / CONFUSION_PNG
    plot_confusion_matrix(np.asarray(report["confusion_matrix"]), info.class_names, confusion_png, title=f"{info.task}, {split} split")

    print(f"{split} split of {info.task}: {report['num_examples']} examples")
    print(format_report(report))
    if info.is_binary:
        print(f"average precision: {report['average_precision']:.3f}")
    print(f"metrics written to {metrics_path}, confusion matrix to {confusion_png}")
    return EvaluationResult(report, metrics_path, confusion_png)


def _model_data_dir(model_path: Path) -> str:
    """Return the dataset folder a model was tuned on, from the best_model.json beside it (default: data)."""
    info_path = model_path.with_suffix(".json")
    if model_path.name == BEST_MODEL and info_path.name == BEST_MODEL_INFO and info_path.is_file():
        try:
            return json.loads(info_path.read_text()).get("data_dir") or DEFAULT_DATA_DIR
        except json.JSONDecodeError as error:
            raise EvaluationError(f"cannot read {info_path}: {error}; tune again or pass --model") from error
    return DEFAULT_DATA_DIR


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path, title: str = "") -> None:
    """Draw a confusion matrix with counts in the cells and class names on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.45 * len(class_names) + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1.0, size))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if title:
        axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            axes.text(column, row, str(matrix[row, column]), ha="center", va="center",
                      color="white" if matrix[row, column] > threshold else "black", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
