"""Evaluation stage: the best model on the held-out test split, with figures and baselines.

1. Predict the test split with ``OUT/best_model.keras`` and write ``OUT/metrics.json``:
   accuracy, per-class precision, recall, F1 and support, macro F1, the confusion matrix.
2. Binary tasks: choose a decision threshold on the validation split (the highest F1 of
   the positive class) and apply it to the test split. Both the 0.5 threshold's and the
   chosen threshold's metrics are reported. Test rows never influence the choice.
3. Score baselines on the same test rows: the train split's majority class, and the
   course's dense network trained on the train split (see :mod:`raywaste.baselines`).
4. Draw the figures: the confusion matrix, per-class scores, the precision-recall curve
   (binary tasks) and a grid of misclassified test examples.

The validation split serves only for the threshold, and the train split only for the baselines.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raywaste.baselines import DenseBaselineSettings, dense_baseline_probabilities, majority_class, majority_probabilities
from raywaste.dataset import (
    DEFAULT_DATA_DIR,
    DatasetInfo,
    load_dataset_info,
    load_split_arrays,
    manifest_annotations_sha256,
    read_split_table,
    table_to_arrays,
)
from raywaste.metrics import average_precision, best_f1_threshold, classification_report, format_report, precision_recall_curve
from raywaste.plots import Curve, Tile, plot_class_scores, plot_image_grid, plot_precision_recall
from raywaste.tuning import BEST_MODEL, BEST_MODEL_INFO

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
CLASS_SCORES_PNG = "class_scores.png"
PRECISION_RECALL_PNG = "precision_recall.png"
MISCLASSIFIED_PNG = "misclassified.png"
DEFAULT_THRESHOLD = 0.5
MISCLASSIFIED_TILE_PX = 160
MISCLASSIFIED_COLUMNS = 4


class EvaluationError(RuntimeError):
    """Evaluation could not run."""


@dataclass(frozen=True)
class EvaluationSettings:
    """Settings of the baselines and figures that evaluation adds beside the model's own scores."""

    dense_baseline: DenseBaselineSettings = field(default_factory=DenseBaselineSettings)
    misclassified_examples: int = 16
    """Most confident mistakes shown in misclassified.png (0: no grid)."""


@dataclass
class EvaluationResult:
    """Result of :func:`evaluate`. ``report`` is the content of ``metrics.json``."""

    report: dict[str, Any] = field(repr=False)
    metrics_path: Path
    confusion_png: Path
    figures: dict[str, Path] = field(default_factory=dict)
    """Every PNG written, by name (``confusion_matrix``, ``class_scores``, ...)."""

    @property
    def accuracy(self) -> float:
        return self.report["accuracy"]

    @property
    def macro_f1(self) -> float:
        return self.report["macro_f1"]


def evaluate(
    out_dir: str | Path,
    model_path: str | Path | None = None,
    split: str = "test",
    settings: EvaluationSettings | None = None,
) -> EvaluationResult:
    """Score the best model (or ``model_path``) on ``split`` of ``OUT/data`` and write the results."""
    from raywaste.training import configure_tensorflow

    settings = settings or EvaluationSettings()
    out_dir = Path(out_dir).resolve()
    model_path = Path(model_path) if model_path else out_dir / BEST_MODEL
    if not model_path.is_file():
        raise EvaluationError(f"model not found: {model_path}; run 'raywaste tune' first")
    info = load_dataset_info(out_dir / model_data_dir(model_path))
    check_model_matches_dataset(model_path, info)
    table = read_split_table(info.data_dir, split, columns=["image", "label", "image_id", "annotation_id", "file_name"])
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

    # 1. The model's scores at the usual argmax decision (0.5 for binary tasks).
    report = classification_report(labels, predicted, info.class_names)
    report.update({
        "split": split,
        "task": info.task,
        "model": str(model_path),
        "image_ids": sorted(set(int(i) for i in table.column("image_id").to_pylist())),
    })
    curves: list[Curve] = []
    if info.is_binary:
        report["average_precision"] = average_precision(labels == 1, probabilities[:, 1])
        report["decision_threshold"] = DEFAULT_THRESHOLD
        # 2. A threshold chosen on the validation split, then applied to these rows.
        val_scores = _validation_scores(model, info) if split != "val" else None
        report["chosen_threshold"] = _chosen_threshold(val_scores, labels, probabilities[:, 1], info.class_names, split)
        curves = _precision_recall_curves(report, val_scores, labels, probabilities[:, 1], split)

    # 3. Baselines on the same rows.
    report["baselines"] = _baselines(info, images, labels, settings.dense_baseline)

    # 4. Figures.
    figures = _draw_figures(out_dir, report, info, curves, table, images, labels, probabilities, settings)
    report["figures"] = {name: path.name for name, path in figures.items()}

    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{split} split of {info.task}: {report['num_examples']} examples")
    print(format_report(report))
    if info.is_binary:
        print(f"average precision: {report['average_precision']:.3f}")
        print(format_threshold(report))
    print(format_comparison(report))
    print(f"metrics written to {metrics_path}; figures: {', '.join(path.name for path in figures.values())}")
    return EvaluationResult(report, metrics_path, figures["confusion_matrix"], figures)


