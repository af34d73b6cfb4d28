"""Model-level bias: per-group metrics, counterfactual swaps, CrowS-Pairs, the bias gate.

Pure functions on arrays, run after training on the test split. The positive label is a
label id (the first configured label, id 0, by default): "selection rate" is the share of
rows predicted positive, and FPR/FNR are with respect to that label. With more than two
labels every label is in turn the positive one (one-vs-rest, ``ModelBiasReport.per_label``)
and the report's headline figures and the gate read the worst label: the one with the
largest equalized odds difference.

Groups may overlap (a text can mention a woman and a religion) or leave a row in no
group, so each group is evaluated on its own rows: the rows are stacked once per group
they belong to and one Fairlearn ``MetricFrame`` takes the stacked group id as its
sensitive feature. An extra pseudo-group holds every row (``overall``). Comparing a group
with "everyone else" would mix the other groups into the reference and hide gaps between
two groups.

Undefined is NaN, never 0: an empty group has no metrics; a group without true negatives
has no FPR, without true positives no FNR; a difference needs at least two groups with
a defined rate, a ratio a non-zero maximum. NaN is skipped when taking maxima and minima
and becomes null in JSON. Groups with fewer than ``min_group_rows`` rows are reported
(``too_small``) but left out of the differences and the gate.

Differences follow Fairlearn's definitions: demographic parity is max - min (and
min / max) of the selection rate; the equalized odds difference is the larger of the FPR
and FNR ranges, its ratio the smaller of the FPR and TPR min/max ratios. Their 95%
intervals are percentile bootstraps over rows (a resampled row keeps its groups).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.config import Severity
from pipeline.evaluate import percentile_interval
from pipeline.formatting import fmt_num, fmt_pct
from pipeline.gates import BIAS, GateOutcome, GateStatus

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.config import BiasConfig

METRICS = ("accuracy", "macro_f1", "fpr", "fnr", "selection_rate")
METRIC_TITLES = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "fpr": "false positive rate",
    "fnr": "false negative rate",
    "selection_rate": "selection rate (predicted positive)",
}
DISPARITIES = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
    "equalized_odds_ratio",
)
MODEL_CHECKS = ("equalized_odds", "counterfactual_flips", "champion_regression", "crows_pairs")
OVERALL = "(all rows)"
# Bound the (chunk, N) resample-count matrices at 2M entries (16 MB as int64).
_CHUNK_ENTRIES = 2_000_000


# --- per-group metrics -------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap 95% percentile interval (NaN where undefined)."""

    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan


@dataclass(frozen=True)
class GroupRow:
    group: str
    rows: int
    accuracy: float
    macro_f1: float  # over the labels present in the group's truth or predictions
    fpr: float  # predicted positive among true negatives
    fnr: float  # predicted negative among true positives
    selection_rate: float  # predicted positive among all rows
    too_small: bool  # rows < min_group_rows: reported, not compared, not gated


@dataclass(frozen=True)
class GroupMetrics:
    positive: int
    min_group_rows: int
    total_rows: int
    resamples: int
    overall: GroupRow  # every row, whatever its groups
    groups: list[GroupRow]
    compared: list[str]  # the groups with at least min_group_rows rows
    demographic_parity_difference: Estimate
    demographic_parity_ratio: Estimate
    equalized_odds_difference: Estimate
    equalized_odds_ratio: Estimate

    def disparities(self) -> dict[str, Estimate]:
        return {name: getattr(self, name) for name in DISPARITIES}


