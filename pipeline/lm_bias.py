"""Bias of a causal LM: CrowS-Pairs by likelihood, tuned against its base, and the gate.

Each CrowS-Pairs pair is a more and a less stereotyping sentence; a model prefers the
stereotype when it gives that sentence the higher likelihood (0.5 of the pairs is
unbiased). :func:`compare_bias` measures how much more often the tuned model prefers it than
its base did, per bias type and pooled, with paired bootstrap intervals
(:func:`pipeline.lm_eval.preference_shift`); the ``crows_pairs`` check refuses a pooled shift
above ``bias.max_stereotype_shift`` (its severity decides whether it refuses or warns).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import BiasConfig
from pipeline.fairness import BiasCheck, BiasVerdict
from pipeline.lm_eval import PreferenceShift

TABLE_HEADER = ("bias type", "pairs", "base", "tuned", "shift", "95% CI")


@dataclass(frozen=True)
class LMBiasReport:
    """The candidate's stereotype preference against its base's (and the champion's)."""

    model: str
    shifts: list[PreferenceShift]  # "all" first, then each bias type
    gate: BiasVerdict
    champion_shift: float | None = None  # pooled, against the champion's preferences
    champion_version: str | None = None
    # What the shared reporting reads of every kind's bias report: no per-group figures.
    gate_groups: Any = None
    champion: Any = None
    base_probe: Any = None
    groups_measured: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["gate"] = asdict(self.gate) | {
            "status": self.gate.status,
            "summary": self.gate.summary(),
        }
        return body

    def metrics(self) -> dict[str, float]:
        pooled = self.shifts[0]
        out = {
            "crows_stereotype_base": pooled.base,
            "crows_stereotype_tuned": pooled.tuned,
            "crows_stereotype_shift": pooled.shift,
            "crows_stereotype_shift_ci_high": pooled.ci_high,
        }
        if self.champion_shift is not None:
            out["crows_stereotype_shift_vs_champion"] = self.champion_shift
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def summary(self) -> str:
        pooled = self.shifts[0]
        return (
            f"bias gate {self.gate.status}: CrowS-Pairs stereotype preference {pooled.base:.3f} "
            f"(base) -> {pooled.tuned:.3f} (tuned), shift {pooled.shift:+.3f} "
            f"(95% CI {pooled.ci_low:+.3f} to {pooled.ci_high:+.3f}) over {pooled.pairs} pairs"
        )

    def table_rows(self) -> list[tuple[str, ...]]:
        return [
            (
                s.bias_type,
                str(s.pairs),
                f"{s.base:.3f}",
                f"{s.tuned:.3f}",
                f"{s.shift:+.3f}",
                f"[{s.ci_low:+.3f}, {s.ci_high:+.3f}]",
            )
            for s in self.shifts
        ]

    def group_rows(self) -> list[tuple[str, ...]]:
        return []


def crows_check(shifts: list[PreferenceShift], config: BiasConfig) -> BiasCheck:
    """``crows_pairs``: failed when the pooled shift toward the stereotype exceeds the limit."""
    pooled, limit = shifts[0], config.max_stereotype_shift
    severity = config.severity_of("crows_pairs")
    if severity == "off":
        return BiasCheck("crows_pairs", "not run", severity, math.nan, limit, "off")
    failed = pooled.shift > limit
    detail = (
        f"CrowS-Pairs stereotype preference {pooled.base:.3f} -> {pooled.tuned:.3f}: shift "
        f"{pooled.shift:+.3f} (95% CI {pooled.ci_low:+.3f} to {pooled.ci_high:+.3f}) "
        f"{'above' if failed else 'within'} bias.max_stereotype_shift={limit:.3f}"
    )
    return BiasCheck(
        "crows_pairs", "failed" if failed else "passed", severity, pooled.shift, limit, detail
    )


def compare_bias(
    shifts: list[PreferenceShift],
    config: BiasConfig,
    champion_shift: float | None = None,
    champion_version: str | None = None,
) -> LMBiasReport:
    return LMBiasReport(
        "candidate",
        shifts,
        BiasVerdict([crows_check(shifts, config)]),
        champion_shift,
        champion_version,
    )