def _validation_scores(model, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the validation split's labels and positive-class scores, or None when it is empty."""
    from raywaste.model import class_probabilities

    val_images, val_labels = load_split_arrays(info.data_dir, "val")
    if len(val_labels) == 0:
        return None
    return val_labels, class_probabilities(model, val_images)[:, 1]


def _chosen_threshold(
    val_scores: tuple[np.ndarray, np.ndarray] | None,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: list[str],
    split: str,
) -> dict[str, Any] | None:
    positive = class_names[1]
    if val_scores is None:
        log.warning("no decision threshold chosen: the val split is empty or is the split being scored")
        return None
    val_labels, val_positive_scores = val_scores
    chosen = best_f1_threshold(val_labels == 1, val_positive_scores, preferred=DEFAULT_THRESHOLD)
    if chosen is None:
        log.warning("no decision threshold chosen: the val split has no %r examples", positive)
        return None
    threshold, val_f1 = chosen
    val_at_default = classification_report(val_labels, (val_positive_scores > DEFAULT_THRESHOLD).astype(np.int64), class_names)
    at_threshold = classification_report(labels, (scores >= threshold).astype(np.int64), class_names)
    return {
        "value": threshold,
        "chosen_on": "val",
        "criterion": f"maximum F1 of {positive!r} on the val split; scores at or above the threshold count as {positive!r}",
        "val_examples": int(len(val_labels)),
        "val_f1": val_f1,
        "val_f1_at_default": val_at_default["per_class"][positive]["f1"],
        split: {key: at_threshold[key] for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix")},
    }


def _precision_recall_curves(
    report: dict[str, Any], val_scores: tuple[np.ndarray, np.ndarray] | None, labels: np.ndarray, scores: np.ndarray, split: str
) -> list[Curve]:
    positive = report["class_names"][1]
    precision, recall, _ = precision_recall_curve(labels == 1, scores)
    default = report["per_class"][positive]
    points = [(f"threshold {DEFAULT_THRESHOLD:g}", default["recall"], default["precision"])]
    chosen = report.get("chosen_threshold")
    if chosen:
        at_chosen = chosen[split]["per_class"][positive]
        points.append((f"threshold {chosen['value']:.3g} (chosen on val)", at_chosen["recall"], at_chosen["precision"]))
    curves = [Curve(f"{split} (AP {report['average_precision']:.3f})", precision, recall, points)]
    if val_scores is not None and (val_scores[0] == 1).any():
        val_labels, val_positive_scores = val_scores
        val_precision, val_recall, _ = precision_recall_curve(val_labels == 1, val_positive_scores)
        curves.append(Curve(f"val (AP {average_precision(val_labels == 1, val_positive_scores):.3f})", val_precision, val_recall))
    return curves


def _baselines(info: DatasetInfo, images: np.ndarray, labels: np.ndarray, dense: DenseBaselineSettings) -> dict[str, Any]:
    train_images, train_labels = load_split_arrays(info.data_dir, "train")
    if len(train_labels) == 0:
        log.warning("no baselines: the train split of %s is empty", info.data_dir)
        return {}
    majority = majority_class(train_labels, info.num_classes)
    baselines = {
        "majority_class": {
            "description": f"always {info.class_names[majority]!r}, the train split's most frequent class",
            **_scores(labels, majority_probabilities(train_labels, info.num_classes, len(labels)), info.is_binary),
        }
    }

    log.info("training the dense baseline for %d epochs on %d train examples", dense.epochs, len(train_labels))
    probabilities = dense_baseline_probabilities(train_images, train_labels, images, info.num_classes, dense)
    if probabilities is None:
        log.info("dense baseline left out (epochs %d, %d grayscale train values, limit %d)",
                 dense.epochs, len(train_labels) * info.image_size**2, dense.max_train_values)
    else:
        baselines["dense_network"] = {
            "description": f"dense network without convolutions: {info.image_size}x{info.image_size} grayscale pixels, "
                           f"flattened, Dense({dense.hidden_units}, relu), {dense.epochs} epoch{'s' if dense.epochs != 1 else ''}",
            **_scores(labels, probabilities, info.is_binary),
        }
    return baselines


def _scores(labels: np.ndarray, probabilities: np.ndarray, is_binary: bool) -> dict[str, float]:
    class_count = probabilities.shape[1]
    report = classification_report(labels, probabilities.argmax(axis=1), [str(index) for index in range(class_count)])
    scores = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}
    if is_binary:
        scores["average_precision"] = average_precision(labels == 1, probabilities[:, 1])
    return scores


def _draw_figures(
    out_dir: Path,
    report: dict[str, Any],
    info: DatasetInfo,
    curves: list[Curve],
    table,
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    settings: EvaluationSettings,
) -> dict[str, Path]:
    split = report["split"]
    figures = {"confusion_matrix": out_dir / CONFUSION_PNG, "class_scores": out_dir / CLASS_SCORES_PNG}
    plot_confusion_matrix(np.asarray(report["confusion_matrix"]), info.class_names, figures["confusion_matrix"],
                          title=f"{info.task}, {split} split")
    plot_class_scores(report["per_class"], figures["class_scores"], f"per-class scores, {info.task}, {split} split")
    if curves:
        figures["precision_recall"] = out_dir / PRECISION_RECALL_PNG
        plot_precision_recall(curves, figures["precision_recall"], f"precision-recall of {info.class_names[1]!r}")

    tiles = misclassified_tiles(table, images, labels, probabilities, info.class_names, settings.misclassified_examples)
    stale = out_dir / MISCLASSIFIED_PNG
    if tiles:
        figures["misclassified"] = stale
        wrong = int((probabilities.argmax(axis=1) != labels).sum())
        plot_image_grid(tiles, stale, f"most confident mistakes on the {split} split ({len(tiles)} of {wrong} shown)",
                        columns=MISCLASSIFIED_COLUMNS, tile_px=MISCLASSIFIED_TILE_PX)
    elif stale.exists():
        # A grid from an earlier evaluation would show mistakes this model does not make.
        stale.unlink()
    return figures


def misclassified_tiles(
    table, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], limit: int
) -> list[Tile]:
    """Return tiles of up to ``limit`` misclassified examples, the most confident mistakes first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.nonzero(predicted != labels)[0]
    confidence = probabilities[wrong, predicted[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:limit]
    file_names = table.column("file_name").to_pylist()
    annotation_ids = table.column("annotation_id").to_pylist()
    tiles = []
    for index in order:
        caption = [
            f"true: {class_names[labels[index]]}",
            f"predicted: {class_names[predicted[index]]} ({probabilities[index, predicted[index]]:.2f})",
            file_names[index] if annotation_ids[index] is None else f"{file_names[index]} #{annotation_ids[index]}",
        ]
        tiles.append(Tile(images[index], caption))
    return tiles


def format_threshold(report: dict[str, Any]) -> str:
    """Describe the decision threshold chosen on the validation split and its effect on the scored split."""
    chosen = report.get("chosen_threshold")
    if not chosen:
        return f"decision threshold: {DEFAULT_THRESHOLD:g} (none could be chosen on the val split)"
    positive = report["class_names"][1]
    scored = chosen[report["split"]]
    return (
        f"decision threshold chosen on the val split ({chosen['val_examples']} examples): {chosen['value']:.4g} "
        f"(val F1 of {positive!r} {chosen['val_f1']:.3f}, {chosen['val_f1_at_default']:.3f} at {DEFAULT_THRESHOLD:g})\n"
        f"  on the {report['split']} split: accuracy {scored['accuracy']:.3f} ({report['accuracy']:.3f} at {DEFAULT_THRESHOLD:g}), "
        f"F1 of {positive!r} {scored['per_class'][positive]['f1']:.3f} ({report['per_class'][positive]['f1']:.3f} at "
        f"{DEFAULT_THRESHOLD:g}), macro F1 {scored['macro_f1']:.3f} ({report['macro_f1']:.3f} at {DEFAULT_THRESHOLD:g})"
    )


def comparison_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the model and its baselines as rows of name, scores and a description.

    The scores are accuracy, macro F1 and, for binary tasks, average precision (None otherwise).
    """
    rows = [{"name": "tuned CNN", "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
             "average_precision": report.get("average_precision"), "description": "the best trial's model"}]
    chosen = report.get("chosen_threshold")
    if chosen:
        scored = chosen[report["split"]]
        rows[0]["description"] += f", threshold {DEFAULT_THRESHOLD:g}"
        rows.append({"name": f"tuned CNN, threshold {chosen['value']:.3g}", "accuracy": scored["accuracy"],
                     "macro_f1": scored["macro_f1"], "average_precision": report.get("average_precision"),
                     "description": "the same model, threshold chosen on the val split"})
    names = {"majority_class": "majority class", "dense_network": "dense network"}
    for key, baseline in report.get("baselines", {}).items():
        rows.append({"name": names.get(key, key), "accuracy": baseline["accuracy"], "macro_f1": baseline["macro_f1"],
                     "average_precision": baseline.get("average_precision"), "description": baseline["description"]})
    return rows