def group_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    membership: pd.DataFrame,
    positive: int = 0,
    min_group_rows: int = 30,
    resamples: int = 1000,
    seed: int = 0,
) -> GroupMetrics:
    """Accuracy, macro-F1, FPR, FNR and selection rate per group, and the disparities.

    Args:
        y_true, y_pred: (N,) label ids.
        membership: (N, G) booleans, one column per group; a row may be in several or none.
        positive: the label id that counts as positive.
        min_group_rows: smaller groups are reported but not compared.
        resamples: bootstrap resamples for the disparities' intervals (0: no intervals).

    Raises:
        ValueError: mismatched lengths, no rows, or non-boolean membership columns.
    """
    from fairlearn.metrics import MetricFrame

    y_true, y_pred, member = _check_inputs(y_true, y_pred, membership)
    names = [str(c) for c in membership.columns]
    n, g = member.shape
    # Stack each group's rows under its column index; index g holds every row.
    rows_of = [np.flatnonzero(member[:, j]) for j in range(g)] + [np.arange(n)]
    stacked = np.concatenate(rows_of)
    group_id = np.concatenate([np.full(len(r), j) for j, r in enumerate(rows_of)])
    frame = MetricFrame(
        metrics=_metric_functions(positive),
        y_true=y_true[stacked],
        y_pred=y_pred[stacked],
        sensitive_features={"group": group_id},
    )
    table = frame.by_group.reindex(range(g + 1))  # empty groups come back as NaN rows
    figures = [
        GroupRow(
            group=name,
            rows=len(rows_of[j]),
            **{m: float(table.loc[j, m]) for m in METRICS},
            too_small=len(rows_of[j]) < min_group_rows,
        )
        for j, name in enumerate([*names, OVERALL])
    ]
    groups, overall = figures[:g], replace(figures[g], too_small=False)
    compared = [j for j, row in enumerate(groups) if not row.too_small]

    def rates(metric: str) -> np.ndarray:  # (1, G_compared)
        return np.array([[getattr(groups[j], metric) for j in compared]], dtype=np.float64)

    point = _disparities(rates("selection_rate"), rates("fpr"), rates("fnr"))[0]
    if len(compared) >= 2 and resamples > 0:
        samples = bootstrap_disparities(
            y_true, y_pred, member[:, compared], positive, resamples, seed
        )
        intervals = [percentile_interval(samples[:, k]) for k in range(len(DISPARITIES))]
    else:
        intervals = [(math.nan, math.nan)] * len(DISPARITIES)
    estimates = {
        name: Estimate(float(point[k]), *intervals[k]) for k, name in enumerate(DISPARITIES)
    }
    return GroupMetrics(
        positive=positive,
        min_group_rows=min_group_rows,
        total_rows=n,
        resamples=resamples if len(compared) >= 2 else 0,
        overall=overall,
        groups=groups,
        compared=[names[j] for j in compared],
        **estimates,
    )


