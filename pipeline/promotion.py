"""The promotion policy: from reports to a verdict on whether a candidate becomes champion.

Pure: it takes the figures the flow has already computed (gate outcomes, the candidate's
and the champion's metrics on the same test split, per-group accuracy) and returns a
verdict that lists every criterion with its numbers. Moving aliases is
:func:`pipeline.registry.move_champion`'s job, one call after this.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline import tags as tag
from pipeline.config import PromotionConfig
from pipeline.gates import GateOutcome

CHAMPION = "champion"
CHALLENGER = "challenger"
NO_ALIAS = "none"
# What a model is, recorded on every run and registered version (keys defined once here).
TEXT_CLASSIFICATION = "text-classification"
TEXT_INPUT = {"text": "string"}  # the pyfunc model reads one string column, "text"
COMPATIBLE = "compatible"
# Margins are added to metrics that are ratios of counts; without a tolerance,
# 0.81 - 0.01 would fall just below 0.80 in floating point.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Criterion:
    name: str  # gates | floor | probe | champion | groups
    passed: bool
    detail: str  # the numbers, e.g. "test macro_f1 0.8153 vs champion 0.8053 + 0.0000: better"


@dataclass(frozen=True)
class CandidateFigures:
    metric_name: str  # e.g. "macro_f1"
    metric: float  # the primary metric on the current test split
    probe_metric: float | None  # the frozen-feature probe's primary metric, if one was trained
    gates: list[GateOutcome]  # validation, forgetting, bias
    group_accuracy: dict[str, float]  # groups large enough to judge (bias.min_gate_rows)


@dataclass(frozen=True)
class ChampionFigures:
    version: str
    metric: float  # re-evaluated on the candidate's test split
    group_accuracy: dict[str, float]


@dataclass(frozen=True)
class PromotionVerdict:
    promote: bool
    alias: str  # champion | challenger | none (refused by a gate)
    criteria: list[Criterion]

    @property
    def refused(self) -> bool:
        """A gate failed, or the model is of another kind: the candidate gets no alias."""
        return any(c.name in ("gates", COMPATIBLE) and not c.passed for c in self.criteria)

    @property
    def incompatible(self) -> bool:
        """The candidate is not the same kind of model as the champion (never registered)."""
        return any(c.name == COMPATIBLE and not c.passed for c in self.criteria)

    def summary(self) -> str:
        """One line: the outcome, then every criterion with its numbers."""
        outcome = {
            CHAMPION: "promote to champion",
            CHALLENGER: "keep as challenger",
            NO_ALIAS: "refused",
        }[self.alias]
        parts = [f"{c.name} {'ok' if c.passed else 'FAILED'} ({c.detail})" for c in self.criteria]
        return f"{outcome}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "alias": self.alias,
            "refused": self.refused,
            "summary": self.summary(),
            "criteria": [asdict(c) for c in self.criteria],
        }


@dataclass(frozen=True)
class ModelIdentity:
    """What kind of model a version is: versions of one registered model must agree."""

    task: str
    labels: tuple[str, ...]  # in output order: label i is the model's class i
    inputs: tuple[tuple[str, str], ...]  # (column, type), e.g. (("text", "string"),)

    def to_tags(self) -> dict[str, str]:
        return {
            tag.IDENTITY_TASK: self.task,
            tag.IDENTITY_LABELS: json.dumps(list(self.labels)),
            tag.IDENTITY_INPUT: json.dumps(dict(self.inputs)),
        }


def text_classifier_identity(labels: list[str]) -> ModelIdentity:
    """The identity of a retune text classifier over ``labels`` (in order)."""
    return ModelIdentity(TEXT_CLASSIFICATION, tuple(labels), tuple(TEXT_INPUT.items()))


def identity_from_tags(tags: Mapping[str, str]) -> ModelIdentity | None:
    """The identity recorded in a run's or version's tags; None if it was never recorded."""
    if tag.IDENTITY_LABELS not in tags:
        return None
    return ModelIdentity(
        task=tags.get(tag.IDENTITY_TASK, TEXT_CLASSIFICATION),
        labels=tuple(json.loads(tags[tag.IDENTITY_LABELS])),
        inputs=tuple(json.loads(tags.get(tag.IDENTITY_INPUT) or json.dumps(TEXT_INPUT)).items()),
    )


def compare_identity(candidate: ModelIdentity, champion: ModelIdentity) -> list[str]:
    """How ``candidate`` differs from ``champion``: task, labels (order matters: label i is
    class i) and input signature. Empty when they are the same kind of model."""
    differences = []
    if candidate.task != champion.task:
        differences.append(f"task {candidate.task} differs from the champion's {champion.task}")
    if candidate.labels != champion.labels:
        same_set = set(candidate.labels) == set(champion.labels)
        differences.append(
            f"labels [{', '.join(candidate.labels)}] differ from the champion's "
            f"[{', '.join(champion.labels)}]"
            + (" (same labels, another order)" if same_set else "")
        )
    if candidate.inputs != champion.inputs:
        differences.append(
            f"input {_signature(candidate.inputs)} differs from the champion's "
            f"{_signature(champion.inputs)}"
        )
    return differences


def _signature(inputs: tuple[tuple[str, str], ...]) -> str:
    return "(" + ", ".join(f"{column}: {kind}" for column, kind in inputs) + ")"


def compatibility_criterion(
    differences: list[str], model_name: str, champion_version: str, suggested_name: str
) -> Criterion:
    """The ``compatible`` criterion: failing names every difference and the fix."""
    if not differences:
        return Criterion(
            COMPATIBLE, True, f"same task, labels and input as champion v{champion_version}"
        )
    listed = "; ".join(
        d.replace("the champion's", f"champion v{champion_version}'s") for d in differences
    )
    other = suggested_name if suggested_name != model_name else f"{model_name}-2"
    return Criterion(
        COMPATIBLE,
        False,
        f"{listed}: a model of another kind never takes an alias of {model_name}; register it "
        f"under its own name with --set registry.model_name={other}",
    )


def refuse_incompatible(criterion: Criterion) -> PromotionVerdict:
    """The verdict for a candidate of another kind than the champion: no alias at all."""
    return PromotionVerdict(promote=False, alias=NO_ALIAS, criteria=[criterion])


def decide_promotion(
    candidate: CandidateFigures, champion: ChampionFigures | None, policy: PromotionConfig
) -> PromotionVerdict:
    """Whether ``candidate`` takes the champion alias, with every criterion's numbers.

    Criteria: every gate passed; the metric reaches ``policy.min_metric``; it beats the
    probe (``policy.beat_probe``); and, with a champion, it beats the champion's metric by
    more than ``min_improvement`` (superiority) or trails it by at most
    ``non_inferiority_margin`` (non-inferiority), and no group's accuracy trails the
    champion's by more than ``group_margin``. With no champion only the absolute criteria
    apply. Criteria that do not apply are listed as passed with the reason they were skipped.

    Returns:
        ``promote`` when every criterion passed (alias "champion"); otherwise alias
        "challenger" if the gates passed, "none" if a gate failed.
    """
    name, metric = candidate.metric_name, candidate.metric
    criteria = [
        _gates(candidate.gates),
        Criterion(
            "floor",
            metric >= policy.min_metric - TOLERANCE,
            f"test {name} {metric:.4f} vs floor {policy.min_metric:.4f}: "
            + ("reached" if metric >= policy.min_metric - TOLERANCE else "below"),
        ),
        _probe(name, metric, candidate.probe_metric, policy.beat_probe),
    ]
    if champion is None:
        criteria += [
            Criterion("champion", True, "skipped: no champion yet"),
            Criterion("groups", True, "skipped: no champion yet"),
        ]
    else:
        criteria += [
            _versus_champion(name, metric, champion, policy),
            _groups(candidate.group_accuracy, champion, policy.group_margin),
        ]
    promote = all(c.passed for c in criteria)
    gates_ok = criteria[0].passed
    alias = CHAMPION if promote else CHALLENGER if gates_ok else NO_ALIAS
    return PromotionVerdict(promote=promote, alias=alias, criteria=criteria)


def _gates(gates: list[GateOutcome]) -> Criterion:
    if not gates:
        return Criterion("gates", True, "no gates reported")
    detail = ", ".join(g.line() for g in gates)
    return Criterion("gates", all(g.passed for g in gates), detail)


def _probe(name: str, metric: float, probe: float | None, beat_probe: bool) -> Criterion:
    if not beat_probe:
        return Criterion("probe", True, "skipped: promotion.beat_probe is false")
    if probe is None:
        return Criterion("probe", True, "skipped: no probe metric reported")
    passed = metric > probe + TOLERANCE
    verdict = "better" if passed else "not better"
    return Criterion("probe", passed, f"test {name} {metric:.4f} vs probe {probe:.4f}: {verdict}")


def _versus_champion(
    name: str, metric: float, champion: ChampionFigures, policy: PromotionConfig
) -> Criterion:
    base = f"test {name} {metric:.4f} vs champion v{champion.version} {champion.metric:.4f}"
    if policy.mode == "superiority":
        passed = metric > champion.metric + policy.min_improvement + TOLERANCE
        verdict = "better" if passed else "not better"
        return Criterion("champion", passed, f"{base} + {policy.min_improvement:.4f}: {verdict}")
    passed = metric >= champion.metric - policy.non_inferiority_margin - TOLERANCE
    verdict = "non-inferior" if passed else "inferior"
    margin = policy.non_inferiority_margin
    return Criterion("champion", passed, f"{base} - {margin:.4f}: {verdict}")


def _groups(candidate: dict[str, float], champion: ChampionFigures, margin: float) -> Criterion:
    common = sorted(set(candidate) & set(champion.group_accuracy))
    if not common:
        return Criterion("groups", True, "no group large enough to compare")

    def shown(group: str) -> str:
        return f"{group} {candidate[group]:.4f} vs {champion.group_accuracy[group]:.4f}"

    worse = [g for g in common if candidate[g] < champion.group_accuracy[g] - margin - TOLERANCE]
    if worse:
        listed = ", ".join(shown(g) for g in worse)
        return Criterion(
            "groups",
            False,
            f"{len(worse)} of {len(common)} groups trail the champion by more than "
            f"{margin:.4f}: {listed}",
        )
    worst = min(common, key=lambda g: candidate[g] - champion.group_accuracy[g])
    return Criterion(
        "groups",
        True,
        f"all {len(common)} groups within {margin:.4f} of the champion (closest: {shown(worst)})",
    )
