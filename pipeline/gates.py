"""Typed gate outcomes: what the validation, forgetting and bias gates decided.

Each gate's report turns itself into a :class:`GateOutcome`; the promotion policy reads the
status, never the wording. On the MLflow run and version a gate leaves two tags: its
status (``retune.gate.<name>``) and its human summary (``retune.forgetting_gate``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from pipeline import tags as tag

VALIDATION, FORGETTING, BIAS = "validation", "forgetting", "bias"
SUMMARY_TAGS = {VALIDATION: tag.VALIDATION, FORGETTING: tag.FORGETTING_GATE, BIAS: tag.BIAS_GATE}


class GateStatus(StrEnum):
    PASSED = "passed"
    WARNED = "warned"  # a warn-level check failed: reported, never blocks
    OFF = "off"  # the gate is switched off in the config
    REFUSED = "refused"  # an error-level check failed: the model gets no alias
    NOT_RECORDED = "not recorded"  # a version registered without this gate's status


@dataclass(frozen=True)
class GateOutcome:
    gate: str  # validation | forgetting | bias
    status: GateStatus
    summary: str  # one line for people, e.g. "refused: mean drop 0.061 > 0.05"

    @property
    def passed(self) -> bool:
        """Passed, warned or off. An unrecorded status does not pass: promote with --force."""
        return self.status in (GateStatus.PASSED, GateStatus.WARNED, GateStatus.OFF)

    def line(self) -> str:
        return f"{self.gate} {self.summary}"

    def to_tags(self) -> dict[str, str]:
        return {
            tag.gate_status(self.gate): self.status.value,
            SUMMARY_TAGS[self.gate]: self.summary[: tag.SUMMARY_CHARS],
        }

    @classmethod
    def from_tags(cls, gate: str, tags: Mapping[str, str]) -> GateOutcome:
        """The outcome a run or version recorded; NOT_RECORDED where its status is missing."""
        summary = tags.get(SUMMARY_TAGS[gate])
        status = tags.get(tag.gate_status(gate))
        if status not in GateStatus._value2member_map_:
            said = f" (its summary: {summary})" if summary else ""
            return cls(gate, GateStatus.NOT_RECORDED, f"status not recorded{said}")
        return cls(gate, GateStatus(status), summary or status)


def outcomes_from_tags(tags: Mapping[str, str]) -> list[GateOutcome]:
    """All three gates' recorded outcomes, in the order the flow runs them."""
    return [GateOutcome.from_tags(g, tags) for g in (VALIDATION, FORGETTING, BIAS)]