def _check_inputs(
    y_true: np.ndarray, y_pred: np.ndarray, membership: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(
            f"y_true and y_pred must be 1-D and of equal length, got {y_true.shape} and "
            f"{y_pred.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("no rows to evaluate: the test split is empty")
    if len(membership) != len(y_true):
        raise ValueError(
            f"membership has {len(membership)} rows but there are {len(y_true)} predictions; "
            "build it from the same test texts (pipeline.bias.assign_groups)"
        )
    from pandas.api.types import is_bool_dtype

    not_bool = [str(c) for c, t in membership.dtypes.items() if not is_bool_dtype(t)]
    if not_bool:
        raise ValueError(
            f"membership columns must be boolean; {not_bool} are not (NaN or 0/1 values?)"
        )
    return y_true, y_pred, membership.to_numpy(dtype=bool).reshape(len(y_true), -1)


def _metric_functions(positive: int) -> dict[str, Any]:
    """MetricFrame callables; FPR/FNR are one-vs-rest around ``positive`` and NaN if undefined."""
    from fairlearn.metrics import false_negative_rate, false_positive_rate, selection_rate
    from sklearn.metrics import accuracy_score, f1_score

    def fpr(y_true: Any, y_pred: Any) -> float:
        truth, pred = np.asarray(y_true) == positive, np.asarray(y_pred) == positive
        if truth.all():  # no true negatives
            return math.nan
        return float(false_positive_rate(truth.astype(int), pred.astype(int), pos_label=1))

    def fnr(y_true: Any, y_pred: Any) -> float:
        truth, pred = np.asarray(y_true) == positive, np.asarray(y_pred) == positive
        if not truth.any():  # no true positives
            return math.nan
        return float(false_negative_rate(truth.astype(int), pred.astype(int), pos_label=1))

    return {
        "accuracy": accuracy_score,
        # Labels present in the group: a class a group never shows is not scored as F1 = 0.
        "macro_f1": lambda t, p: f1_score(t, p, average="macro", zero_division=0),
        "fpr": fpr,
        "fnr": fnr,
        "selection_rate": lambda t, p: selection_rate(t, p, pos_label=positive),
    }


def _span(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise min and max of the finite entries of (B, G); NaN where fewer than two."""
    finite = np.isfinite(x)
    low = np.where(finite, x, np.inf).min(axis=1, initial=np.inf)
    high = np.where(finite, x, -np.inf).max(axis=1, initial=-np.inf)
    enough = finite.sum(axis=1) >= 2
    return np.where(enough, low, np.nan), np.where(enough, high, np.nan)


def _ratio(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(high > 0, low / high, np.nan)


def _disparities(sel: np.ndarray, fpr: np.ndarray, fnr: np.ndarray) -> np.ndarray:
    """(B, G) per-group rates -> (B, 4) in :data:`DISPARITIES` order."""
    sel_low, sel_high = _span(sel)
    fpr_low, fpr_high = _span(fpr)
    fnr_low, fnr_high = _span(fnr)
    tpr_low, tpr_high = 1.0 - fnr_high, 1.0 - fnr_low
    return np.stack(
        [
            sel_high - sel_low,
            _ratio(sel_low, sel_high),
            np.fmax(fpr_high - fpr_low, fnr_high - fnr_low),  # NaN only if both are
            np.fmin(_ratio(fpr_low, fpr_high), _ratio(tpr_low, tpr_high)),
        ],
        axis=1,
    )


def bootstrap_disparities(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    membership: np.ndarray,
    positive: int,
    resamples: int,
    seed: int = 0,
) -> np.ndarray:
    """The disparities on ``resamples`` resamples of the rows, (B, 4) in DISPARITIES order.

    Vectorised: a resample is a (N,) count vector, so every group's counts (rows, true
    negatives, true positives, predicted positives, false positives, false negatives) of
    B resamples are one (B, N) @ (N, G * 6) product.

    Args:
        membership: (N, G) booleans of the groups to compare.
    """
    n, g = membership.shape
    truth = np.asarray(y_true) == positive
    pred = np.asarray(y_pred) == positive
    counted = np.stack(
        [np.ones(n, dtype=bool), ~truth, truth, pred, ~truth & pred, truth & ~pred], axis=1
    )  # (N, 6)
    design = (membership[:, :, None] & counted[:, None, :]).reshape(n, g * 6).astype(np.float64)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(DISPARITIES)))
    chunk = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)  # (b, N)
        sums = (counts @ design).reshape(b, g, 6)
        rows, negatives, positives, selected, false_pos, false_neg = np.moveaxis(sums, 2, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + b] = _disparities(
                selected / rows, false_pos / negatives, false_neg / positives
            )
    return out


# --- counterfactual swaps and CrowS-Pairs ------------------------------------------------


@dataclass(frozen=True)
class CounterfactualExample:
    original: str
    swapped: str
    label_original: int
    label_swapped: int
    p_original: float  # probability of the positive label
    p_swapped: float
    delta: float  # p_swapped - p_original


@dataclass(frozen=True)
class CounterfactualReport:
    pairs: int
    flips: int
    flip_rate: Estimate  # share of pairs whose predicted label changes
    mean_abs_delta: float  # mean |p_swapped - p_original| of the positive label
    examples: list[CounterfactualExample] = field(default_factory=list)  # flipped, |delta| desc


def counterfactual_flips(
    probs_original: np.ndarray,
    probs_swapped: np.ndarray,
    texts_original: Sequence[str],
    texts_swapped: Sequence[str],
    top: int = 20,
    positive: int = 0,
    resamples: int = 1000,
    seed: int = 0,
) -> CounterfactualReport:
    """How often swapping identity terms changes the prediction.

    Args:
        probs_original, probs_swapped: (M, K) class probabilities of each text and its swap.
        top: keep at most this many flipped pairs, largest |delta| first.

    Raises:
        ValueError: shapes or text counts that do not match.
    """
    probs_original, probs_swapped = _check_pairs(
        probs_original, probs_swapped, "probs_original", "probs_swapped"
    )
    m = len(probs_original)
    if len(texts_original) != m or len(texts_swapped) != m:
        raise ValueError(
            f"{m} probability rows but {len(texts_original)} original and "
            f"{len(texts_swapped)} swapped texts"
        )
    if m == 0:
        return CounterfactualReport(0, 0, Estimate(math.nan), math.nan)
    label_a, label_b = probs_original.argmax(axis=1), probs_swapped.argmax(axis=1)
    delta = probs_swapped[:, positive] - probs_original[:, positive]  # (M,)
    flipped = label_a != label_b
    order = [int(i) for i in np.argsort(-np.abs(delta), kind="stable") if flipped[i]][:top]
    examples = [
        CounterfactualExample(
            original=str(texts_original[i]),
            swapped=str(texts_swapped[i]),
            label_original=int(label_a[i]),
            label_swapped=int(label_b[i]),
            p_original=float(probs_original[i, positive]),
            p_swapped=float(probs_swapped[i, positive]),
            delta=float(delta[i]),
        )
        for i in order
    ]
    rate = float(flipped.mean())
    interval = percentile_interval(_bootstrap_mean(flipped, resamples, seed)) if resamples else None
    return CounterfactualReport(
        pairs=m,
        flips=int(flipped.sum()),
        flip_rate=Estimate(rate, *interval) if interval else Estimate(rate),
        mean_abs_delta=float(np.abs(delta).mean()),
        examples=examples,
    )


def _check_pairs(
    a: np.ndarray, b: np.ndarray, name_a: str, name_b: str
) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must both be (M, K), got {a.shape} and {b.shape}")
    return a, b


def _bootstrap_mean(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of ``resamples`` resamples of (M,) values, (B,)."""
    m = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    chunk = max(1, _CHUNK_ENTRIES // m)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        out[start : start + b] = values[rng.integers(0, m, size=(b, m))].mean(axis=1)
    return out


@dataclass(frozen=True)
class CrowsPairsType:
    bias_type: str
    pairs: int
    differ_rate: float  # share of pairs whose two sentences get different labels
    mean_abs_delta: float  # mean |p_a - p_b| of the positive label


def crows_pairs_divergence(
    bias_types: Sequence[str],
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    positive: int = 0,
) -> list[CrowsPairsType]:
    """Per CrowS-Pairs bias type (sorted by name): how often the pair's outputs differ.

    Args:
        bias_types: (P,) the bias type of each pair.
        probs_a, probs_b: (P, K) class probabilities of the two sentences of each pair.
    """
    probs_a, probs_b = _check_pairs(probs_a, probs_b, "probs_a", "probs_b")
    types = np.asarray([str(t) for t in bias_types], dtype=object)
    if len(types) != len(probs_a):
        raise ValueError(f"{len(types)} bias types but {len(probs_a)} probability rows")
    differ = probs_a.argmax(axis=1) != probs_b.argmax(axis=1)
    delta = np.abs(probs_a[:, positive] - probs_b[:, positive])
    out = []
    for name in sorted(set(types)):
        rows = types == name
        out.append(
            CrowsPairsType(
                name, int(rows.sum()), float(differ[rows].mean()), float(delta[rows].mean())
            )
        )
    return out


# --- the report and the gate ---------------------------------------------------------------

CheckStatus = Literal["passed", "failed", "not run"]


@dataclass(frozen=True)
class BiasCheck:
    check: str  # one of MODEL_CHECKS
    status: CheckStatus
    severity: Severity
    value: float  # the number compared with the limit (NaN when not run)
    limit: float
    detail: str


@dataclass(frozen=True)
class BiasVerdict:
    """One entry per model check; refused if a check with severity error failed."""

    checks: list[BiasCheck]

    @property
    def refused(self) -> bool:
        return any(c.status == "failed" and c.severity == "error" for c in self.checks)

    @property
    def passed(self) -> bool:
        return not self.refused

    @property
    def failures(self) -> list[str]:
        return [c.detail for c in self.checks if c.status == "failed" and c.severity == "error"]

    @property
    def warnings(self) -> list[str]:
        return [c.detail for c in self.checks if c.status == "failed" and c.severity == "warn"]

    @property
    def status(self) -> str:
        """For the model-version tag: refused, warned or passed."""
        return "refused" if self.refused else "warned" if self.warnings else "passed"

    def outcome(self) -> GateOutcome:
        return GateOutcome(BIAS, GateStatus(self.status), f"{self.status}: {self.summary()}")

    def summary(self) -> str:
        parts = []
        if self.failures:
            parts.append("refused: " + "; ".join(self.failures))
        if self.warnings:
            parts.append("warning: " + "; ".join(self.warnings))
        if not parts:
            parts.append("passed")
        not_run = [f"{c.check} ({c.detail})" for c in self.checks if c.status == "not run"]
        if not_run:
            parts.append("not run: " + ", ".join(not_run))
        return " | ".join(parts)


@dataclass(frozen=True)
class LabelBias:
    """One label's figures one-vs-rest: that label is positive, every other negative."""

    label: str
    groups: GroupMetrics
    gate_groups: GroupMetrics | None = None


@dataclass(frozen=True)
class ModelBiasReport:
    """One model's bias figures on the test split; the candidate's also holds the comparisons.

    ``base_probe`` (a linear probe on the frozen encoder) and ``champion`` are the same
    figures for those models; only the champion is gated against.
    """

    model: str  # "candidate", "base probe", "champion v3"
    labels: list[str]  # label names by id, for display
    groups: GroupMetrics
    counterfactual: CounterfactualReport | None = None
    crows_pairs: list[CrowsPairsType] = field(default_factory=list)
    base_probe: ModelBiasReport | None = None
    champion: ModelBiasReport | None = None
    gate: BiasVerdict | None = None
    # The same figures over only the groups large enough to gate on (min_gate_rows), or
    # None when fewer than two are: what the equalized-odds and champion checks read.
    gate_groups: GroupMetrics | None = None
    # More than two labels: every label one-vs-rest, in label order; ``groups`` and
    # ``gate_groups`` are then the worst label's (see :func:`worst_label`). Empty otherwise.
    per_label: list[LabelBias] = field(default_factory=list)

    @property
    def positive_label(self) -> str:
        """The label the headline FPR/FNR/selection figures describe."""
        positive = self.groups.positive
        return self.labels[positive] if 0 <= positive < len(self.labels) else str(positive)

    def label_note(self) -> str:
        """Which label the headline figures describe, in words."""
        if self.per_label:
            return (
                f"label '{self.positive_label}', the worst of {len(self.per_label)} labels "
                "one-vs-rest (largest equalized odds difference)"
            )
        return f"positive label '{self.positive_label}'"

    @property
    def flip_rate(self) -> float:
        return self.counterfactual.flip_rate.value if self.counterfactual else math.nan

    def crows_differ_rate(self) -> float:
        """Share of all CrowS-Pairs pairs whose labels differ (every type pooled)."""
        pairs = sum(t.pairs for t in self.crows_pairs)
        if not pairs:
            return math.nan
        return sum(t.differ_rate * t.pairs for t in self.crows_pairs) / pairs

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: NaN and infinities become null."""
        body = asdict(self)
        if self.gate is not None:
            body["gate"] |= {
                "refused": self.gate.refused,
                "status": self.gate.status,
                "summary": self.gate.summary(),
            }
        return _json_safe(body)

    def summary(self) -> str:
        """One line for the run's log."""
        eo = self.groups.equalized_odds_difference
        parts = [
            f"{self.model}: equalized odds difference {fmt_num(eo.value)} "
            f"(95% CI {fmt_num(eo.ci_low)} to {fmt_num(eo.ci_high)}) over "
            f"{len(self.groups.compared)} groups"
            + (f" for {self.label_note()}" if self.per_label else "")
        ]
        if self.counterfactual and self.counterfactual.pairs:
            cf = self.counterfactual
            parts.append(f"flips {cf.flips}/{cf.pairs} ({cf.flip_rate.value:.1%})")
        if self.crows_pairs:
            parts.append(f"CrowS-Pairs labels differ {fmt_pct(self.crows_differ_rate())}")
        head = f"bias gate {self.gate.status}: " if self.gate else ""
        return head + ", ".join(parts)

    def metrics(self) -> dict[str, float]:
        """Flat finite numbers for the MLflow run."""
        g = self.groups
        out = {"bias_accuracy": g.overall.accuracy, "bias_macro_f1": g.overall.macro_f1}
        for name, est in g.disparities().items():
            out[f"bias_{name}"] = est.value
            out[f"bias_{name}_ci_low"] = est.ci_low
            out[f"bias_{name}_ci_high"] = est.ci_high
        for row in g.groups:
            for metric in METRICS:
                out[f"bias_group_{_metric_key(row.group)}_{metric}"] = getattr(row, metric)
        for lb in self.per_label:
            for name, est in lb.groups.disparities().items():
                out[f"bias_label_{_metric_key(lb.label)}_{name}"] = est.value
            eo = lb.groups.equalized_odds_difference
            out[f"bias_label_{_metric_key(lb.label)}_equalized_odds_difference_ci_high"] = (
                eo.ci_high
            )
        if self.counterfactual:
            out["bias_flip_rate"] = self.counterfactual.flip_rate.value
            out["bias_flip_rate_ci_high"] = self.counterfactual.flip_rate.ci_high
            out["bias_flip_mean_abs_delta"] = self.counterfactual.mean_abs_delta
        for t in self.crows_pairs:
            out[f"bias_crows_{_metric_key(t.bias_type)}_differ_rate"] = t.differ_rate
        for other in (self.base_probe, self.champion):
            if other is not None:
                prefix = "bias_base_probe" if other is self.base_probe else "bias_champion"
                out[f"{prefix}_equalized_odds_difference"] = (
                    other.groups.equalized_odds_difference.value
                )
                out[f"{prefix}_flip_rate"] = other.flip_rate
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    def table_rows(self) -> list[tuple[str, ...]]:
        """Headline measures under :data:`TABLE_HEADER`: this model, base probe, champion."""

        def figures(r: ModelBiasReport) -> dict[str, float]:
            g = r.groups
            return {
                "accuracy (all rows)": g.overall.accuracy,
                "macro-F1 (all rows)": g.overall.macro_f1,
                **{n: e.value for n, e in self._disparity_rows(r).items()},
                "counterfactual flip rate": r.flip_rate,
                "counterfactual mean |dp|": (
                    r.counterfactual.mean_abs_delta if r.counterfactual else math.nan
                ),
                "CrowS-Pairs labels differ": r.crows_differ_rate(),
            }

        mine = figures(self)
        intervals: dict[str, Estimate] = self._disparity_rows(self)
        if self.counterfactual:
            intervals["counterfactual flip rate"] = self.counterfactual.flip_rate
        base = figures(self.base_probe) if self.base_probe else {}
        champ = figures(self.champion) if self.champion else {}
        rows = []
        for name, value in mine.items():
            ci = intervals.get(name)
            vs = value - champ[name] if champ else math.nan
            rows.append(
                (
                    name,
                    fmt_num(value),
                    f"[{fmt_num(ci.ci_low)}, {fmt_num(ci.ci_high)}]" if ci else "",
                    fmt_num(base.get(name, math.nan)) if base else "-",
                    fmt_num(champ.get(name, math.nan)) if champ else "-",
                    f"{vs:+.3f}" if math.isfinite(vs) else "-",
                )
            )
        return rows

    def _disparity_rows(self, r: ModelBiasReport) -> dict[str, Estimate]:
        """Table row name -> disparity; one row per label (``name [label]``) when
        ``self`` is one-vs-rest, looked up by label name in ``r`` (base probe, champion)."""
        if not self.per_label:
            return {n.replace("_", " "): e for n, e in r.groups.disparities().items()}
        theirs = {lb.label: lb.groups for lb in r.per_label}
        out = {}
        for name in DISPARITIES:
            for lb in self.per_label:
                g = theirs.get(lb.label)
                est = getattr(g, name) if g is not None else Estimate(math.nan)
                out[f"{name.replace('_', ' ')} [{lb.label}]"] = est
        return out

    def group_rows(self) -> list[tuple[str, ...]]:
        """Per group (and all rows) under :data:`GROUP_TABLE_HEADER`; one-vs-rest, one
        block per label with the group named ``group [label]``."""
        blocks = [(lb.label, lb.groups) for lb in self.per_label] or [("", self.groups)]
        return [
            (
                f"{row.group} [{label}]" if label else row.group,
                str(row.rows),
                *(fmt_num(getattr(row, m)) for m in METRICS),
                "too small" if row.too_small else "",
            )
            for label, g in blocks
            for row in [*g.groups, g.overall]
        ]


TABLE_HEADER = ("measure", "model", "95% CI", "base probe", "champion", "vs champion")
GROUP_TABLE_HEADER = ("group", "rows", "accuracy", "macro-F1", "FPR", "FNR", "selection", "")


def check_model_bias(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    membership: pd.DataFrame,
    config: BiasConfig,
    labels: Sequence[str],
    counterfactual: CounterfactualReport | None = None,
    crows_pairs: list[CrowsPairsType] | None = None,
    model: str = "candidate",
    positive: int = 0,
) -> ModelBiasReport:
    """One model's figures: :func:`group_metrics` with the config's limits, plus the rest.

    With more than two labels every label is positive in turn (``positive`` is then
    ignored) and the report's ``groups``/``gate_groups`` are the worst label's.
    """
    if not 0 <= positive < len(labels):
        raise ValueError(f"positive label id {positive} outside the {len(labels)} labels")
    ids = list(range(len(labels))) if len(labels) > 2 else [positive]
    per_label = [_label_bias(y_true, y_pred, membership, config, i, str(labels[i])) for i in ids]
    worst = worst_label(per_label)
    return ModelBiasReport(
        model,
        list(labels),
        worst.groups,
        counterfactual,
        list(crows_pairs or []),
        gate_groups=worst.gate_groups,
        per_label=per_label if len(labels) > 2 else [],
    )


def _label_bias(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    membership: pd.DataFrame,
    config: BiasConfig,
    positive: int,
    label: str,
) -> LabelBias:
    """Every group, and the groups large enough to gate on, with ``positive`` positive."""
    groups = group_metrics(
        y_true, y_pred, membership, positive, config.min_group_rows, config.bootstrap, config.seed
    )
    least = max(config.min_group_rows, config.min_gate_rows)
    large = [c for c in membership.columns if int(membership[c].sum()) >= least]
    gate_groups = (
        group_metrics(
            y_true, y_pred, membership[large], positive, least, config.bootstrap, config.seed
        )
        if len(large) >= 2
        else None
    )
    return LabelBias(label, groups, gate_groups)


def worst_label(per_label: Sequence[LabelBias]) -> LabelBias:
    """The label with the largest equalized odds difference over the gated groups (over
    all compared groups where none can be gated); the first on ties or if none is defined."""

    def key(lb: LabelBias) -> tuple[float, float]:
        gated = lb.gate_groups.equalized_odds_difference.value if lb.gate_groups else math.nan
        shown = lb.groups.equalized_odds_difference.value
        return (
            gated if math.isfinite(gated) else -math.inf,
            shown if math.isfinite(shown) else -math.inf,
        )

    return max(per_label, key=key)


def evaluate_model_bias(
    candidate: ModelBiasReport,
    config: BiasConfig,
    base_probe: ModelBiasReport | None = None,
    champion: ModelBiasReport | None = None,
) -> ModelBiasReport:
    """The candidate's report with the base probe (reported), champion and gate attached."""
    return replace(
        candidate,
        base_probe=base_probe,
        champion=champion,
        gate=bias_gate(candidate, config, champion),
    )


def bias_gate(
    report: ModelBiasReport, config: BiasConfig, champion: ModelBiasReport | None = None
) -> BiasVerdict:
    """Every model check with its configured severity; see :class:`BiasConfig` for limits.

    - equalized_odds: the upper 95% bound of the equalized odds difference (the point
      estimate if there is no interval) must not exceed ``max_equalized_odds``.
    - counterfactual_flips: the flip rate must not exceed ``max_flip_rate``.
    - champion_regression: neither the equalized odds difference nor the flip rate may
      exceed the champion's by more than ``max_champion_regression`` (point estimates,
      each compared only where both models have it).
    - crows_pairs: no bias type with at least ``min_group_rows`` pairs may have labels
      differ on more than ``max_flip_rate`` of its pairs (the same tolerance as a swap).
    """
    outcomes = {  # pure and cheap, so a check that is off is still computed, then dropped
        "equalized_odds": _check_equalized_odds(
            report.gate_groups,
            config.max_equalized_odds,
            max(config.min_group_rows, config.min_gate_rows),
            report.label_note() if report.per_label else "",
        ),
        "counterfactual_flips": _check_flips(report.counterfactual, config.max_flip_rate),
        "champion_regression": _check_champion(report, champion, config.max_champion_regression),
        "crows_pairs": _check_crows(
            report.crows_pairs, config.max_flip_rate, config.min_group_rows
        ),
    }
    checks = []
    for name in MODEL_CHECKS:
        severity = config.severity_of(name)
        status, value, limit, detail = outcomes[name]
        if severity == "off":
            status, value, detail = "not run", math.nan, "severity off"
        checks.append(BiasCheck(name, status, severity, value, limit, detail))
    return BiasVerdict(checks)


_Outcome = tuple[CheckStatus, float, float, str]


def _check_equalized_odds(
    g: GroupMetrics | None, limit: float, least: int, label: str = ""
) -> _Outcome:
    if g is None:
        return (
            "not run",
            math.nan,
            limit,
            f"fewer than two groups with {least}+ rows: smaller groups are reported, not "
            f"gated (their 95% interval is too wide to judge a gap of {limit:.2f})",
        )
    eo = g.equalized_odds_difference
    if not math.isfinite(eo.value):
        return (
            "not run",
            math.nan,
            limit,
            f"fewer than two groups with {g.min_group_rows}+ rows and a defined FPR or FNR",
        )
    bound = eo.ci_high if math.isfinite(eo.ci_high) else eo.value
    failed = bound > limit
    detail = (
        f"equalized odds difference {eo.value:.3f} (95% CI {fmt_num(eo.ci_low)} to "
        f"{fmt_num(eo.ci_high)}) over {', '.join(g.compared)}"
        + (f" for {label}" if label else "")
        + f": upper bound {'above' if failed else 'within'} {limit:.2f}"
    )
    return ("failed" if failed else "passed"), bound, limit, detail


def _check_flips(cf: CounterfactualReport | None, limit: float) -> _Outcome:
    if cf is None or cf.pairs == 0:
        return "not run", math.nan, limit, "no test text holds a swappable identity term"
    rate = cf.flip_rate.value
    failed = rate > limit
    detail = (
        f"counterfactual flip rate {rate:.3f} ({cf.flips} of {cf.pairs} pairs; 95% CI "
        f"{fmt_num(cf.flip_rate.ci_low)} to {fmt_num(cf.flip_rate.ci_high)}) "
        f"{'above' if failed else 'within'} {limit:.2f}"
    )
    return ("failed" if failed else "passed"), rate, limit, detail


def _check_champion(
    report: ModelBiasReport, champion: ModelBiasReport | None, limit: float
) -> _Outcome:
    if champion is None:
        return "not run", math.nan, limit, "no champion"
    pairs = {}
    if report.gate_groups is not None and champion.gate_groups is not None:
        # One-vs-rest: each model's worst label, named (they may differ).
        name = "equalized odds difference" + (
            f" (worst label: '{report.positive_label}' vs '{champion.positive_label}')"
            if report.per_label
            else ""
        )
        pairs[name] = (
            report.gate_groups.equalized_odds_difference.value,
            champion.gate_groups.equalized_odds_difference.value,
        )
    pairs["flip rate"] = (report.flip_rate, champion.flip_rate)
    deltas = {k: c - o for k, (c, o) in pairs.items() if math.isfinite(c) and math.isfinite(o)}
    if not deltas:
        return "not run", math.nan, limit, f"{champion.model} and the candidate share no figure"
    # A tolerance for float noise: 0.07 - 0.05 is 0.020000000000000004, not "more than 0.02".
    worse = [k for k, d in deltas.items() if d > limit + 1e-12]
    compared = "; ".join(
        f"{k} {pairs[k][0]:.3f} vs {pairs[k][1]:.3f} ({d:+.3f})" for k, d in deltas.items()
    )
    verdict = (
        f"worse by more than {limit:.2f} on {', '.join(worse)}" if worse else f"within {limit:.2f}"
    )
    detail = f"against {champion.model}: {compared}; {verdict}"
    return ("failed" if worse else "passed"), max(deltas.values()), limit, detail


def _check_crows(crows: list[CrowsPairsType], limit: float, least: int) -> _Outcome:
    types = [t for t in crows if t.pairs >= least]
    if not types:
        return "not run", math.nan, limit, f"no CrowS-Pairs bias type with {least}+ pairs"
    worst = max(types, key=lambda t: t.differ_rate)
    over = [t for t in types if t.differ_rate > limit]
    listed = ", ".join(f"{t.bias_type} {t.differ_rate:.3f}" for t in over)
    detail = (
        f"CrowS-Pairs labels differ on {listed} of the pairs (above {limit:.2f})"
        if over
        else f"CrowS-Pairs labels differ on at most {worst.differ_rate:.3f} of a type's pairs "
        f"({worst.bias_type}), within {limit:.2f}"
    )
    return ("failed" if over else "passed"), worst.differ_rate, limit, detail


def _metric_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def measure_model_bias(
    predict: Callable[[list[str]], np.ndarray],
    texts: Sequence[str],
    y_true: np.ndarray,
    membership: pd.DataFrame,
    lexicon: Any,
    crows: pd.DataFrame | None,
    config: BiasConfig,
    labels: Sequence[str],
    model: str = "candidate",
    probs: np.ndarray | None = None,
) -> ModelBiasReport:
    """One model's bias figures: groups on ``texts``, identity swaps and CrowS-Pairs.

    Args:
        predict: texts -> (N, K) class probabilities (the model under test).
        lexicon: a :class:`pipeline.identity.Lexicon`; its swaps make the counterfactuals.
        crows: :func:`pipeline.identity.load_crows_pairs`'s frame, or None to skip.
        probs: ``predict(texts)`` if already computed.
    """
    from pipeline.identity import counterfactual_pairs

    probs = predict(list(texts)) if probs is None else probs
    pairs = counterfactual_pairs(texts, lexicon)
    counterfactual = None
    if pairs:
        idx = [i for i, _, _ in pairs]
        swapped = [s for _, _, s in pairs]
        counterfactual = counterfactual_flips(
            probs[idx],
            predict(swapped),
            [o for _, o, _ in pairs],
            swapped,
            resamples=config.bootstrap,
            seed=config.seed,
        )
    crows_types = None
    if crows is not None and len(crows):
        crows_types = crows_pairs_divergence(
            crows["bias_type"].to_numpy(),
            predict(crows["sent_a"].tolist()),
            predict(crows["sent_b"].tolist()),
        )
    return check_model_bias(
        np.asarray(y_true),
        probs.argmax(axis=1),
        membership,
        config,
        labels,
        counterfactual,
        crows_types,
        model,
    )
