"""Metrics on class probabilities (hand-computed) and the confusion-matrix plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.evaluate import expected_calibration_error, scored_metrics
from pipeline.plots import plot_confusion

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _confident(y_pred: list[int], k: int) -> np.ndarray:
    """(N, k) probabilities: 0.8 on the predicted class, the rest shared equally."""
    probs = np.full((len(y_pred), k), 0.2 / (k - 1))
    probs[np.arange(len(y_pred)), y_pred] = 0.8
    return probs


# truth      0 0 0 | 1 1 | 2 2 2 2
# prediction 0 0 1 | 1 2 | 2 2 0 0
# confusion  [[2, 1, 0],
#             [0, 1, 1],
#             [2, 0, 2]]   column sums 4, 2, 3; N = 9
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
Y_PRED = [0, 0, 1, 1, 2, 2, 2, 0, 0]


def test_confusion_counts_and_accuracy():
    report = scored_metrics(Y_TRUE, _confident(Y_PRED, 3), ["a", "b", "c"])
    assert report.confusion == [[2, 1, 0], [0, 1, 1], [2, 0, 2]]
    assert report.n == 9
    assert report.accuracy == pytest.approx(5 / 9)
    assert [c.support for c in report.per_class] == [3, 2, 4]


def test_specificity_precision_recall_on_three_classes():
    # class a: TP 2, FN 1, FP 4-2 = 2, TN 9-2-1-2 = 4 -> spec 4/6, P 2/4, R 2/3
    # class b: TP 1, FN 1, FP 2-1 = 1, TN 9-1-1-1 = 6 -> spec 6/7, P 1/2, R 1/2
    # class c: TP 2, FN 2, FP 3-2 = 1, TN 9-2-2-1 = 4 -> spec 4/5, P 2/3, R 2/4
    report = scored_metrics(Y_TRUE, _confident(Y_PRED, 3), ["a", "b", "c"])
    a, b, c = report.per_class
    assert [m.label for m in report.per_class] == ["a", "b", "c"]
    assert (a.specificity, b.specificity, c.specificity) == pytest.approx((4 / 6, 6 / 7, 4 / 5))
    assert (a.precision, b.precision, c.precision) == pytest.approx((1 / 2, 1 / 2, 2 / 3))
    assert (a.recall, b.recall, c.recall) == pytest.approx((2 / 3, 1 / 2, 1 / 2))
    # F1 = 2PR/(P+R): a 2*(1/2)(2/3)/(7/6) = 4/7, b 1/2, c 2*(2/3)(1/2)/(7/6) = 4/7
    assert (a.f1, b.f1, c.f1) == pytest.approx((4 / 7, 1 / 2, 4 / 7))
    assert report.macro_f1 == pytest.approx((4 / 7 + 1 / 2 + 4 / 7) / 3)
    # every top-1 confidence is 0.8 -> one bin (floor(0.8 * 15) = 12): |5/9 - 0.8| = 11/45
    assert report.ece == pytest.approx(11 / 45)


def test_ece_perfectly_calibrated_is_zero():
    # bin 7 (0.5 * 15 = 7.5): 4 samples, 2 correct -> |2/4 - 0.5| = 0
    # bin 14 (1.0 clamps to the last bin): 2 samples, 2 correct -> |1 - 1| = 0
    confidence = np.array([0.5, 0.5, 0.5, 0.5, 1.0, 1.0])
    correct = np.array([True, False, True, False, True, True])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident_hand_computed():
    # 10 bins: 0.95 -> bin 9, 0.25 -> bin 2
    # bin 9: 4 samples, 2 correct: 4/6 * |0.5 - 0.95| = 0.3
    # bin 2: 2 samples, 1 correct: 2/6 * |0.5 - 0.25| = 1/12
    # ECE = 0.3 + 1/12 = 23/60
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.25, 0.25])
    correct = np.array([1, 1, 0, 0, 1, 0])
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(23 / 60)
    # one bin: mean confidence (3.8 + 0.5)/6 = 4.3/6, accuracy 3/6 -> |0.5 - 4.3/6| = 1.3/6
    assert expected_calibration_error(confidence, correct, bins=1) == pytest.approx(1.3 / 6)


def test_ece_confidence_one_joins_the_last_bin():
    # 1.0 and 0.95 share bin 9 of 10: accuracy 1/2, mean confidence 0.975 -> 0.475
    # (a separate bin for 1.0 would give 0.5 * |0 - 1| + 0.5 * |1 - 0.95| = 0.525)
    ece = expected_calibration_error(np.array([1.0, 0.95]), np.array([0, 1]), bins=10)
    assert ece == pytest.approx(0.475)


@pytest.mark.filterwarnings("error")  # NaN by the guard, not by an sklearn warning
def test_auc_is_nan_for_a_class_absent_from_truth_and_left_out_of_the_macro():
    # class a: positives score 0.7, 0.4; negatives 0.5, 0.2 -> pairs won 3 of 4 = 0.75
    # class b: positives score 0.3, 0.45; negatives 0.2, 0.5 -> pairs won 2 of 4 = 0.5
    # class c: never true -> NaN; macro over a and b = 0.625
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.4, 0.5, 0.1],
            [0.5, 0.3, 0.2],
            [0.2, 0.45, 0.35],
        ]
    )
    report = scored_metrics(np.array([0, 0, 1, 1]), probs, ["a", "b", "c"])
    a, b, c = report.per_class
    assert (a.roc_auc, b.roc_auc) == pytest.approx((0.75, 0.5))
    assert math.isnan(c.roc_auc)
    assert report.roc_auc == pytest.approx(0.625)
    # c is never predicted: all 4 rows are true negatives -> specificity 1, support 0
    assert (c.specificity, c.support, c.recall) == (1.0, 0, 0.0)


@pytest.mark.filterwarnings("error")  # NaN by the guard, not by an sklearn warning
def test_auc_nan_when_truth_holds_one_class_only():
    # class a has no negatives and class b no positives: no AUC is defined
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    report = scored_metrics(np.array([0, 0, 0]), probs, ["a", "b"])
    assert math.isnan(report.per_class[0].roc_auc) and math.isnan(report.per_class[1].roc_auc)
    assert math.isnan(report.roc_auc)
    assert math.isnan(report.per_class[0].specificity)  # a has no negatives either
    assert report.per_class[1].specificity == pytest.approx(2 / 3)  # b: TN 2, FP 1


def test_to_dict_is_json_safe_with_nan_as_none():
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    report = scored_metrics(np.array([0, 0, 1]), probs, ["a", "b", "c"], bins=5)
    loaded = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert loaded["per_class"][2]["roc_auc"] is None
    assert loaded["per_class"][2]["label"] == "c"
    # a: positives 0.9, 0.6 vs negative 0.3 -> 1.0; b: positive 0.7 vs 0.1, 0.4 -> 1.0
    assert loaded["roc_auc"] == pytest.approx(1.0)
    assert loaded["confusion"] == [[2, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert loaded["bins"] == 5
    assert loaded["n"] == 3


def test_empty_set_is_rejected():
    with pytest.raises(ValueError, match="empty set"):
        scored_metrics(np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"])


def test_column_count_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match="probs has 3 columns but labels has 2 entries"):
        scored_metrics(np.array([0, 1]), np.full((2, 3), 1 / 3), ["a", "b"])


def test_plot_confusion_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "confusion.png"
    # the middle class never occurs in the truth: its row is all zero and must still draw
    written = plot_confusion([[2, 1, 0], [0, 0, 0], [2, 0, 2]], ["cat", "dog", "bird"], path)
    assert written == path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 0


def test_plot_confusion_rejects_a_shape_that_does_not_match_labels(tmp_path):
    with pytest.raises(ValueError, match=r"confusion has shape \(2, 2\) but labels has 3"):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "c.png")


def test_ece_rejects_logits():
    with pytest.raises(ValueError, match=r"confidence must lie in \[0, 1\].*not logits"):
        expected_calibration_error(np.array([2.3, -0.4]), np.array([1, 0]))
