"""Data validation with a Great Expectations 1.x suite. The only module that imports GX."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from pipeline.config import ValidationConfig
from pipeline.data import COLUMNS, SPLITS


@dataclass(frozen=True)
class ExpectationOutcome:
    split: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    element_count: int
    detail: str = ""


@dataclass(frozen=True)
class ValidationReport:
    """Every expectation on every split; ``success`` only if all of them passed."""

    outcomes: list[ExpectationOutcome] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def summary(self) -> str:
        """One line per failed expectation, readable without GX."""
        if self.success:
            return f"all {len(self.outcomes)} expectations passed"
        lines = [f"{len(self.failures)} of {len(self.outcomes)} expectations failed:"]
        for o in self.failures:
            col = f" on column '{o.column}'" if o.column else ""
            lines.append(
                f"  - {o.split}: {o.expectation}{col} failed on {o.unexpected_count} of "
                f"{o.element_count} rows{': ' + o.detail if o.detail else ''}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "outcomes": [asdict(o) for o in self.outcomes]}


class DataValidationError(RuntimeError):
    """The data failed validation; carries the report."""

    def __init__(self, report: ValidationReport, source: str):
        self.report = report
        super().__init__(f"data from {source} failed validation: {report.summary()}")


def _expectations(
    split: str, config: ValidationConfig, labels: list[str], train_texts: list[str]
) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    suite = [
        E.ExpectTableColumnsToMatchSet(column_set=COLUMNS, exact_match=False),
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToNotBeNull(column="text"),
        E.ExpectColumnValuesToNotMatchRegex(column="text", regex=r"^\s*$"),
        E.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=config.min_text_chars, max_value=config.max_text_chars
        ),
        E.ExpectColumnValuesToNotBeNull(column="label"),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=labels),
        E.ExpectColumnDistinctValuesToContainSet(column="label", value_set=labels),
    ]
    if split == "test":
        suite.append(E.ExpectColumnValuesToNotBeInSet(column="text", value_set=train_texts))
    return suite


def _raised_message(info: Any) -> str:
    """GX 1.x keys exception info by metric id; older shapes hold it at the top level."""
    if not isinstance(info, dict):
        return ""
    candidates = [info, *[v for v in info.values() if isinstance(v, dict)]]
    for entry in candidates:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message", ""))
    return ""


def _outcome(split: str, result: Any) -> ExpectationOutcome:
    cfg = result.expectation_config
    res = result.result or {}
    column = cfg.kwargs.get("column")
    detail = ""
    if not result.success:
        raised = _raised_message(result.exception_info)
        if raised:
            detail = raised[:200]
        elif res.get("partial_missing_list"):
            detail = f"missing {res['partial_missing_list']}"
        elif "partial_unexpected_list" in res and res["partial_unexpected_list"]:
            sample = [str(v)[:40] for v in res["partial_unexpected_list"][:3]]
            detail = f"e.g. {sample}"
        elif "observed_value" in res:
            detail = f"observed {str(res['observed_value'])[:200]}"
            if cfg.type == "expect_column_distinct_values_to_contain_set":
                detail += f", expected all of {cfg.kwargs.get('value_set')}"
    unexpected = res.get("unexpected_count")
    element_count = int(res.get("element_count") or 0)
    if unexpected is None:
        unexpected = 0 if result.success else element_count
    return ExpectationOutcome(
        split=split,
        expectation=cfg.type,
        column=column,
        success=bool(result.success),
        unexpected_count=int(unexpected),
        element_count=element_count,
        detail=detail,
    )


def validate_dataset(
    frames: dict[str, pd.DataFrame], config: ValidationConfig, labels: list[str]
) -> ValidationReport:
    """Run the suite on each split in an ephemeral GX context (no files, no network).

    Returns:
        The report; the caller decides whether a failure stops the flow.
    """
    import great_expectations as gx

    # GX logs a line per expectation at INFO; the report says what matters.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("retune")
    train_texts = sorted({t for t in frames["train"]["text"] if isinstance(t, str)})
    outcomes: list[ExpectationOutcome] = []
    for split in SPLITS:
        asset = source.add_dataframe_asset(name=split)
        batch = asset.add_batch_definition_whole_dataframe(f"{split}-all").get_batch(
            batch_parameters={"dataframe": frames[split]}
        )
        suite = gx.ExpectationSuite(
            name=f"retune-{split}", expectations=_expectations(split, config, labels, train_texts)
        )
        result = batch.validate(suite, result_format="SUMMARY")
        outcomes.extend(_outcome(split, r) for r in result.results)
    return ValidationReport(outcomes=outcomes)