def format_comparison(report: dict[str, Any]) -> str:
    """Render the model beside its baselines as a fixed-width table."""
    rows = comparison_rows(report)
    binary = report.get("average_precision") is not None
    width = max(len(row["name"]) for row in rows)
    header = f"{'model':<{width}}  accuracy  macro F1" + ("  avg precision" if binary else "")
    lines = [f"model and baselines on the {report['split']} split:", header]
    for row in rows:
        line = f"{row['name']:<{width}}  {row['accuracy']:8.3f}  {row['macro_f1']:8.3f}"
        if binary:
            line += f"  {row['average_precision']:13.3f}"
        lines.append(f"{line}  ({row['description']})")
    return "\n".join(lines)


def dataset_changes(model_info: dict, info: DatasetInfo) -> list[str]:
    """Name what differs between the dataset a model was tuned on and the dataset now in its folder.

    ``model_info`` is the model's ``best_model.json``. An empty list means the dataset is the
    one the model was tuned on, as far as the recorded settings and annotations tell.
    """
    changes = [key for key in ("task", "class_names", "image_size", "color_mode")
               if key in model_info and model_info[key] != info.raw.get(key)]
    tuned_on = model_info.get("dataset") or {}
    current = info.raw.get("settings") or {}
    changes += [f"settings.{key}" for key in sorted(set(tuned_on) | set(current)) if tuned_on.get(key) != current.get(key)]
    recorded = model_info.get("annotations_sha256")
    if recorded and manifest_annotations_sha256(info.data_dir) != recorded:
        changes.append("annotations")
    return changes


def check_model_matches_dataset(model_path: Path, info: DatasetInfo) -> None:
    """Raise EvaluationError when the dataset in ``info`` is not the one the best model was tuned on.

    Scoring a model on a dataset preprocessed again with another task, split or seed would
    give plausible but wrong numbers, and with another split, test rows the model trained on.
    """
    info_path = model_path.with_suffix(".json")
    if model_path.name != BEST_MODEL or not info_path.is_file():
        return
    model_info = json.loads(info_path.read_text())
    changes = dataset_changes(model_info, info)
    if changes:
        raise EvaluationError(
            f"{model_path.name} was tuned on {model_info.get('task')} with other dataset settings than "
            f"{info.data_dir} now has (changed: {', '.join(changes)}); run 'raywaste tune {model_path.parent} "
            "--overwrite' to tune on the current dataset")


def model_data_dir(model_path: Path) -> str:
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
