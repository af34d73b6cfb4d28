"""The promotion policy on hand-made figures: every criterion, both modes, no champion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import tags as tag
from pipeline.config import PromotionConfig
from pipeline.gates import GateOutcome, GateStatus, outcomes_from_tags
from pipeline.promotion import (
    CandidateFigures,
    ChampionFigures,
    Criterion,
    decide_promotion,
)

PASSED, WARNED, REFUSED = GateStatus.PASSED, GateStatus.WARNED, GateStatus.REFUSED
GATES_OK = [
    GateOutcome("validation", PASSED, "passed"),
    GateOutcome("bias", WARNED, "passed with 2 warnings"),
    GateOutcome("forgetting", WARNED, "warned"),
]


def candidate(
    metric: float = 0.8153,
    probe: float | None = 0.70,
    gates: list[GateOutcome] | None = None,
    groups: dict[str, float] | None = None,
) -> CandidateFigures:
    return CandidateFigures(
        metric_name="macro_f1",
        metric=metric,
        probe_metric=probe,
        gates=GATES_OK if gates is None else gates,
        group_accuracy=groups or {},
    )


def champion(metric: float = 0.8053, groups: dict[str, float] | None = None) -> ChampionFigures:
    return ChampionFigures(version="3", metric=metric, group_accuracy=groups or {})


def by_name(criteria: list[Criterion]) -> dict[str, Criterion]:
    return {c.name: c for c in criteria}


def test_better_candidate_is_promoted_and_the_verdict_lists_every_criterion_with_numbers():
    verdict = decide_promotion(candidate(), champion(), PromotionConfig())

    assert (verdict.promote, verdict.alias, verdict.refused) == (True, "champion", False)
    assert [c.name for c in verdict.criteria] == ["gates", "floor", "probe", "champion", "groups"]
    got = by_name(verdict.criteria)
    assert got["gates"].detail == (
        "validation passed, bias passed with 2 warnings, forgetting warned"
    )
    assert got["floor"].detail == "test macro_f1 0.8153 vs floor 0.0000: reached"
    assert got["probe"].detail == "test macro_f1 0.8153 vs probe 0.7000: better"
    assert got["champion"].detail == ("test macro_f1 0.8153 vs champion v3 0.8053 + 0.0000: better")
    assert got["groups"].detail == "no group large enough to compare"
    summary = verdict.summary()
    assert "\n" not in summary
    assert summary.startswith("promote to champion: gates ok (validation passed")
    assert "champion ok (test macro_f1 0.8153 vs champion v3 0.8053 + 0.0000: better)" in summary
    as_dict = json.loads(json.dumps(verdict.to_dict()))
    assert as_dict["alias"] == "champion" and as_dict["summary"] == summary
    assert as_dict["criteria"][3] == {
        "name": "champion",
        "passed": True,
        "detail": "test macro_f1 0.8153 vs champion v3 0.8053 + 0.0000: better",
    }


def test_superiority_needs_more_than_the_minimum_improvement():
    policy = PromotionConfig(min_improvement=0.01)
    # 0.8053 + 0.01 is 0.8153 (up to float error): equal is not "more than".
    at_margin = decide_promotion(candidate(0.8153), champion(0.8053), policy)
    assert (at_margin.promote, at_margin.alias) == (False, "challenger")
    assert by_name(at_margin.criteria)["champion"] == Criterion(
        "champion", False, "test macro_f1 0.8153 vs champion v3 0.8053 + 0.0100: not better"
    )
    assert decide_promotion(candidate(0.8154), champion(0.8053), policy).promote
    # With no minimum, a tie keeps the champion.
    tie = decide_promotion(candidate(0.8053), champion(0.8053), PromotionConfig())
    assert tie.alias == "challenger"


def test_non_inferiority_accepts_a_candidate_worse_by_at_most_the_margin():
    policy = PromotionConfig(mode="non-inferiority", non_inferiority_margin=0.01)
    at_margin = decide_promotion(candidate(0.80), champion(0.81), policy)
    assert at_margin.promote
    assert by_name(at_margin.criteria)["champion"].detail == (
        "test macro_f1 0.8000 vs champion v3 0.8100 - 0.0100: non-inferior"
    )
    worse = decide_promotion(candidate(0.7999), champion(0.81), policy)
    assert (worse.promote, worse.alias) == (False, "challenger")
    assert by_name(worse.criteria)["champion"].detail.endswith("0.8100 - 0.0100: inferior")


def test_floor_and_probe():
    floor = decide_promotion(candidate(0.55), None, PromotionConfig(min_metric=0.6))
    assert (floor.promote, floor.alias) == (False, "challenger")
    assert by_name(floor.criteria)["floor"] == Criterion(
        "floor", False, "test macro_f1 0.5500 vs floor 0.6000: below"
    )

    probe = decide_promotion(candidate(0.8153, probe=0.82), champion(0.5), PromotionConfig())
    assert (probe.promote, probe.alias) == (False, "challenger")
    assert by_name(probe.criteria)["probe"].detail == (
        "test macro_f1 0.8153 vs probe 0.8200: not better"
    )
    off = decide_promotion(
        candidate(0.8153, probe=0.82), champion(0.5), PromotionConfig(beat_probe=False)
    )
    assert off.promote
    assert by_name(off.criteria)["probe"] == Criterion(
        "probe", True, "skipped: promotion.beat_probe is false"
    )
    missing = decide_promotion(candidate(probe=None), champion(0.5), PromotionConfig())
    assert by_name(missing.criteria)["probe"].detail == "skipped: no probe metric reported"


def test_groups_may_trail_the_champion_by_at_most_the_margin():
    champ = champion(0.5, groups={"women": 0.80, "men": 0.82, "black": 0.75})
    policy = PromotionConfig(group_margin=0.02)

    # women 0.78 = 0.80 - 0.02 passes; men 0.79 < 0.80 fails; black/asian are not in both.
    fails = decide_promotion(
        candidate(groups={"women": 0.78, "men": 0.79, "asian": 0.9}), champ, policy
    )
    assert (fails.promote, fails.alias) == (False, "challenger")
    assert by_name(fails.criteria)["groups"] == Criterion(
        "groups",
        False,
        "1 of 2 groups trail the champion by more than 0.0200: men 0.7900 vs 0.8200",
    )

    passes = decide_promotion(candidate(groups={"women": 0.78, "men": 0.81}), champ, policy)
    assert passes.promote
    assert by_name(passes.criteria)["groups"].detail == (
        "all 2 groups within 0.0200 of the champion (closest: women 0.7800 vs 0.8000)"
    )
    disjoint = decide_promotion(candidate(groups={"asian": 0.1}), champ, policy)
    assert disjoint.promote
    assert by_name(disjoint.criteria)["groups"].detail == "no group large enough to compare"


def test_without_a_champion_only_the_absolute_floors_apply():
    weak = candidate(0.30, probe=0.20, groups={"women": 0.1})
    verdict = decide_promotion(weak, None, PromotionConfig())
    assert (verdict.promote, verdict.alias) == (True, "champion")
    got = by_name(verdict.criteria)
    assert got["champion"] == Criterion("champion", True, "skipped: no champion yet")
    assert got["groups"] == Criterion("groups", True, "skipped: no champion yet")

    below = decide_promotion(weak, None, PromotionConfig(min_metric=0.5))
    assert (below.promote, below.alias) == (False, "challenger")


def test_a_failed_gate_refuses_the_candidate_whatever_its_metrics():
    gates = [
        GateOutcome("validation", PASSED, "passed"),
        GateOutcome("bias", PASSED, "passed"),
        GateOutcome("forgetting", REFUSED, "refused: retention 0.71"),
    ]
    verdict = decide_promotion(candidate(0.99, gates=gates), champion(0.5), PromotionConfig())

    assert (verdict.promote, verdict.alias, verdict.refused) == (False, "none", True)
    assert by_name(verdict.criteria)["gates"] == Criterion(
        "gates", False, "validation passed, bias passed, forgetting refused: retention 0.71"
    )
    assert verdict.summary().startswith("refused: gates FAILED (")
    assert verdict.to_dict()["refused"] is True
    # Other criteria are still reported with their numbers.
    assert by_name(verdict.criteria)["champion"].passed


@pytest.mark.parametrize(
    ("status", "passed"),
    [
        (GateStatus.PASSED, True),
        (GateStatus.WARNED, True),
        (GateStatus.OFF, True),
        (GateStatus.REFUSED, False),
        (GateStatus.NOT_RECORDED, False),
    ],
)
def test_a_gate_passes_by_its_status_not_its_wording(status: GateStatus, passed: bool):
    # The wording says "passed"; only the status decides.
    assert GateOutcome("bias", status, "passed: wording is not read").passed is passed


def test_gate_outcomes_round_trip_through_tags_and_missing_statuses_do_not_pass():
    recorded = [
        GateOutcome("validation", WARNED, "passed with 2 warnings"),
        GateOutcome("forgetting", REFUSED, "refused: mean drop 0.061 > 0.05"),
        GateOutcome("bias", PASSED, "passed: passed"),
    ]
    tags = {k: v for o in recorded for k, v in o.to_tags().items()}
    assert tags[tag.gate_status("forgetting")] == "refused"
    assert tags[tag.FORGETTING_GATE] == "refused: mean drop 0.061 > 0.05"
    assert outcomes_from_tags(tags) == recorded
    legacy = {tag.FORGETTING_GATE: "passed"}  # a version tagged before statuses existed
    (validation, forgetting, bias) = outcomes_from_tags(legacy)
    assert forgetting.status is GateStatus.NOT_RECORDED and not forgetting.passed
    assert forgetting.summary == "status not recorded (its summary: passed)"
    assert validation.summary == "status not recorded" and not validation.passed


def test_policy_module_imports_no_mlflow_prefect_or_torch():
    # A fresh interpreter: this test session may have imported them already.
    code = (
        "import sys, pipeline.promotion; "
        "print(sorted({'mlflow', 'prefect', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- model identity: task, ordered labels, input signature --------------------------------


def test_identity_round_trips_through_tags_and_equal_identities_do_not_differ():
    from pipeline.promotion import compare_identity, identity_from_tags, text_classifier_identity

    sentiment = text_classifier_identity(["fresh", "rotten"])
    tags = sentiment.to_tags()
    assert tags == {
        "retune.identity.task": "text-classification",
        "retune.identity.labels": '["fresh", "rotten"]',
        "retune.identity.input": '{"text": "string"}',
    }
    assert identity_from_tags(tags) == sentiment
    assert identity_from_tags({"retune.data_md5": "abc"}) is None
    assert compare_identity(sentiment, text_classifier_identity(["fresh", "rotten"])) == []


def test_compare_identity_names_every_difference():
    from pipeline.promotion import ModelIdentity, compare_identity, text_classifier_identity

    sentiment = text_classifier_identity(["fresh", "rotten"])
    topics = text_classifier_identity(["business", "sport", "tech"])
    assert compare_identity(topics, sentiment) == [
        "labels [business, sport, tech] differ from the champion's [fresh, rotten]"
    ]
    swapped = compare_identity(text_classifier_identity(["rotten", "fresh"]), sentiment)
    assert swapped == [
        "labels [rotten, fresh] differ from the champion's [fresh, rotten] "
        "(same labels, another order)"
    ]
    other = ModelIdentity("token-classification", ("fresh", "rotten"), (("review", "string"),))
    assert compare_identity(other, sentiment) == [
        "task token-classification differs from the champion's text-classification",
        "input (review: string) differs from the champion's (text: string)",
    ]


def test_an_incompatible_candidate_gets_no_alias_and_the_criterion_names_the_fix():
    from pipeline.promotion import compatibility_criterion, refuse_incompatible

    differences = ["labels [business, sport, tech] differ from the champion's [fresh, rotten]"]
    criterion = compatibility_criterion(differences, "retune-rotten-tomatoes", "1", "retune-news")
    assert criterion.name == "compatible" and not criterion.passed
    assert criterion.detail == (
        "labels [business, sport, tech] differ from champion v1's [fresh, rotten]: a model of "
        "another kind never takes an alias of retune-rotten-tomatoes; register it under its own "
        "name with --set registry.model_name=retune-news"
    )
    verdict = refuse_incompatible(criterion)
    assert (verdict.promote, verdict.alias, verdict.refused, verdict.incompatible) == (
        False,
        "none",
        True,
        True,
    )
    assert verdict.summary().startswith("refused: compatible FAILED (labels [business")
    # Its own default name is taken already: another name is suggested.
    same = compatibility_criterion(differences, "retune-news", "4", "retune-news")
    assert same.detail.endswith("--set registry.model_name=retune-news-2")
    assert compatibility_criterion([], "m", "4", "m").passed


def test_a_failed_gate_is_refused_but_not_incompatible():
    verdict = decide_promotion(
        candidate(gates=[GateOutcome("bias", REFUSED, "refused: gap")]), None, PromotionConfig()
    )
    assert verdict.refused and not verdict.incompatible
