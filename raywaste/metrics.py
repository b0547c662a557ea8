"""Classification metrics in plain NumPy: confusion matrix, precision, recall, F1, average precision.

Conventions: a class with no predictions has precision 0, a class with no examples has
recall 0, and F1 is 0 where precision and recall are both 0. These match scikit-learn's
``zero_division=0``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(true_labels: np.ndarray, predicted_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the ``(num_classes, num_classes)`` matrix with true classes as rows."""
    true_labels = np.asarray(true_labels, dtype=np.int64)
    predicted_labels = np.asarray(predicted_labels, dtype=np.int64)
    if true_labels.shape != predicted_labels.shape:
        raise ValueError(f"label arrays differ in shape: {true_labels.shape} and {predicted_labels.shape}")
    for name, labels in (("true", true_labels), ("predicted", predicted_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true_labels, predicted_labels), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Return precision, recall, F1 and support per class from a confusion matrix."""
    true_positives = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positives), where=denominator > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def macro_f1(true_labels: np.ndarray, predicted_labels: np.ndarray, num_classes: int) -> float:
    """Unweighted mean F1 over the classes that occur in ``true_labels`` or the predictions."""
    matrix = confusion_matrix(true_labels, predicted_labels, num_classes)
    scores = per_class_scores(matrix)
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    return float(scores["f1"][present].mean()) if present.any() else 0.0


def precision_recall_curve(true_binary: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return precision, recall and thresholds, from the highest threshold to the lowest.

    Entry ``k`` counts an example as positive when its score is at least
    ``thresholds[k]``; there is one entry per distinct score. Recall is 0 everywhere
    when there are no positives.
    """
    true_binary = np.asarray(true_binary).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if true_binary.shape != scores.shape:
        raise ValueError(f"labels and scores differ in shape: {true_binary.shape} and {scores.shape}")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    hits = true_binary[order]
    # Thresholds sit at the last index of each run of equal scores.
    last_of_run = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(sorted_scores) - 1] if len(scores) else np.array([], dtype=np.int64)
    true_positive_counts = np.cumsum(hits)[last_of_run]
    predicted_counts = last_of_run + 1
    precision = true_positive_counts / predicted_counts
    positives = int(true_binary.sum())
    recall = true_positive_counts / positives if positives else np.zeros(len(last_of_run))
    return precision, recall, sorted_scores[last_of_run]


def average_precision(true_binary: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum (scikit-learn's definition).

    Returns 0.0 when there are no positives.
    """
    if not np.asarray(true_binary).astype(bool).any():
        return 0.0
    precision, recall, _ = precision_recall_curve(true_binary, scores)
    recall_steps = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_steps * precision))


def best_f1_threshold(true_binary: np.ndarray, scores: np.ndarray, preferred: float = 0.5) -> tuple[float, float] | None:
    """Return the threshold with the highest F1 of the positive class, and that F1.

    The candidates are the distinct scores (an example is positive when its score is at
    least the threshold). Among equal F1 the threshold closest to ``preferred`` wins, so
    the choice moves away from the usual 0.5 only for a gain. Returns None when there
    are no positives, since F1 is 0 at every threshold then.
    """
    if not np.asarray(true_binary).astype(bool).any():
        return None
    precision, recall, thresholds = precision_recall_curve(true_binary, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(precision), where=denominator > 0)
    best = f1.max()
    candidates = np.nonzero(np.isclose(f1, best, rtol=0.0, atol=1e-12))[0]
    chosen = candidates[np.argmin(np.abs(thresholds[candidates] - preferred))]
    return float(thresholds[chosen]), float(f1[chosen])


def classification_report(true_labels: np.ndarray, predicted_labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Return accuracy, per-class precision/recall/F1/support, macro and weighted averages, and the confusion matrix."""
    num_classes = len(class_names)
    matrix = confusion_matrix(true_labels, predicted_labels, num_classes)
    scores = per_class_scores(matrix)
    total = int(matrix.sum())
    support = scores["support"]
    present = support > 0
    weights = support / total if total else np.zeros(num_classes)

    per_class = {
        name: {
            "precision": float(scores["precision"][index]),
            "recall": float(scores["recall"][index]),
            "f1": float(scores["f1"][index]),
            "support": int(support[index]),
        }
        for index, name in enumerate(class_names)
    }
    # Macro averages cover the classes that occur in the test labels, so a class that is
    # absent from the test split does not pull the average to zero.
    macro = {key: float(scores[key][present].mean()) if present.any() else 0.0 for key in ("precision", "recall", "f1")}
    weighted = {key: float(np.sum(scores[key] * weights)) for key in ("precision", "recall", "f1")}
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "num_examples": total,
        "per_class": per_class,
        "macro_avg": macro,
        "weighted_avg": weighted,
        "macro_f1": macro["f1"],
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
    }


def format_report(report: dict[str, Any]) -> str:
    """Render a classification report as a fixed-width table."""
    names = report["class_names"]
    width = max([len("weighted avg")] + [len(name) for name in names])
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for name in names:
        row = report["per_class"][name]
        lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:6.3f}  {row['support']:7d}")
    lines.append("")
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        row = report[key]
        lines.append(f"{label:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:6.3f}  {report['num_examples']:7d}")
    lines.append(f"{'accuracy':<{width}}  {'':9}  {'':6}  {report['accuracy']:6.3f}  {report['num_examples']:7d}")
    return "\n".join(lines)
