import numpy as np
import pytest

from raywaste.metrics import (
    average_precision,
    best_f1_threshold,
    classification_report,
    confusion_matrix,
    macro_f1,
    precision_recall_curve,
)


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_report_matches_hand_computation():
    report = classification_report(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert report["per_class"]["b"]["recall"] == pytest.approx(1.0)
    assert report["per_class"]["c"]["precision"] == pytest.approx(1.0)
    assert report["per_class"]["c"]["recall"] == pytest.approx(2 / 3)
    assert report["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_class_absent_from_test_split_not_averaged():
    report = classification_report(np.array([0, 0, 1]), np.array([0, 0, 1]), ["a", "b", "unused"])
    assert report["macro_f1"] == pytest.approx(1.0)
    assert report["per_class"]["unused"]["support"] == 0


def test_no_predictions_gives_zero_not_nan():
    assert macro_f1(np.array([0, 1]), np.array([0, 0]), 2) == pytest.approx((2 / 3 + 0) / 2)


def test_average_precision_known_values():
    # Ranking: 0.9 (pos), 0.8 (neg), 0.7 (pos): AP = 1 * 0.5 + 2/3 * 0.5.
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 + 1 / 3)
    assert average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert average_precision([0, 0], [0.3, 0.2]) == 0.0


def test_average_precision_ties_share_a_threshold():
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_precision_recall_curve_known_values():
    precision, recall, thresholds = precision_recall_curve([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.7])
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7])
    np.testing.assert_allclose(precision, [1.0, 0.5, 0.5])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])


def test_precision_recall_curve_without_positives():
    precision, recall, thresholds = precision_recall_curve([0, 0], [0.4, 0.6])
    np.testing.assert_allclose(thresholds, [0.6, 0.4])
    np.testing.assert_allclose(recall, [0.0, 0.0])
    np.testing.assert_allclose(precision, [0.0, 0.0])


def test_best_f1_threshold_maximizes_f1():
    # At 0.6: 2 of 2 positives found among 3 predicted, F1 0.8; the best of all thresholds.
    labels = [1, 0, 1, 0, 0]
    scores = [0.9, 0.7, 0.6, 0.3, 0.2]
    threshold, f1 = best_f1_threshold(labels, scores)
    assert threshold == pytest.approx(0.6)
    assert f1 == pytest.approx(0.8)


def test_best_f1_threshold_ties_prefer_default():
    # 0.9 (1 of 2 found, none wrong) and 0.3 (2 of 2 found among 4) both give F1 2/3.
    threshold, f1 = best_f1_threshold([1, 0, 0, 1], [0.9, 0.8, 0.4, 0.3])
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.3)
    threshold, f1 = best_f1_threshold([1, 0, 0, 1], [0.9, 0.7, 0.6, 0.05])
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.9)


def test_best_f1_threshold_needs_positives():
    assert best_f1_threshold([0, 0, 0], [0.2, 0.5, 0.9]) is None
