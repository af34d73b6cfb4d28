"""Classification metrics and the frozen-feature baseline (pure functions on arrays)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvaluationReport:
    accuracy: float
    macro_f1: float
    per_class: list[ClassMetrics]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]
) -> EvaluationReport:
    """Accuracy, macro-F1 and per-class precision/recall/F1 for label indices.

    A class absent from both truth and prediction scores 0 (sklearn's zero_division=0).
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    if len(y_true) == 0:
        raise ValueError("cannot evaluate on an empty set")
    idx = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    return EvaluationReport(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)),
        per_class=[
            ClassMetrics(label, float(p[i]), float(r[i]), float(f[i]), int(s[i]))
            for i, label in enumerate(labels)
        ],
        n=len(y_true),
    )


def probe_baseline(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    labels: Sequence[str],
    c: float = 1.0,
) -> EvaluationReport:
    """A logistic-regression probe on frozen features: what fine-tuning must beat."""
    probe = fit_probe(train_features, train_labels, c)
    return classification_metrics(test_labels, probe.predict(test_features), labels)


def fit_probe(features: np.ndarray, labels: np.ndarray, c: float = 1.0) -> Any:
    """A logistic regression on frozen features (sklearn; ``predict_proba`` gives (N, K))."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000).fit(features, labels)


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap samples, ignoring NaN (NaN if none is finite)."""
    finite = samples[np.isfinite(samples)]
    if len(finite) == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)
