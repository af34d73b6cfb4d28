"""Model-level bias: hand-computed group metrics, bootstrap, swaps, CrowS-Pairs, gate, report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    equalized_odds_ratio,
)

from pipeline.config import BiasConfig
from pipeline.fairness import (
    METRICS,
    OVERALL,
    TABLE_HEADER,
    CounterfactualReport,
    CrowsPairsType,
    Estimate,
    GroupMetrics,
    GroupRow,
    ModelBiasReport,
    bias_gate,
    bootstrap_disparities,
    check_model_bias,
    counterfactual_flips,
    crows_pairs_divergence,
    evaluate_model_bias,
    group_metrics,
)
from pipeline.reports import render_bias_page

# Positive label = id 0. Eight rows; outcome with respect to label 0 in the last column.
#  row  true pred  groups
#   0    0    0    a          TP
#   1    0    1    a          FN
#   2    1    0    a  b       FP
#   3    1    1    a  b       TN
#   4    0    0       b       TP
#   5    1    0       b       FP
#   6    1    1       b  one  TN
#   7    0    1    (none)     FN
Y_TRUE = np.array([0, 0, 1, 1, 0, 1, 1, 0])
Y_PRED = np.array([0, 1, 0, 1, 0, 0, 1, 1])
MEMBERSHIP = pd.DataFrame(
    {
        "a": [True, True, True, True, False, False, False, False],
        "b": [False, False, True, True, True, True, True, False],
        "empty": [False] * 8,
        "one": [False, False, False, False, False, False, True, False],
    }
)


def by_name(metrics: GroupMetrics) -> dict[str, GroupRow]:
    return {row.group: row for row in metrics.groups}


def test_group_metrics_by_hand_with_overlap_an_empty_group_and_a_group_of_one():
    m = group_metrics(Y_TRUE, Y_PRED, MEMBERSHIP, positive=0, min_group_rows=2, resamples=0)
    rows = by_name(m)
    a, b, empty, one = rows["a"], rows["b"], rows["empty"], rows["one"]
    # a: rows 0-3. Correct 0, 3. Positives 0, 1 (1 missed); negatives 2, 3 (2 flagged).
    # Class 0: P = R = 1/2; class 1: P = R = 1/2 -> macro-F1 0.5.
    assert (a.rows, a.accuracy, a.fnr, a.fpr, a.selection_rate) == (4, 0.5, 0.5, 0.5, 0.5)
    assert a.macro_f1 == pytest.approx(0.5)
    # b: rows 2-6 (overlaps a on 2, 3). Correct 3, 4, 6. Positive 4 (found); negatives
    # 2, 3, 5, 6 (2 and 5 flagged). Predicted positive: 2, 4, 5.
    # Class 0: P 1/3, R 1 -> F1 0.5; class 1: P 1, R 1/2 -> F1 2/3.
    assert (b.rows, b.accuracy, b.fnr, b.fpr, b.selection_rate) == (5, 0.6, 0.0, 0.5, 0.6)
    assert b.macro_f1 == pytest.approx((0.5 + 2 / 3) / 2)
    # empty: no rows, nothing defined.
    assert empty.rows == 0 and empty.too_small
    assert all(math.isnan(getattr(empty, metric)) for metric in METRICS)
    # one: row 6 only, a true negative predicted negative: no positives -> FNR undefined.
    assert (one.rows, one.accuracy, one.fpr, one.selection_rate, one.macro_f1) == (
        1,
        1.0,
        0.0,
        0.0,
        1.0,
    )
    assert math.isnan(one.fnr) and one.too_small
    # overall: all eight rows, row 7 in no group included.
    o = m.overall
    assert (o.group, o.rows, o.accuracy, o.fnr, o.fpr, o.selection_rate) == (
        OVERALL,
        8,
        0.5,
        0.5,
        0.5,
        0.5,
    )
    # Differences over a and b only (the others are too small).
    assert m.compared == ["a", "b"]
    assert m.demographic_parity_difference.value == pytest.approx(0.1)  # 0.6 - 0.5
    assert m.demographic_parity_ratio.value == pytest.approx(0.5 / 0.6)
    assert m.equalized_odds_difference.value == pytest.approx(0.5)  # FPR range 0, FNR 0.5
    assert m.equalized_odds_ratio.value == pytest.approx(0.5)  # FPR ratio 1, TPR 0.5/1
    assert math.isnan(m.equalized_odds_difference.ci_high) and m.resamples == 0


def test_group_metrics_positive_label_is_configurable():
    m = group_metrics(Y_TRUE, Y_PRED, MEMBERSHIP[["a"]], positive=1, min_group_rows=1)
    a = m.groups[0]
    # With label 1 positive, a's negatives are rows 0, 1 (row 0 flagged? no: pred 0) ->
    # FPR = 1/2 (row 1 predicted 1); positives 2, 3 -> FNR 1/2 (row 2 predicted 0).
    assert (a.fpr, a.fnr, a.selection_rate) == (0.5, 0.5, 0.5)


def test_differences_need_two_groups():
    m = group_metrics(Y_TRUE, Y_PRED, MEMBERSHIP, min_group_rows=5, resamples=100)
    assert m.compared == ["b"]
    assert all(math.isnan(e.value) and math.isnan(e.ci_high) for e in m.disparities().values())


def test_disparities_agree_with_fairlearn_on_disjoint_groups():
    rng = np.random.default_rng(3)
    n = 600
    y_true = rng.integers(0, 2, n)
    y_pred = np.where(rng.random(n) < 0.75, y_true, 1 - y_true)
    group = rng.choice(["x", "y", "z"], n, p=[0.5, 0.3, 0.2])
    membership = pd.DataFrame({g: group == g for g in ["x", "y", "z"]})
    m = group_metrics(y_true, y_pred, membership, positive=0, resamples=0)
    # Fairlearn's own functions on the binarised labels (positive = label 0).
    t, p = (y_true == 0).astype(int), (y_pred == 0).astype(int)
    kw = {"sensitive_features": group}
    assert m.demographic_parity_difference.value == pytest.approx(
        demographic_parity_difference(t, p, **kw)
    )
    assert m.demographic_parity_ratio.value == pytest.approx(demographic_parity_ratio(t, p, **kw))
    assert m.equalized_odds_difference.value == pytest.approx(equalized_odds_difference(t, p, **kw))
    assert m.equalized_odds_ratio.value == pytest.approx(equalized_odds_ratio(t, p, **kw))


def test_group_metrics_rejects_bad_inputs():
    with pytest.raises(ValueError, match="membership has 3 rows but there are 8 predictions"):
        group_metrics(Y_TRUE, Y_PRED, MEMBERSHIP.head(3))
    with pytest.raises(ValueError, match=r"must be boolean; \['a'\] are not"):
        group_metrics(Y_TRUE, Y_PRED, MEMBERSHIP.astype({"a": int}))
    with pytest.raises(ValueError, match="test split is empty"):
        group_metrics(np.array([], int), np.array([], int), MEMBERSHIP.head(0))


# --- bootstrap -----------------------------------------------------------------------------


def random_case(n: int = 2000, groups: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    y_pred = np.where(rng.random(n) < 0.8, y_true, 1 - y_true)
    membership = pd.DataFrame({f"g{j}": rng.random(n) < 0.15 for j in range(groups)})
    return y_true, y_pred, membership


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    y_true, y_pred, membership = random_case()
    m = group_metrics(y_true, y_pred, membership, resamples=1000, seed=0)
    for est in m.disparities().values():
        assert est.ci_low <= est.value <= est.ci_high
    again = group_metrics(y_true, y_pred, membership, resamples=1000, seed=0)
    assert again.disparities() == m.disparities()
    other = group_metrics(y_true, y_pred, membership, resamples=1000, seed=1)
    assert other.equalized_odds_difference.ci_high != m.equalized_odds_difference.ci_high


def test_bootstrap_is_degenerate_when_every_resample_gives_the_same_rates():
    # 50 negatives predicted positive in x, 50 predicted negative in y: whatever rows a
    # resample draws, x has FPR and selection rate 1 and y has 0.
    y_true = np.ones(100, dtype=int)
    y_pred = np.array([0] * 50 + [1] * 50)
    membership = pd.DataFrame({"x": y_pred == 0, "y": y_pred == 1})
    m = group_metrics(y_true, y_pred, membership, min_group_rows=10, resamples=500)
    assert m.equalized_odds_difference == Estimate(1.0, 1.0, 1.0)  # FNR undefined: FPR only
    assert m.demographic_parity_difference == Estimate(1.0, 1.0, 1.0)
    assert m.demographic_parity_ratio == Estimate(0.0, 0.0, 0.0)
    assert m.equalized_odds_ratio == Estimate(0.0, 0.0, 0.0)


def test_bootstrap_skips_rates_a_resample_leaves_undefined():
    # Group x has a single true negative: many resamples have none, so its FPR is NaN
    # there and the equalized odds difference falls back on the groups that have one.
    y_true = np.array([1] + [0] * 39 + [1] * 20 + [0] * 20)
    y_pred = np.array([0] + [0] * 30 + [1] * 9 + [1] * 15 + [0] * 5 + [0] * 20)
    membership = pd.DataFrame({"x": np.arange(80) < 40, "y": np.arange(80) >= 40})
    samples = bootstrap_disparities(y_true, y_pred, membership.to_numpy(), 0, 300, seed=0)
    assert samples.shape == (300, 4)
    assert np.isfinite(samples[:, 2]).all()  # the FNR range is always defined
    m = group_metrics(y_true, y_pred, membership, min_group_rows=10, resamples=300)
    eo = m.equalized_odds_difference
    assert np.isfinite([eo.ci_low, eo.ci_high]).all()


def test_bootstrap_of_2000_rows_and_8_groups_takes_well_under_a_second():
    y_true, y_pred, membership = random_case()
    start = time.perf_counter()
    samples = bootstrap_disparities(y_true, y_pred, membership.to_numpy(), 0, 1000, seed=0)
    assert time.perf_counter() - start < 3.0  # ~0.03 s measured; slack for a busy machine
    assert samples.shape == (1000, 4) and np.isfinite(samples).all()


# --- counterfactual swaps and CrowS-Pairs -----------------------------------------------------

PROBS_ORIGINAL = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
PROBS_SWAPPED = np.array([[0.8, 0.2], [0.4, 0.6], [0.35, 0.65], [0.45, 0.55]])
TEXTS = ["he was fine", "<script>alert(1)</script> his film", "she wept", "his best"]
SWAPPED_TEXTS = ["she was fine", "<script>alert(1)</script> her film", "he wept", "her best"]


def test_counterfactual_flips_by_hand():
    report = counterfactual_flips(PROBS_ORIGINAL, PROBS_SWAPPED, TEXTS, SWAPPED_TEXTS)
    # Labels 0,0,1,0 -> 0,1,1,1: pairs 1 and 3 flip. p(label 0) moves -0.1, -0.2, +0.05, -0.1.
    assert (report.pairs, report.flips, report.flip_rate.value) == (4, 2, 0.5)
    assert report.mean_abs_delta == pytest.approx(0.45 / 4)
    assert [x.original for x in report.examples] == [TEXTS[1], TEXTS[3]]  # |delta| 0.2, 0.1
    first = report.examples[0]
    assert (first.label_original, first.label_swapped) == (0, 1)
    assert (first.p_original, first.p_swapped, first.delta) == pytest.approx((0.6, 0.4, -0.2))
    assert report.flip_rate.ci_low <= 0.5 <= report.flip_rate.ci_high
    top1 = counterfactual_flips(PROBS_ORIGINAL, PROBS_SWAPPED, TEXTS, SWAPPED_TEXTS, top=1)
    assert [x.original for x in top1.examples] == [TEXTS[1]]


def test_counterfactual_flip_interval_is_degenerate_when_every_pair_flips():
    report = counterfactual_flips(PROBS_SWAPPED[[1, 3]], PROBS_ORIGINAL[[1, 3]], "ab", "cd")
    assert report.flip_rate == Estimate(1.0, 1.0, 1.0)


def test_counterfactual_without_pairs_and_with_mismatched_inputs():
    empty = counterfactual_flips(np.zeros((0, 2)), np.zeros((0, 2)), [], [])
    assert empty.pairs == 0 and math.isnan(empty.flip_rate.value)
    with pytest.raises(ValueError, match=r"must both be \(M, K\), got \(4, 2\) and \(3, 2\)"):
        counterfactual_flips(PROBS_ORIGINAL, PROBS_SWAPPED[:3], TEXTS, SWAPPED_TEXTS)
    with pytest.raises(ValueError, match="4 probability rows but 3 original"):
        counterfactual_flips(PROBS_ORIGINAL, PROBS_SWAPPED, TEXTS[:3], SWAPPED_TEXTS)


def test_crows_pairs_per_type_by_hand():
    types = ["race", "gender", "race", "race"]
    probs_a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    probs_b = np.array([[0.7, 0.3], [0.6, 0.4], [0.4, 0.6], [0.3, 0.7]])
    gender, race = crows_pairs_divergence(types, probs_a, probs_b)
    assert (gender.bias_type, gender.pairs, gender.differ_rate) == ("gender", 1, 1.0)
    assert gender.mean_abs_delta == pytest.approx(0.4)
    # race: pairs 0, 2, 3; labels 0,0,1 vs 0,1,1 -> pair 2 differs; |delta| 0.2, 0.2, 0.
    assert (race.bias_type, race.pairs) == ("race", 3)
    assert race.differ_rate == pytest.approx(1 / 3)
    assert race.mean_abs_delta == pytest.approx(0.4 / 3)
    with pytest.raises(ValueError, match="3 bias types but 4 probability rows"):
        crows_pairs_divergence(types[:3], probs_a, probs_b)


# --- the gate ----------------------------------------------------------------------------------


def make_report(
    eo: float = 0.05,
    eo_high: float = 0.08,
    flip_rate: float | None = 0.01,
    crows: list[CrowsPairsType] | None = None,
    model: str = "candidate",
) -> ModelBiasReport:
    row = GroupRow("all", 200, 0.9, 0.9, 0.1, 0.1, 0.5, False)
    groups = GroupMetrics(
        positive=0,
        min_group_rows=30,
        total_rows=200,
        resamples=1000,
        overall=row,
        groups=[row],
        compared=["female", "male"],
        demographic_parity_difference=Estimate(0.02, 0.0, 0.05),
        demographic_parity_ratio=Estimate(0.95, 0.9, 1.0),
        equalized_odds_difference=Estimate(eo, eo / 2, eo_high),
        equalized_odds_ratio=Estimate(0.9, 0.8, 1.0),
    )
    cf = (
        CounterfactualReport(100, round(flip_rate * 100), Estimate(flip_rate), 0.01)
        if flip_rate is not None
        else None
    )
    # Both groups large enough to gate on (the gate reads gate_groups).
    return ModelBiasReport(model, ["fresh", "rotten"], groups, cf, crows or [], gate_groups=groups)


def statuses(verdict) -> dict[str, str]:
    return {c.check: c.status for c in verdict.checks}


def test_gate_passes_a_clean_model_and_skips_what_it_cannot_check():
    verdict = bias_gate(make_report(), BiasConfig())
    assert statuses(verdict) == {
        "equalized_odds": "passed",
        "counterfactual_flips": "passed",
        "champion_regression": "not run",
        "crows_pairs": "not run",
    }
    assert verdict.passed and verdict.status == "passed"
    assert verdict.summary().startswith("passed | not run: champion_regression (no champion)")


def test_gate_reads_the_upper_bound_of_equalized_odds():
    verdict = bias_gate(make_report(eo=0.05, eo_high=0.12), BiasConfig())
    check = verdict.checks[0]
    assert (check.check, check.status, check.severity, check.value) == (
        "equalized_odds",
        "failed",
        "error",
        0.12,
    )
    assert verdict.refused and verdict.status == "refused"
    assert "upper bound above 0.10" in verdict.failures[0]
    assert "over female, male" in verdict.failures[0]


def test_gate_equalized_odds_not_run_without_two_groups():
    verdict = bias_gate(make_report(eo=math.nan, eo_high=math.nan), BiasConfig())
    assert statuses(verdict)["equalized_odds"] == "not run" and verdict.passed


@pytest.mark.parametrize(
    ("severity", "refused", "status"),
    [("error", True, "refused"), ("warn", False, "warned"), ("off", False, "passed")],
)
def test_gate_severity_decides_what_a_failure_does(severity, refused, status):
    config = BiasConfig(severity={"counterfactual_flips": severity})
    verdict = bias_gate(make_report(flip_rate=0.06), config)
    flips = verdict.checks[1]
    assert flips.severity == severity
    assert flips.status == ("not run" if severity == "off" else "failed")
    assert verdict.refused is refused and verdict.status == status
    if severity == "warn":
        assert verdict.summary().startswith("warning: counterfactual flip rate 0.060")


def test_gate_flip_rate_at_the_limit_passes_and_missing_swaps_do_not_run():
    assert statuses(bias_gate(make_report(flip_rate=0.05), BiasConfig()))[
        "counterfactual_flips"
    ] == ("passed")
    verdict = bias_gate(make_report(flip_rate=None), BiasConfig())
    assert statuses(verdict)["counterfactual_flips"] == "not run"


@pytest.mark.parametrize(
    ("candidate", "champion", "status"),
    [
        ({"eo": 0.08}, {"eo": 0.05}, "failed"),  # EO worse by 0.03
        ({"eo": 0.06}, {"eo": 0.05}, "passed"),  # worse by 0.01: within 0.02
        ({"eo": 0.07}, {"eo": 0.05}, "passed"),  # worse by exactly 0.02 (in floats, a hair more)
        ({"eo": 0.02}, {"eo": 0.08}, "passed"),  # better
        ({"flip_rate": 0.04}, {"flip_rate": 0.01}, "failed"),  # flips worse by 0.03
        ({"flip_rate": 0.0}, {"flip_rate": 0.04}, "passed"),
        ({"flip_rate": None}, {"flip_rate": 0.0}, "passed"),  # compares EO only
    ],
)
def test_gate_champion_regression_both_ways(candidate, champion, status):
    verdict = bias_gate(
        make_report(**candidate), BiasConfig(), make_report(**champion, model="champion v3")
    )
    check = verdict.checks[2]
    assert (check.check, check.status) == ("champion_regression", status)
    assert verdict.refused is (status == "failed")
    if status == "failed":
        assert check.detail.startswith("against champion v3: equalized odds difference")
        assert "(+0.030); " in check.detail and "worse by more than 0.02 on" in check.detail
        assert check.value == pytest.approx(0.03)


def test_gate_crows_pairs_warns_by_default_and_ignores_small_types():
    crows = [CrowsPairsType("race", 40, 0.10, 0.05), CrowsPairsType("age", 10, 0.5, 0.2)]
    verdict = bias_gate(make_report(crows=crows), BiasConfig())
    check = verdict.checks[3]
    assert (check.status, check.severity, check.value) == ("failed", "warn", 0.10)
    assert "race 0.100" in check.detail and "age" not in check.detail
    assert not verdict.refused and verdict.status == "warned"
    strict = bias_gate(make_report(crows=crows), BiasConfig(severity={"crows_pairs": "error"}))
    assert strict.refused
    small = bias_gate(make_report(crows=crows[1:]), BiasConfig())
    assert statuses(small)["crows_pairs"] == "not run"


# --- the report --------------------------------------------------------------------------------


def full_report(tmp_labels: list[str] | None = None) -> ModelBiasReport:
    config = BiasConfig(min_group_rows=2, bootstrap=200)
    cf = counterfactual_flips(PROBS_ORIGINAL, PROBS_SWAPPED, TEXTS, SWAPPED_TEXTS)
    crows = crows_pairs_divergence(["race", "race"], PROBS_ORIGINAL[:2], PROBS_SWAPPED[:2])
    membership = MEMBERSHIP.rename(columns={"one": "<b>one</b>"})
    labels = tmp_labels or ["fresh", "rotten"]
    candidate = check_model_bias(Y_TRUE, Y_PRED, membership, config, labels, cf, crows)
    probe = check_model_bias(Y_TRUE, Y_TRUE, membership, config, labels, model="base probe")
    champion = check_model_bias(
        Y_TRUE, 1 - Y_PRED, membership, config, labels, cf, model="champion v2"
    )
    return evaluate_model_bias(candidate, config, probe, champion)


def test_report_json_carries_null_for_nan():
    body = full_report().to_dict()
    text = json.dumps(body, allow_nan=False)  # raises on NaN
    empty = next(g for g in body["groups"]["groups"] if g["group"] == "empty")
    assert empty["accuracy"] is None and empty["rows"] == 0
    assert body["base_probe"]["counterfactual"] is None
    assert body["gate"]["status"] in {"passed", "warned", "refused"}
    assert "NaN" not in text


def test_report_summary_tables_and_metrics():
    report = full_report()
    assert report.summary().startswith("bias gate ")
    assert "equalized odds difference 0.500" in report.summary()
    rows = report.table_rows()
    assert all(len(r) == len(TABLE_HEADER) for r in rows)
    eo = next(r for r in rows if r[0] == "equalized odds difference")
    # candidate 0.5; base probe predicts perfectly -> 0; champion flips every prediction.
    assert eo[1] == "0.500" and eo[3] == "0.000"
    flips = next(r for r in rows if r[0] == "counterfactual flip rate")
    assert flips[1] == "0.500" and flips[3] == "n/a" and flips[5] == "+0.000"
    groups = {r[0]: r for r in report.group_rows()}
    assert groups["empty"][2] == "n/a" and groups["<b>one</b>"][-1] == "too small"
    metrics = report.metrics()
    assert metrics["bias_equalized_odds_difference"] == pytest.approx(0.5)
    assert metrics["bias_group_a_accuracy"] == 0.5
    assert "bias_group_empty_accuracy" not in metrics  # NaN dropped
    assert "bias_group__b_one_b__accuracy" in metrics  # sanitised for MLflow


def test_html_escapes_texts_and_draws_one_chart_per_metric(tmp_path: Path):
    path = render_bias_page(full_report(), tmp_path / "bias" / "report.html")
    page = path.read_text(encoding="utf-8")
    assert page.count("<img ") == len(METRICS)
    assert page.count("data:image/png;base64,iVBOR") == len(METRICS)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; his film" in page
    assert "&lt;b&gt;one&lt;/b&gt;" in page and "<b>one</b>" not in page
    assert "fresh → rotten" in page  # label names, not ids
    assert "champion_regression" in page and "CrowS-Pairs" in page


def test_html_without_comparisons_or_swaps(tmp_path: Path):
    report = make_report(flip_rate=None)
    page = render_bias_page(report, tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count("<img ") == len(METRICS)
    assert "Not run: no test text holds a swappable identity term." in page
    assert "Gate:" not in page


# --- more than two labels: one-vs-rest -------------------------------------------------------

# Labels x, y, z (ids 0, 1, 2); groups A and B of four rows, E empty.
#  row  true pred  group
#   0    x    x    A
#   1    x    y    A
#   2    y    y    A
#   3    z    z    A
#   4    x    x    B
#   5    y    y    B
#   6    z    x    B
#   7    z    y    B
# x positive: A FNR 1/2 (row 1), FPR 0 (rows 2, 3), selection 1/4; B FNR 0, FPR 1/3 (row 6
#   of 5, 6, 7), selection 2/4 -> EO max(1/3, 1/2) = 0.5, DP 1/4.
# y positive: A FNR 0, FPR 1/3 (row 1 of 0, 1, 3), selection 2/4; B FNR 0, FPR 1/3 (row 7),
#   selection 2/4 -> EO 0, DP 0.
# z positive: A FNR 0, FPR 0, selection 1/4; B FNR 1 (rows 6, 7), FPR 0, selection 0
#   -> EO 1.0, DP 1/4: the worst label.
Y3_TRUE = np.array([0, 0, 1, 2, 0, 1, 2, 2])
Y3_PRED = np.array([0, 1, 1, 2, 0, 1, 0, 1])
MEMBERSHIP3 = pd.DataFrame(
    {"A": [True] * 4 + [False] * 4, "B": [False] * 4 + [True] * 4, "E": [False] * 8}
)
LABELS3 = ["x", "y", "z"]


def three_label_report() -> ModelBiasReport:
    config = BiasConfig(min_group_rows=2, min_gate_rows=2, bootstrap=100)
    report = check_model_bias(Y3_TRUE, Y3_PRED, MEMBERSHIP3, config, LABELS3)
    return evaluate_model_bias(report, config)


def test_three_labels_are_read_one_vs_rest_by_hand():
    report = three_label_report()
    by_label = {lb.label: lb.groups for lb in report.per_label}
    assert list(by_label) == LABELS3
    rows = {k: {r.group: r for r in g.groups} for k, g in by_label.items()}
    assert (rows["x"]["A"].fnr, rows["x"]["A"].fpr, rows["x"]["A"].selection_rate) == (
        0.5,
        0.0,
        0.25,
    )
    assert rows["x"]["B"].fpr == pytest.approx(1 / 3) and rows["x"]["B"].fnr == 0.0
    assert rows["y"]["A"].fpr == pytest.approx(1 / 3) and rows["y"]["B"].selection_rate == 0.5
    assert (rows["z"]["B"].fnr, rows["z"]["B"].selection_rate) == (1.0, 0.0)
    assert rows["z"]["E"].rows == 0 and math.isnan(rows["z"]["E"].fpr)  # empty: no figures
    eo = {k: g.equalized_odds_difference.value for k, g in by_label.items()}
    dp = {k: g.demographic_parity_difference.value for k, g in by_label.items()}
    assert eo == pytest.approx({"x": 0.5, "y": 0.0, "z": 1.0})
    assert dp == pytest.approx({"x": 0.25, "y": 0.0, "z": 0.25})
    # The headline and the gate read the worst label, z, and say so.
    assert report.positive_label == "z" and report.groups.positive == 2
    assert report.gate_groups is not None and report.gate_groups.positive == 2
    assert report.groups.equalized_odds_difference.value == 1.0
    assert report.gate is not None and report.gate.refused
    assert "for label 'z', the worst of 3 labels one-vs-rest" in report.gate.failures[0]
    assert "label 'z', the worst of 3 labels" in report.summary()


def test_three_labels_in_tables_json_and_metrics():
    report = three_label_report()
    table = {r[0]: r for r in report.table_rows()}
    assert all(len(r) == len(TABLE_HEADER) for r in table.values())
    assert table["equalized odds difference [x]"][1] == "0.500"
    assert table["equalized odds difference [y]"][1] == "0.000"
    assert table["equalized odds difference [z]"][1] == "1.000"
    assert table["demographic parity difference [z]"][1] == "0.250"
    assert "equalized odds difference" not in table  # every figure names its label
    groups = {r[0]: r for r in report.group_rows()}
    assert groups["B [z]"][5] == "1.000" and groups["A [x]"][5] == "0.500"  # FNR column
    assert groups["E [y]"][1] == "0" and groups["E [y]"][2] == "n/a"
    metrics = report.metrics()
    assert metrics["bias_label_z_equalized_odds_difference"] == 1.0
    assert metrics["bias_label_x_demographic_parity_difference"] == 0.25
    body = report.to_dict()
    json.dumps(body, allow_nan=False)
    assert [lb["label"] for lb in body["per_label"]] == LABELS3
    assert body["groups"]["positive"] == 2


def test_two_labels_keep_a_single_positive_label():
    report = full_report()
    assert report.per_label == [] and report.positive_label == "fresh"
    assert "worst" not in report.summary()


def test_three_labels_against_a_champion_name_each_worst_label():
    config = BiasConfig(min_group_rows=2, min_gate_rows=2, bootstrap=100)
    champion = check_model_bias(Y3_TRUE, Y3_TRUE, MEMBERSHIP3, config, LABELS3, model="champion")
    report = evaluate_model_bias(
        check_model_bias(Y3_TRUE, Y3_PRED, MEMBERSHIP3, config, LABELS3), config, None, champion
    )
    check = next(c for c in report.gate.checks if c.check == "champion_regression")
    # The champion is perfect: every label's EO is 0, so its worst is the first, x.
    assert champion.positive_label == "x"
    assert check.status == "failed" and check.value == 1.0
    assert "equalized odds difference (worst label: 'z' vs 'x') 1.000 vs 0.000" in check.detail
    table = {r[0]: r for r in report.table_rows()}
    assert table["equalized odds difference [z]"][4:] == ("0.000", "+1.000")
