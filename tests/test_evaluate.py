"""Classification metrics (hand-computed) and the frozen-feature probe."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import ClassMetrics, classification_metrics, probe_baseline


def test_hand_computed_two_class_case():
    # truth 0 0 0 1 1, prediction 0 1 0 1 0
    # class 0: TP 2, predicted 3, true 3 -> P 2/3, R 2/3, F1 2/3
    # class 1: TP 1, predicted 2, true 2 -> P 1/2, R 1/2, F1 1/2
    y_true, y_pred = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 0, 1, 0])
    report = classification_metrics(y_true, y_pred, ["neg", "pos"])
    assert report.n == 5
    assert report.accuracy == pytest.approx(3 / 5)
    assert report.macro_f1 == pytest.approx((2 / 3 + 1 / 2) / 2)
    neg, pos = report.per_class
    assert neg.label == "neg" and pos.label == "pos"
    assert (neg.precision, neg.recall, neg.f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert (pos.precision, pos.recall, pos.f1) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    assert (neg.support, pos.support) == (3, 2)


def test_unequal_precision_and_recall():
    # class 1: TP 2, predicted 3, true 2 -> P 2/3, R 1, F1 0.8
    # class 0: TP 1, predicted 1, true 2 -> P 1, R 1/2, F1 2/3
    report = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b"])
    a, b = report.per_class
    assert (a.precision, a.recall, a.f1) == pytest.approx((1.0, 0.5, 2 / 3))
    assert (b.precision, b.recall, b.f1) == pytest.approx((2 / 3, 1.0, 0.8))
    assert report.accuracy == pytest.approx(0.75)
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)


def test_class_absent_from_truth_and_prediction_scores_zero_and_counts_in_macro_f1():
    report = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b", "c"])
    c = report.per_class[2]
    assert c == ClassMetrics("c", 0.0, 0.0, 0.0, 0)
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert report.accuracy == pytest.approx(0.75)


def test_class_predicted_but_never_true_scores_zero():
    # class 1 never true: precision 0 (0 of 2), recall 0/0 -> 0, F1 0
    report = classification_metrics(np.array([0, 0, 0]), np.array([0, 1, 1]), ["a", "b"])
    a, b = report.per_class
    assert b == ClassMetrics("b", 0.0, 0.0, 0.0, 0)
    assert (a.precision, a.recall, a.f1) == pytest.approx((1.0, 1 / 3, 0.5))
    assert report.macro_f1 == pytest.approx(0.25)


def test_perfect_predictions():
    y = np.array([2, 0, 1, 1, 2])
    report = classification_metrics(y, y.copy(), ["x", "y", "z"])
    assert report.accuracy == 1.0 and report.macro_f1 == 1.0
    assert [c.support for c in report.per_class] == [1, 2, 2]
    assert all(c.f1 == 1.0 for c in report.per_class)


def test_empty_set_raises():
    with pytest.raises(ValueError, match="cannot evaluate on an empty set"):
        classification_metrics(np.array([], dtype=int), np.array([], dtype=int), ["a", "b"])


def test_report_to_dict():
    data = classification_metrics(np.array([0, 1]), np.array([0, 0]), ["a", "b"]).to_dict()
    assert data["accuracy"] == 0.5
    assert data["n"] == 2
    assert data["per_class"][1] == {
        "label": "b",
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
    }


def test_probe_baseline_on_linearly_separable_features():
    rng = np.random.default_rng(0)

    # Two clusters in 8 dimensions, separated along the first axis by a wide margin.
    def cluster(n: int, sign: float) -> np.ndarray:
        x = rng.normal(0.0, 0.3, size=(n, 8))
        x[:, 0] += sign * 3.0
        return x

    train_x = np.vstack([cluster(40, -1), cluster(40, +1)])
    train_y = np.array([0] * 40 + [1] * 40)
    test_x = np.vstack([cluster(15, -1), cluster(25, +1)])
    test_y = np.array([0] * 15 + [1] * 25)
    report = probe_baseline(train_x, train_y, test_x, test_y, ["rotten", "fresh"], c=1.0)
    assert report.n == 40
    assert report.accuracy == 1.0
    assert report.macro_f1 == 1.0
    assert [c.support for c in report.per_class] == [15, 25]


def test_probe_baseline_cannot_beat_chance_on_a_constant_feature():
    # One constant feature carries no signal: the probe predicts the majority class (1).
    train_x = np.ones((10, 1))
    train_y = np.array([0] * 3 + [1] * 7)
    test_x = np.ones((4, 1))
    test_y = np.array([0, 0, 1, 1])
    report = probe_baseline(train_x, train_y, test_x, test_y, ["a", "b"])
    assert report.accuracy == 0.5
    assert report.per_class[0].recall == 0.0
    assert report.per_class[1].recall == 1.0
