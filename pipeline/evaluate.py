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


# --- metrics on class probabilities (the image kind) ----------------------------------------


@dataclass(frozen=True)
class ScoredClassMetrics:
    """One class, one-vs-rest. recall is sensitivity; specificity is TN / (TN + FP).

    roc_auc is NaN when y_true holds no positives or no negatives of the class; specificity
    is NaN when it holds no negatives.
    """

    label: str
    precision: float
    recall: float
    specificity: float
    f1: float
    roc_auc: float
    support: int


@dataclass(frozen=True)
class ScoredReport:
    """Metrics from (N, K) probabilities; ``confusion[i][j]`` counts true i predicted j.

    roc_auc is the macro one-vs-rest AUC over the classes where it is defined (NaN if none);
    ece is the top-1 expected calibration error with ``bins`` equal-width bins.
    """

    accuracy: float
    macro_f1: float
    roc_auc: float
    ece: float
    n: int
    per_class: list[ScoredClassMetrics]
    confusion: list[list[int]]
    bins: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: NaN becomes None."""
        return _nan_to_none(asdict(self))


def scored_metrics(
    y_true: np.ndarray, probs: np.ndarray, labels: Sequence[str], bins: int = 15
) -> ScoredReport:
    """Accuracy, F1, one-vs-rest ROC-AUC, specificity, ECE and the confusion matrix.

    Args:
        y_true: (N,) label indices into ``labels``.
        probs: (N, K) class probabilities, K == len(labels); the prediction is the argmax.
        bins: equal-width confidence bins over [0, 1] for the ECE.

    Raises:
        ValueError: on an empty set, or when the shapes of ``probs`` and ``labels`` disagree.
    """
    from sklearn.metrics import (
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    if len(y_true) == 0:
        raise ValueError("cannot evaluate on an empty set")
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, {len(labels)}), got shape {probs.shape}")
    if probs.shape[1] != len(labels):
        raise ValueError(
            f"probs has {probs.shape[1]} columns but labels has {len(labels)} entries; "
            "pass one probability column per label, in the order of labels"
        )
    if len(probs) != len(y_true):
        raise ValueError(f"probs has {len(probs)} rows but y_true has {len(y_true)} entries")
    idx = list(range(len(labels)))
    y_pred = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=idx)  # (K, K), rows true, columns predicted
    n = len(y_true)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    tn = n - cm.sum(axis=1) - fp  # everything not true k and not predicted k
    negatives = tn + fp
    specificity = np.where(negatives > 0, tn / np.maximum(negatives, 1), math.nan)
    aucs = []
    for k in idx:
        positive = y_true == k
        defined = 0 < positive.sum() < n
        aucs.append(float(roc_auc_score(positive, probs[:, k])) if defined else math.nan)
    finite = [a for a in aucs if not math.isnan(a)]
    return ScoredReport(
        accuracy=float((y_pred == y_true).mean()),
        macro_f1=float(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)),
        roc_auc=float(np.mean(finite)) if finite else math.nan,
        ece=expected_calibration_error(probs.max(axis=1), y_pred == y_true, bins),
        n=n,
        per_class=[
            ScoredClassMetrics(
                label,
                float(p[k]),
                float(r[k]),
                float(specificity[k]),
                float(f[k]),
                aucs[k],
                int(s[k]),
            )
            for k, label in enumerate(labels)
        ],
        confusion=cm.tolist(),
        bins=bins,
    )


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 15
) -> float:
    """Guo et al. (2017): sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|.

    Confidence c in [0, 1] falls in bin min(floor(c * bins), bins - 1), so c = 1 joins the
    last bin.

    Raises:
        ValueError: on no samples, mismatched lengths, bins < 1 or confidence outside [0, 1].
    """
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if len(confidence) == 0:
        raise ValueError("cannot compute a calibration error on no samples")
    if confidence.shape != correct.shape:
        raise ValueError(
            f"confidence has shape {confidence.shape} but correct has shape {correct.shape}"
        )
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if confidence.min() < 0.0 or confidence.max() > 1.0:
        raise ValueError(
            f"confidence must lie in [0, 1], found {confidence.min()}..{confidence.max()}; "
            "pass probabilities (softmax), not logits"
        )
    which = np.minimum(np.floor(confidence * bins).astype(int), bins - 1)
    hits = np.bincount(which, weights=correct, minlength=bins)
    mass = np.bincount(which, weights=confidence, minlength=bins)
    # sum_b |b|/N * |hits_b/|b| - mass_b/|b|| = sum_b |hits_b - mass_b| / N (empty bins add 0)
    return float(np.abs(hits - mass).sum() / len(confidence))


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
