"""Data validation with one Great Expectations 1.x suite. The only module that imports GX.

Every check named in ``DEFAULT_SEVERITY`` runs as one or more GX expectations; its
severity (``ValidationConfig.severity_of``) decides what a failure does: ``error`` makes
the report unsuccessful (the flow stops), ``warn`` is reported only, ``off`` removes the
check from the suite. Where a check runs (the ``split`` of each outcome):

- each split (train, validation, test): schema, null_text, empty_text, text_length,
  truncated (only when the caller passes token counts), label_set, labels_in_every_split;
  validation and test also leakage and leakage_normalized (their texts against train's);
- ``all`` splits concatenated (train, validation, test order): duplicates,
  conflicting_labels, mojibake, confidence_range and confidence_missing (the last two only
  if a ``confidence`` column exists);
- two small summary tables, each its own GX asset: ``label_counts`` (one row per split and
  configured label -> min_rows_per_label) and ``label_balance`` (one row per split,
  majority/minority rows of the configured labels -> class_imbalance; a label with no rows
  makes the ratio infinite).

GX cannot compare rows with other rows or with another split, so those checks read a
derived column computed in pandas first. It holds the offending text where the row breaks
the rule and null elsewhere, and its expectation is ``expect_column_values_to_be_null``,
so GX counts the offending rows and lists their texts:

- ``_repeated_text``: the row's exact text occurs in an earlier row (duplicates);
- ``_conflicting_text``: the text occurs with two or more labels (conflicting_labels);
- ``_leaked_text``: the exact text is also in train (leakage);
- ``_leaked_norm_text``: the normalised text (:func:`normalise_text`) is also among train's
  normalised texts (leakage_normalized; it includes the exact leaks);
- ``_truncated_text``: the text has more tokens than ``train.max_length`` (truncated).

``truncated`` measures length as the model sees it: its expectation passes up to
``validation.max_truncated_share`` of a split (``mostly``) and fails at the check's severity
above it; below it, truncated texts are still reported, as a warning with their share.

Every failed outcome names the config keys that decide it, their values and the
``--set`` commands that change them (:data:`CHECK_KEYS`).

Rate checks (duplicates, mojibake, confidence_missing) use GX's ``mostly = 1 - max rate``,
so they pass up to that share and still report the count.

Mojibake: a text is damaged if it matches :data:`MOJIBAKE_REGEX`, i.e. it contains any of

- ``\\ufffd``, the replacement character;
- ``[\\u0080-\\u009f]``, a C1 control character;
- ``[\\u00a0-\\u024f]{2}``, two adjacent Latin-1-supplement/Latin-Extended characters;
- ``â€`` or ``[ÃÂ][\\u0080-\\u00bf]``, UTF-8 read as cp1252/Latin-1;
- ``_[\\u00a0-\\u024f]`` or ``[\\u00a0-\\u024f]_``, such a character glued to an underscore
  (how the broken emoji of the CrowdFlower tweets look).

Curly quotes and single accented letters ("crème brûlée") are not flagged; two accented
letters in a row are ("ação"), which is why a few Portuguese Rotten Tomatoes snippets
count (9 of 12,805 rows, below the default 1% rate).

Images (:func:`validate_images`, task image-classification) read the columns of
:func:`pipeline.images.describe_images`. Each split: schema (path, label, group), label_set,
labels_in_every_split, image_decodes, image_mode, image_size and image_aspect; validation and
test also image_leakage (a training file's bytes, by SHA-256) and image_leakage_near; ``all``:
image_duplicates and image_near_duplicates (rates, as duplicates). Their derived columns hold
``"path: what"`` (``"train/a.png: 1x1"``) or ``"path = train path"`` / ``"path ~ path (n
bits)"``, so failures name the files. Near-duplicates are images of other bytes whose 64-bit
pHashes differ in at most ``validation.near_duplicate_distance`` bits, compared in numpy blocks
(10,000 images, 50M pairs: 0.2 s); a file that does not decode has no pHash and is left out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import DEFAULT_SEVERITY, Severity, ValidationConfig
from pipeline.data import COLUMNS, SPLITS
from pipeline.gates import VALIDATION, GateOutcome, GateStatus

# Not a raw string: Python turns the escapes into the characters themselves, which pandas
# hands to pyarrow's RE2 (15x faster than falling back to `re` for `\u` escapes); both
# engines read the pattern alike.
MOJIBAKE_REGEX = (
    "\ufffd|[\u0080-\u009f]|[\u00a0-\u024f]{2}|â€|[ÃÂ][\u0080-\u00bf]"
    "|_[\u00a0-\u024f]|[\u00a0-\u024f]_"
)
BLANK_REGEX = r"^\s*$"
CONFIDENCE = "confidence"
ALL = "all"
DOCS_SITE = "retune"  # `local_site` already exists in an ephemeral context
# Names GX's type check resolves to numpy/pandas dtypes (int64, float64, nullable ones).
NUMERIC_TYPES = ["int", "float", "int32", "float32", "Int64Dtype", "Float64Dtype"]
TABLE_HEADER = ("check", "severity", "status", "flagged")

# The config keys that set each check's limits (the severity key
# validation.severity.CHECK applies to all). Checks with none fail on the rows themselves.
CHECK_KEYS: dict[str, tuple[str, ...]] = {
    "schema": (),
    "null_text": (),
    "empty_text": (),
    "text_length": ("validation.min_text_chars", "validation.max_text_chars"),
    "truncated": ("train.max_length", "validation.max_truncated_share"),
    "label_set": ("data.labels",),
    "labels_in_every_split": ("data.labels",),
    "min_rows_per_label": ("validation.min_rows_per_label",),
    "duplicates": ("validation.max_duplicate_rate",),
    "conflicting_labels": (),
    "leakage": (),
    "leakage_normalized": (),
    "mojibake": ("validation.max_mojibake_rate",),
    "class_imbalance": ("validation.max_imbalance_ratio",),
    "confidence_range": ("validation.confidence_min", "validation.confidence_max"),
    "confidence_missing": ("validation.max_confidence_missing_rate",),
    "copies": (),
    "length_ratio": ("generation.max_length_ratio",),
    "placeholders": (),
    "image_decodes": (),
    "image_mode": (),
    "image_size": ("validation.min_image_side",),
    "image_aspect": ("validation.max_aspect_ratio",),
    "image_duplicates": ("validation.max_duplicate_rate",),
    "image_near_duplicates": (
        "validation.near_duplicate_distance",
        "validation.max_duplicate_rate",
    ),
    "image_leakage": (),
    "image_leakage_near": ("validation.near_duplicate_distance",),
}
# Checks of translation pairs only (task: translation); a classifier's table never runs them.
PAIR_CHECKS = ("copies", "length_ratio", "placeholders")
# Checks of images only (task: image-classification, :func:`validate_images`).
IMAGE_CHECKS = tuple(check for check in CHECK_KEYS if check.startswith("image_"))
# The checks an image dataset's report lists (the text and pair checks do not apply).
IMAGE_SUITE = (
    "schema",
    "label_set",
    "labels_in_every_split",
    "min_rows_per_label",
    "class_imbalance",
    *IMAGE_CHECKS,
)
# What to do where no limit would make sense (or there is none to change).
ROW_FIXES = {
    "min_rows_per_label": "add rows for these labels (or groups, which decide the split)",
    "labels_in_every_split": "add rows with the missing labels",
    "copies": "translate these rows (the target repeats the source)",
    "placeholders": "keep every placeholder of the source in its translation",
    "image_decodes": "remove or replace these files (they do not decode as images)",
    "image_mode": "none needed: these are converted to RGB when loaded (16-bit and float "
    "greys scaled to 8 bits by their range, alpha composited onto white); save them as RGB or "
    "L to skip it",
    "image_size": "replace these images with larger ones",
    "image_leakage": "remove these copies of training images from validation/test (or give "
    "them their training image's group)",
    "image_leakage_near": "remove these edited copies of training images from validation/test "
    "(or give them their training image's group)",
}
# Checks that pass up to a share and still warn about what they counted below it.
WARN_BELOW_LIMIT = ("truncated",)


@dataclass(frozen=True)
class ExpectationOutcome:
    """One GX expectation on one split (or ``all``), judged by its check's severity."""

    split: str
    check: str
    expectation: str
    column: str | None
    success: bool
    severity: Severity
    unexpected_count: int | None  # None for table-level expectations (no row count)
    element_count: int
    detail: str = ""
    unit: str = "rows"  # what element_count counts: rows, split/label pairs or splits
    limit: str = ""  # the deciding config keys and values, e.g. "validation.min_rows_per_label=5"
    fix: str = ""  # the commands that change the outcome, e.g. "--set validation.x=3, or ..."

    def line(self) -> str:
        """``test: leakage (expect_... on '_leaked_text') failed on 3 of 1818 rows [error]:
        e.g. [...]; limit ... (change: ...)``; limit and change only where they are set."""
        on = f" on '{self.column}'" if self.column else ""
        head = f"{self.split}: {self.check} ({self.expectation}{on})"
        status = "passed" if self.success else "failed"
        if self.unexpected_count is not None:
            status += f" on {self.unexpected_count} of {self.element_count} {self.unit}"
        text = f"{head} {status} [{self.severity}]" + (f": {self.detail}" if self.detail else "")
        if self.limit:
            text += f"; limit {self.limit}"
        if self.fix:
            text += f" (change: {self.fix})"
        return text


@dataclass(frozen=True)
class ValidationReport:
    """Every expectation of the suite; ``success`` unless a check with severity error failed.

    Attributes:
        severities: the severity of every check, ``off`` ones included (for the table).
        docs_index: the Data Docs ``index.html``, if they were built.
    """

    outcomes: list[ExpectationOutcome] = field(default_factory=list)
    severities: dict[str, Severity] = field(default_factory=dict)
    docs_index: Path | None = None

    @property
    def success(self) -> bool:
        return not self.errors

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    @property
    def errors(self) -> list[ExpectationOutcome]:
        return [o for o in self.failures if o.severity == "error"]

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        return [o for o in self.failures if o.severity == "warn"]

    def outcome(self) -> GateOutcome:
        """The validation gate: refused on an error, warned on warnings only."""
        errors, warnings = len(self.errors), len(self.warnings)
        if errors:
            return GateOutcome(VALIDATION, GateStatus.REFUSED, f"refused: {errors} errors")
        if warnings:
            return GateOutcome(VALIDATION, GateStatus.WARNED, f"passed with {warnings} warnings")
        return GateOutcome(VALIDATION, GateStatus.PASSED, "passed")

    def summary(self) -> str:
        """A header and one line per failed expectation, readable without GX."""
        if not self.failures:
            return f"all {len(self.outcomes)} expectations passed"
        errors, warnings = len(self.errors), len(self.warnings)
        lines = [
            f"{len(self.failures)} of {len(self.outcomes)} expectations failed "
            f"({errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}):"
        ]
        lines += [f"  - {o.line()}" for o in self.failures]
        return "\n".join(lines)

    def check_status(self) -> dict[str, dict[str, Any]]:
        """Per check: severity, status (passed/warned/failed/off/not run) and row counts.

        ``unexpected`` adds up the rows the check's expectations flagged (also where a
        rate check passed under its threshold), ``failing`` only those of failed ones, and
        ``elements`` the rows checked, each split once (label_set has two expectations).
        "not run" is a check with no expectation here (confidence without the column).
        """
        checks = list(self.severities) or list(dict.fromkeys(o.check for o in self.outcomes))
        status: dict[str, dict[str, Any]] = {}
        for check in checks:
            mine = [o for o in self.outcomes if o.check == check]
            counted = [o for o in mine if o.unexpected_count is not None]
            elements: dict[str, int] = {}
            for o in counted:
                elements[o.split] = max(elements.get(o.split, 0), o.element_count)
            severity = self.severities.get(check) or (mine[0].severity if mine else "off")
            if severity == "off":
                state = "off"
            elif not mine:
                state = "not run"
            elif all(o.success for o in mine):
                state = "passed"
            else:
                # "warned": only warnings below the check's limit (truncated under its share).
                failed_levels = {o.severity for o in mine if not o.success}
                state = "warned" if failed_levels == {"warn"} != {severity} else "failed"
            status[check] = {
                "severity": severity,
                "status": state,
                "unexpected": sum(o.unexpected_count or 0 for o in counted),
                "failing": sum(o.unexpected_count or 0 for o in counted if not o.success),
                "elements": sum(elements.values()),
            }
        return status

    def table_rows(self) -> list[tuple[str, str, str, str]]:
        """One row per check under :data:`TABLE_HEADER`, e.g. ``("duplicates", "warn",
        "passed", "53 of 12,805")``: flagged rows (or pairs/splits) of those checked, also
        where a rate check passed under its threshold; "-" for table-level checks."""
        rows = []
        for check, s in self.check_status().items():
            flagged = f"{s['unexpected']:,} of {s['elements']:,}" if s["elements"] else "-"
            if s["status"] in ("off", "not run"):
                flagged = ""
            rows.append((check, s["severity"], s["status"], flagged))
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON: verdict, per-check status and the failed expectations in full."""
        return {
            "success": self.success,
            "expectations": len(self.outcomes),
            "failed": len(self.failures),
            "checks": self.check_status(),
            "errors": [asdict(o) for o in self.errors],
            "warnings": [asdict(o) for o in self.warnings],
            "docs_index": str(self.docs_index) if self.docs_index else None,
        }


class DataValidationError(RuntimeError):
    """The data failed validation; carries the report."""

    def __init__(self, report: ValidationReport, source: str):
        self.report = report
        docs = f"\nGX Data Docs: {report.docs_index}" if report.docs_index else ""
        super().__init__(f"data from {source} failed validation: {report.summary()}{docs}")


@dataclass(frozen=True)
class TokenCounts:
    """Tokens per text as the base model's tokenizer counts them, and the model's limit.

    Attributes:
        counts: split -> one count per row of that split's frame, in row order.
        max_length: ``train.max_length``: the model sees at most this many tokens.
    """

    counts: dict[str, list[int]]
    max_length: int


def normalise_text(text: str) -> str:
    """Lower-case, runs of whitespace folded to one space, stripped: ``" A \\n b"`` -> ``"a b"``."""
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class _Asset:
    """One GX dataframe asset: the frame, its expectations and how outcomes name it."""

    name: str
    split: str
    frame: pd.DataFrame
    expectations: list[Any]
    unit: str = "rows"
    value_chars: int = 40  # how much of each flagged value a detail shows


class _Checks:
    """Builds expectations tagged with their check and severity; ``off`` checks are dropped."""

    def __init__(self, config: ValidationConfig):
        self.config = config

    def active(self, check: str) -> bool:
        return self.config.severity_of(check) != "off"

    def __call__(self, check: str, expectation_cls: Any, **kwargs: Any) -> list[Any]:
        from great_expectations.expectations.metadata_types import FailureSeverity

        severity = self.config.severity_of(check)
        if severity == "off":
            return []
        gx_severity = FailureSeverity.CRITICAL if severity == "error" else FailureSeverity.WARNING
        return [
            expectation_cls(
                **kwargs,
                meta={"retune_check": check, "retune_severity": severity},
                notes=f"retune check `{check}`, severity {severity}",
                severity=gx_severity,
            )
        ]


def _isin(values: pd.Series, pool: pd.Series | Any) -> pd.Series:
    """``values.isin(pool)`` via object dtype: pandas' isin on arrow strings boxes every
    pool value into a pyarrow scalar (3.7 s for 800k values; this takes 0.25 s)."""
    return values.astype(object).isin(pd.Series(pool, dtype=object))


def _normalised(texts: pd.Series) -> pd.Series:
    values = [normalise_text(t) if isinstance(t, str) else None for t in texts]
    return pd.Series(values, index=texts.index, dtype=texts.dtype)


def _split_asset(
    split: str,
    frame: pd.DataFrame,
    checks: _Checks,
    labels: list[str],
    train_texts: pd.Series,
    train_norm: pd.Series,
    tokens: TokenCounts | None = None,
) -> _Asset:
    import great_expectations as gx

    E = gx.expectations
    config = checks.config
    present = set(frame.columns)
    derived: dict[str, pd.Series] = {}
    exps = checks("schema", E.ExpectTableColumnsToMatchSet, column_set=COLUMNS, exact_match=False)
    # A missing column fails `schema`; checks on it are left out rather than erroring.
    for column in COLUMNS:
        if column in present:
            exps += checks("schema", E.ExpectColumnValuesToBeOfType, column=column, type_="str")
    if CONFIDENCE in present:
        exps += checks(
            "schema", E.ExpectColumnValuesToBeInTypeList, column=CONFIDENCE, type_list=NUMERIC_TYPES
        )
    if "text" in present:
        text = frame["text"]
        exps += checks("null_text", E.ExpectColumnValuesToNotBeNull, column="text")
        exps += checks(
            "empty_text", E.ExpectColumnValuesToNotMatchRegex, column="text", regex=BLANK_REGEX
        )
        exps += checks(
            "text_length",
            E.ExpectColumnValueLengthsToBeBetween,
            column="text",
            min_value=config.min_text_chars,
            max_value=config.max_text_chars,
        )
        more, found = _cut_and_leaked(
            split, text, checks, train_texts, train_norm, tokens, ("text", "text")
        )
        exps, derived = exps + more, derived | found
    if "label" in present:
        exps += checks("label_set", E.ExpectColumnValuesToNotBeNull, column="label")
        exps += checks("label_set", E.ExpectColumnValuesToBeInSet, column="label", value_set=labels)
        exps += checks(
            "labels_in_every_split",
            E.ExpectColumnDistinctValuesToContainSet,
            column="label",
            value_set=labels,
        )
    return _Asset(split, split, frame.assign(**derived) if derived else frame, exps)


def _cut_and_leaked(
    split: str,
    text: pd.Series,
    checks: _Checks,
    train_texts: pd.Series,
    train_norm: pd.Series,
    tokens: TokenCounts | None,
    names: tuple[str, str],
) -> tuple[list[Any], dict[str, pd.Series]]:
    """``truncated`` (rows over ``train.max_length`` tokens), ``leakage`` and
    ``leakage_normalized`` (an evaluation row's ``text`` also in train) on one split.

    ``names``: what the derived columns are called after, e.g. ("conversation", "prompt")
    gives ``_truncated_conversation`` and ``_leaked_prompt``.
    """
    import great_expectations as gx

    E = gx.expectations
    cut, leaked = names
    exps: list[Any] = []
    derived: dict[str, pd.Series] = {}
    if tokens is not None and checks.active("truncated"):
        over = pd.Series(tokens.counts[split], index=text.index) > tokens.max_length
        derived[f"_truncated_{cut}"] = text.where(over)
        exps += checks(
            "truncated",
            E.ExpectColumnValuesToBeNull,
            column=f"_truncated_{cut}",
            mostly=1 - checks.config.max_truncated_share,
        )
    if split != "train" and checks.active("leakage"):
        derived[f"_leaked_{leaked}"] = text.where(_isin(text, train_texts))
        exps += checks("leakage", E.ExpectColumnValuesToBeNull, column=f"_leaked_{leaked}")
    if split != "train" and checks.active("leakage_normalized"):
        norm = _normalised(text)
        derived[f"_leaked_norm_{leaked}"] = norm.where(_isin(norm, train_norm))
        exps += checks(
            "leakage_normalized", E.ExpectColumnValuesToBeNull, column=f"_leaked_norm_{leaked}"
        )
    return exps, derived


def _all_asset(frames: dict[str, pd.DataFrame], checks: _Checks) -> _Asset:
    import great_expectations as gx

    E = gx.expectations
    config = checks.config
    wanted = ("text", "label", CONFIDENCE)
    # (rows over all splits, up to 3 columns); a split lacking a column gives nulls there.
    rows = pd.concat(
        [frames[s][[c for c in wanted if c in frames[s]]] for s in SPLITS], ignore_index=True
    )
    exps: list[Any] = []
    derived: dict[str, pd.Series] = {}
    if "text" in rows:
        text = rows["text"]
        if checks.active("duplicates"):
            derived["_repeated_text"] = text.where(text.duplicated() & text.notna())
            exps += checks(
                "duplicates",
                E.ExpectColumnValuesToBeNull,
                column="_repeated_text",
                mostly=1 - config.max_duplicate_rate,
            )
        if "label" in rows and checks.active("conflicting_labels"):
            pairs = rows[["text", "label"]].dropna().drop_duplicates()
            conflicted = pairs.loc[pairs["text"].duplicated(), "text"].unique()
            derived["_conflicting_text"] = text.where(_isin(text, conflicted))
            exps += checks(
                "conflicting_labels", E.ExpectColumnValuesToBeNull, column="_conflicting_text"
            )
        exps += checks(
            "mojibake",
            E.ExpectColumnValuesToNotMatchRegex,
            column="text",
            regex=MOJIBAKE_REGEX,
            mostly=1 - config.max_mojibake_rate,
        )
    if CONFIDENCE in rows:
        exps += checks(
            "confidence_range",
            E.ExpectColumnValuesToBeBetween,
            column=CONFIDENCE,
            min_value=config.confidence_min,
            max_value=config.confidence_max,
        )
        exps += checks(
            "confidence_missing",
            E.ExpectColumnValuesToNotBeNull,
            column=CONFIDENCE,
            mostly=1 - config.max_confidence_missing_rate,
        )
    return _Asset(ALL, ALL, rows.assign(**derived) if derived else rows, exps)


CONVERSATION_COLUMNS = ["messages", "prompt", "response", "group"]


def _conversation_asset(
    split: str,
    frame: pd.DataFrame,
    checks: _Checks,
    train_prompts: pd.Series,
    train_norm: pd.Series,
    tokens: TokenCounts | None,
    max_length_ratio: float,
) -> _Asset:
    """One split of a generative task's table: its turns, cut-off conversations, prompts
    leaked from train and, for translation pairs, copies, odd lengths and placeholders."""
    import great_expectations as gx

    E = gx.expectations
    config, present = checks.config, set(frame.columns)
    exps = checks(
        "schema", E.ExpectTableColumnsToMatchSet, column_set=CONVERSATION_COLUMNS, exact_match=False
    )
    derived: dict[str, pd.Series] = {}
    for column in ("prompt", "response"):
        if column not in present:
            continue
        exps += checks("schema", E.ExpectColumnValuesToBeOfType, column=column, type_="str")
        exps += checks("null_text", E.ExpectColumnValuesToNotBeNull, column=column)
        exps += checks(
            "empty_text", E.ExpectColumnValuesToNotMatchRegex, column=column, regex=BLANK_REGEX
        )
    if "response" in present:
        exps += checks(
            "text_length",
            E.ExpectColumnValueLengthsToBeBetween,
            column="response",
            min_value=1,
            max_value=config.max_text_chars,
        )
    if "prompt" in present:
        more, found = _cut_and_leaked(
            split,
            frame["prompt"],
            checks,
            train_prompts,
            train_norm,
            tokens,
            ("conversation", "prompt"),
        )
        exps, derived = exps + more, derived | found
    if {"source", "target"} <= present:
        pair_exps, pair_cols = _pair_expectations(frame, checks, max_length_ratio)
        exps += pair_exps
        derived |= pair_cols
    return _Asset(split, split, frame.assign(**derived) if derived else frame, exps)


def _pair_expectations(
    frame: pd.DataFrame, checks: _Checks, max_ratio: float
) -> tuple[list[Any], dict[str, pd.Series]]:
    import great_expectations as gx

    from pipeline.conversations import placeholders

    E = gx.expectations
    source, target = frame["source"].astype(str), frame["target"].astype(str)
    copied = _normalised(source) == _normalised(target)
    mismatch = [placeholders(a) != placeholders(b) for a, b in zip(source, target, strict=True)]
    derived = {
        "_copied_source": source.where(copied),
        "_length_ratio": target.str.len() / source.str.len().clip(lower=1),
        "_placeholder_mismatch": source.where(pd.Series(mismatch, index=frame.index)),
    }
    exps = checks("copies", E.ExpectColumnValuesToBeNull, column="_copied_source")
    exps += checks(
        "length_ratio",
        E.ExpectColumnValuesToBeBetween,
        column="_length_ratio",
        min_value=1 / max_ratio,
        max_value=max_ratio,
    )
    exps += checks("placeholders", E.ExpectColumnValuesToBeNull, column="_placeholder_mismatch")
    return exps, derived


def _conversation_all_asset(frames: dict[str, pd.DataFrame], checks: _Checks) -> _Asset:
    """Every split together: repeated conversations and encoding damage."""
    import great_expectations as gx

    E = gx.expectations
    rows = pd.concat([frames[s] for s in SPLITS], ignore_index=True)
    if not {"prompt", "response"} <= set(rows.columns):
        return _Asset(ALL, ALL, rows, [])
    text = rows["prompt"].astype(str) + "\n" + rows["response"].astype(str)
    derived = {"_conversation": text}
    exps: list[Any] = []
    if checks.active("duplicates"):
        derived["_repeated_conversation"] = text.where(text.duplicated())
        exps += checks(
            "duplicates",
            E.ExpectColumnValuesToBeNull,
            column="_repeated_conversation",
            mostly=1 - checks.config.max_duplicate_rate,
        )
    exps += checks(
        "mojibake",
        E.ExpectColumnValuesToNotMatchRegex,
        column="_conversation",
        regex=MOJIBAKE_REGEX,
        mostly=1 - checks.config.max_mojibake_rate,
    )
    return _Asset(ALL, ALL, rows.assign(**derived), exps)


def validate_conversations(
    frames: dict[str, pd.DataFrame],
    config: ValidationConfig,
    docs_dir: Path | None = None,
    tokens: TokenCounts | None = None,
    max_length_ratio: float = 4.0,
) -> ValidationReport:
    """The suite for a generative task's splits (``messages``, ``prompt``, ``response``,
    ``group``; ``source`` and ``target`` for translation pairs), as :func:`validate_dataset`.

    Args:
        tokens: tokens per conversation as the chat template renders it; without them the
            ``truncated`` check does not run.
        max_length_ratio: ``generation.max_length_ratio`` for the pairs' ``length_ratio``.
    """
    _quiet_gx()
    checks = _Checks(config)
    train = frames["train"]
    prompts = train["prompt"].dropna() if "prompt" in train else pd.Series(dtype=str)
    norm = _normalised(prompts) if checks.active("leakage_normalized") else prompts
    assets = [
        _conversation_asset(s, frames[s], checks, prompts, norm, tokens, max_length_ratio)
        for s in SPLITS
    ]
    assets.append(_conversation_all_asset(frames, checks))
    values: dict[str, Any] = {f"validation.{k}": v for k, v in config.model_dump().items()} | {
        "train.max_length": tokens.max_length if tokens else None,
        "generation.max_length_ratio": max_length_ratio,
    }
    return _run_suite(assets, config, docs_dir, values, None)


def _label_counts(frames: dict[str, pd.DataFrame], labels: list[str]) -> pd.DataFrame:
    """Rows per split and configured label, indexed ``split/label`` (zeros included)."""
    records = []
    for split in SPLITS:
        frame = frames[split]
        counts = frame["label"].value_counts() if "label" in frame else pd.Series(dtype=int)
        records += [(split, label, int(counts.get(label, 0))) for label in labels]
    frame = pd.DataFrame(records, columns=["split", "label", "rows"])
    return frame.set_axis([f"{s}/{lab}" for s, lab, _ in records])


def _label_balance(counts: pd.DataFrame) -> pd.DataFrame:
    """Majority/minority rows per split; inf if a label has no rows, null if none has."""
    by_split = counts.groupby("split", sort=False)["rows"]
    balance = pd.DataFrame({"majority_rows": by_split.max(), "minority_rows": by_split.min()})
    ratio = balance["majority_rows"] / balance["minority_rows"].where(balance["majority_rows"] > 0)
    # An unnamed index: GX then lists the split itself among the unexpected rows.
    return balance.assign(imbalance_ratio=ratio.astype(float)).rename_axis(None)


def _summary_assets(
    frames: dict[str, pd.DataFrame], checks: _Checks, labels: list[str]
) -> list[_Asset]:
    import great_expectations as gx

    E = gx.expectations
    counts = _label_counts(frames, labels)
    min_rows = checks(
        "min_rows_per_label",
        E.ExpectColumnValuesToBeBetween,
        column="rows",
        min_value=checks.config.min_rows_per_label,
    )
    imbalance = checks(
        "class_imbalance",
        E.ExpectColumnValuesToBeBetween,
        column="imbalance_ratio",
        max_value=checks.config.max_imbalance_ratio,
    )
    return [
        _Asset("label_counts", ALL, counts, min_rows, unit="split/label pairs"),
        _Asset("label_balance", ALL, _label_balance(counts), imbalance, unit="splits"),
    ]


def _raised_message(info: Any) -> str:
    """GX 1.x keys exception info by metric id; older shapes hold it at the top level."""
    if not isinstance(info, dict):
        return ""
    candidates = [info, *[v for v in info.values() if isinstance(v, dict)]]
    for entry in candidates:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message", ""))
    return ""


def _short(value: Any, chars: int = 40) -> str:
    """A value for a one-line detail: strings quoted and cut at ``chars`` characters."""
    if not isinstance(value, str):
        return repr(value)
    return repr(value if len(value) <= chars else value[: chars - 3] + "...")


def _detail(asset: _Asset, result: Any) -> str:
    res = result.result or {}
    raised = _raised_message(result.exception_info)
    if raised:
        return raised[:200]
    mismatched = (res.get("details") or {}).get("mismatched") or {}
    if mismatched.get("missing"):
        return f"missing columns {sorted(mismatched['missing'])}"
    if res.get("partial_missing_list"):
        return f"missing {res['partial_missing_list']}"
    unexpected = res.get("partial_unexpected_list") or []
    if unexpected and asset.unit != "rows":
        # Summary tables: name the split (and label) from the row index.
        where = res.get("partial_unexpected_index_list") or []
        unit = " rows" if asset.name == "label_counts" else ""
        return ", ".join(f"{w}: {v}{unit}" for w, v in zip(where, unexpected, strict=False))
    # Nulls are left out: a not-null check would otherwise show "e.g. [nan, nan, nan]".
    shown = [v for v in unexpected if v is not None and v == v]
    if shown:
        return f"e.g. [{', '.join(_short(v, asset.value_chars) for v in shown[:3])}]"
    if "observed_value" in res and not result.success:
        return f"observed {str(res['observed_value'])[:200]}"
    return ""


def _outcome(asset: _Asset, result: Any) -> ExpectationOutcome:
    cfg = result.expectation_config
    res = result.result or {}
    unexpected = res.get("unexpected_count")
    outcome = ExpectationOutcome(
        split=asset.split,
        check=cfg.meta["retune_check"],
        expectation=cfg.type,
        column=cfg.kwargs.get("column"),
        success=bool(result.success),
        severity=cfg.meta["retune_severity"],
        unexpected_count=None if unexpected is None else int(unexpected),
        element_count=int(res.get("element_count") or len(asset.frame)),
        detail=_detail(asset, result),
        unit=asset.unit,
    )
    if outcome.check in WARN_BELOW_LIMIT and outcome.success and outcome.unexpected_count:
        # Under the limit: still worth a warning (what the model will not see).
        outcome = replace(outcome, success=False, severity="warn")
    return outcome


def _format_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _ceil(share: float, digits: int = 2) -> float:
    """The smallest value with ``digits`` decimals not below ``share``."""
    scale = 10**digits
    return math.ceil(share * scale - 1e-9) / scale


def _suggested(
    outcome: ExpectationOutcome, asset: _Asset, res: dict[str, Any], values: dict[str, Any]
) -> dict[str, Any]:
    """Values of the check's keys under which this outcome would pass (where one exists)."""
    check, frame = outcome.check, asset.frame
    share = (outcome.unexpected_count or 0) / max(outcome.element_count, 1)
    found = [v for v in res.get("partial_unexpected_list") or [] if isinstance(v, int | float)]
    if check == "label_set" and "label" in frame:
        configured = list(values["data.labels"])
        new = sorted({str(v) for v in frame["label"].dropna()} - set(configured))
        return {"data.labels": configured + new}
    if check == "min_rows_per_label" and found and min(found) > 0:  # 0 would turn it off
        return {"validation.min_rows_per_label": int(min(found))}
    finite = [v for v in found if math.isfinite(v)]
    if check == "image_size" and "_small_image" in frame:
        small = frame.loc[frame["_small_image"].notna() & frame["decodes"], ["width", "height"]]
        # Files that do not decode (0x0) are left to image_decodes.
        return {"validation.min_image_side": int(small.min(axis=None))} if len(small) else {}
    if check == "image_aspect" and "_wide_image" in frame:
        wide = frame.loc[frame["_wide_image"].notna(), "aspect"]
        return {"validation.max_aspect_ratio": _ceil(float(wide.max()), 1)}
    if check in ("image_duplicates", "image_near_duplicates"):
        return {"validation.max_duplicate_rate": _ceil(share)}
    if check == "class_imbalance" and finite:
        return {"validation.max_imbalance_ratio": _ceil(max(finite), 1)}
    if check in ("duplicates", "mojibake", "confidence_missing"):
        key = {"duplicates": "max_duplicate_rate", "mojibake": "max_mojibake_rate"}.get(
            check, "max_confidence_missing_rate"
        )
        return {f"validation.{key}": _ceil(share)}
    if check == "truncated":
        return {"validation.max_truncated_share": _ceil(share)}
    if check == "length_ratio" and finite:
        worst = max(max(finite), 1 / max(min(finite), 1e-9))
        return {"generation.max_length_ratio": _ceil(worst, 1)}
    if check == "text_length" and "text" in frame:
        lengths = frame["text"].dropna().map(len)
        return {
            "validation.min_text_chars": max(1, int(lengths.min())),
            "validation.max_text_chars": int(lengths.max()),
        }
    return {}


def _setting(key: str, value: Any, flags: Mapping[str, str], limit: bool = False) -> str:
    """How the user sets ``key``: the caller's own flag where it has one (``--labels a,b``),
    else ``--set key=value`` (``key=value`` when naming a limit)."""
    if key in flags:
        shown = ",".join(str(v) for v in value) if isinstance(value, list | tuple) else value
        return f"{flags[key]} {shown}"
    return f"{key}={_format_value(value)}" if limit else f"--set {key}={_format_value(value)}"


def _explain(
    outcome: ExpectationOutcome,
    asset: _Asset,
    result: Any,
    values: dict[str, Any],
    flags: Mapping[str, str],
) -> ExpectationOutcome:
    """A failed outcome with its limit (keys and values) and the commands that change it."""
    if outcome.success:
        return outcome
    keys = CHECK_KEYS[outcome.check]
    if outcome.check == "truncated":
        count, rows, n = outcome.unexpected_count or 0, outcome.element_count, values[keys[0]]
        outcome = replace(
            outcome,
            detail=f"{count} of {rows} texts ({count / max(rows, 1):.1%}) have more than {n} "
            f"tokens: the model sees only their first {n}",
        )
    changes = [
        _setting(key, value, flags)
        for key, value in _suggested(outcome, asset, result.result or {}, values).items()
    ]
    if outcome.check == "truncated":
        changes.insert(0, f"--set train.max_length={min(2 * values[keys[0]], 512)}")
    if not changes:
        changes.append(ROW_FIXES.get(outcome.check, "fix these rows"))
    level = "warn" if outcome.severity == "error" else "off"
    changes.append(f"--set validation.severity.{outcome.check}={level}")
    limit = ", ".join(_setting(key, values[key], flags, limit=True) for key in keys)
    return replace(outcome, limit=limit, fix=", or ".join(changes))


def _quiet_gx() -> None:
    """GX logs its registry at import and a line per expectation at INFO/DEBUG; one module
    pins its own logger to INFO on import (a line per context). The report says what matters.
    Called before the first GX import and again after it."""
    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _quiet_gx()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _build_docs(context: Any, docs_dir: Path) -> Path:
    docs_dir = docs_dir.resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    context.add_data_docs_site(
        DOCS_SITE,
        {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    context.build_data_docs(site_names=[DOCS_SITE])
    index = docs_dir / "index.html"
    if not index.is_file():
        raise RuntimeError(f"GX Data Docs did not write {index}")
    return index


def validate_dataset(
    frames: dict[str, pd.DataFrame],
    config: ValidationConfig,
    labels: list[str],
    docs_dir: Path | None = None,
    tokens: TokenCounts | None = None,
    flags: Mapping[str, str] | None = None,
) -> ValidationReport:
    """Run the suite on the splits in an ephemeral GX context (no network).

    Args:
        frames: split -> frame with text, label, group (and optionally confidence).
        config: thresholds and the severity of each check.
        labels: the allowed labels.
        docs_dir: if given and ``config.data_docs``, a GX Data Docs site with the results
            is built there (``docs_dir/index.html``, recorded as ``report.docs_index``).
        tokens: token counts per split from the base model's tokenizer; without them the
            ``truncated`` check does not run.
        flags: config keys the caller sets with flags of its own (``{"data.labels":
            "--labels"}`` for ``retune data import``): limits and fixes name those.

    Returns:
        The report; the caller decides whether a failure stops the flow.
    """
    _quiet_gx()
    checks = _Checks(config)
    train = frames["train"]
    train_texts = train["text"].dropna() if "text" in train else pd.Series(dtype=str)
    train_norm = _normalised(train_texts) if checks.active("leakage_normalized") else train_texts
    assets = [
        _split_asset(split, frames[split], checks, labels, train_texts, train_norm, tokens)
        for split in SPLITS
    ]
    values: dict[str, Any] = {
        f"validation.{key}": value for key, value in config.model_dump().items()
    } | {"data.labels": labels, "train.max_length": tokens.max_length if tokens else None}
    assets += [_all_asset(frames, checks), *_summary_assets(frames, checks, labels)]
    return _run_suite(assets, config, docs_dir, values, flags)


def _run_suite(
    assets: list[_Asset],
    config: ValidationConfig,
    docs_dir: Path | None,
    values: dict[str, Any],
    flags: Mapping[str, str] | None,
    checks: Sequence[str] = (),
) -> ValidationReport:
    """Validate every asset in one ephemeral GX context; Data Docs in ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    context = _context()
    source = context.data_sources.add_pandas("retune")
    run_id = RunIdentifier(run_name="retune", run_time=datetime.now(UTC))
    outcomes: list[ExpectationOutcome] = []
    for asset in assets:
        if not asset.expectations:
            continue
        batch = source.add_dataframe_asset(asset.name).add_batch_definition_whole_dataframe(
            asset.name
        )
        expectations = gx.ExpectationSuite(
            name=f"retune-{asset.name}", expectations=asset.expectations
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(
                name=f"retune-{asset.name}", data=batch, suite=context.suites.add(expectations)
            )
        )
        # Unlike batch.validate, a validation definition stores its result in the context,
        # where build_data_docs finds it.
        result = definition.run(
            batch_parameters={"dataframe": asset.frame}, result_format="SUMMARY", run_id=run_id
        )
        outcomes += [
            _explain(_outcome(asset, r), asset, r, values, flags or {}) for r in result.results
        ]
    docs_index = (
        _build_docs(context, docs_dir) if docs_dir is not None and config.data_docs else None
    )
    severities = {check: config.severity_of(check) for check in checks or DEFAULT_SEVERITY}
    return ValidationReport(outcomes=outcomes, severities=severities, docs_index=docs_index)


# --- images (task: image-classification) --------------------------------------------------------

IMAGE_COLUMNS = ["path", "label", "group"]
# What pipeline.images.describe_images adds and the image checks read.
IMAGE_DESCRIBED = ("decodes", "error", "mode", "width", "height", "aspect", "sha256", "phash")
IMAGE_MODES = ["RGB", "L"]  # loaded as they are; others converted (pipeline.images.read_rgb)
HASH_PAIRS = 1 << 22  # hash pairs per block of Hamming distances (32 MiB of uint64 XORs)
NO_MATCH = 65  # a distance no two 64-bit hashes have
IMAGE_VALUE_CHARS = 160  # flagged values name one or two paths: show them whole


def _hashed(rows: pd.DataFrame) -> pd.Series:
    """Rows with a perceptual hash: they decoded (a file that did not has ``phash`` '')."""
    phash = rows["phash"]
    return rows["decodes"].astype(bool) & phash.notna() & (phash != "")


def _hash_values(phash: pd.Series) -> np.ndarray:
    """imagehash's 16-hex-digit pHashes as (N,) uint64."""
    return np.array([int(h, 16) for h in phash], dtype=np.uint64)


def _nearest_hashes(
    query: np.ndarray, pool: np.ndarray, earlier: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the index of the pool hash nearest in Hamming distance and that
    distance in bits, both (N,) int64; :data:`NO_MATCH` bits (index -1) where none is left.

    ``earlier``: query and pool are the same hashes and row i looks only at rows j < i
    (N^2/2 pairs). Rows are compared in blocks of :data:`HASH_PAIRS` pairs, so memory stays
    at ~40 MiB however many images there are.
    """
    nearest = np.full(len(query), -1, dtype=np.int64)
    bits = np.full(len(query), NO_MATCH, dtype=np.int64)
    step = max(1, HASH_PAIRS // max(len(pool), 1))
    for start in range(0, len(query), step):
        stop = min(start + step, len(query))
        width = stop if earlier else len(pool)
        if width == 0:
            continue
        # (rows, width) uint8: bits set in the XOR of each pair
        block = np.bitwise_count(query[start:stop, None] ^ pool[None, :width])
        if earlier:  # keep j < i only
            block[np.arange(width) >= np.arange(start, stop)[:, None]] = NO_MATCH
        found = block.argmin(axis=1)
        nearest[start:stop] = found
        bits[start:stop] = block[np.arange(stop - start), found]
    nearest[bits == NO_MATCH] = -1
    return nearest, bits


def _near_copies(
    query: pd.DataFrame, pool: pd.DataFrame, max_bits: int, index: pd.Index, earlier: bool
) -> pd.Series:
    """``"path ~ pool path (n bits)"`` where a query row's pHash is within ``max_bits`` of a
    pool row's (its nearest), null elsewhere; on ``index`` (the whole frame's rows)."""
    nearest, bits = _nearest_hashes(
        _hash_values(query["phash"]), _hash_values(pool["phash"]), earlier
    )
    near = bits <= max_bits
    paths, matched = query["path"].to_numpy()[near], pool["path"].to_numpy()[nearest[near]]
    found = [f"{p} ~ {m} ({b} bits)" for p, m, b in zip(paths, matched, bits[near], strict=True)]
    return pd.Series(found, index=query.index[near], dtype=object).reindex(index)


def _undecoded(path: pd.Series, error: pd.Series) -> pd.Series:
    """``"path: why"``; Pillow's "cannot identify image file '/abs/path'" drops the path."""
    reasons = [
        e[: e.rfind(" '")] if " '" in e and e.endswith(f"{p}'") else e
        for p, e in zip(path, error.fillna("").astype(str), strict=True)
    ]
    return path + ": " + pd.Series(reasons, index=path.index, dtype=object)


def _leaked_images(
    frame: pd.DataFrame, train: pd.DataFrame, checks: _Checks
) -> tuple[list[Any], dict[str, pd.Series]]:
    """``image_leakage`` (an evaluation file with the bytes of a training file) and
    ``image_leakage_near`` (its pHash within ``near_duplicate_distance`` of a training
    image's, other bytes) of one evaluation split."""
    import great_expectations as gx

    E = gx.expectations
    path = frame["path"].astype(str)
    first_train = train.drop_duplicates("sha256").set_index("sha256")["path"].astype(str)
    copied = frame["sha256"].map(first_train)  # the training file with the same bytes, or null
    exps: list[Any] = []
    derived: dict[str, pd.Series] = {}
    if checks.active("image_leakage"):
        derived["_leaked_image"] = (path + " = " + copied).where(copied.notna())
        exps += checks("image_leakage", E.ExpectColumnValuesToBeNull, column="_leaked_image")
    if checks.active("image_leakage_near"):
        query = frame.loc[_hashed(frame) & copied.isna()]  # exact copies are image_leakage
        pool = train.loc[_hashed(train) & ~train["sha256"].duplicated()]
        derived["_leaked_near_image"] = _near_copies(
            query, pool, checks.config.near_duplicate_distance, frame.index, earlier=False
        )
        exps += checks(
            "image_leakage_near", E.ExpectColumnValuesToBeNull, column="_leaked_near_image"
        )
    return exps, derived


def _image_asset(
    split: str, frame: pd.DataFrame, checks: _Checks, labels: list[str], train: pd.DataFrame
) -> _Asset:
    """One split's images: schema, labels, files that do not decode, modes, sizes, shapes;
    validation and test also copies and near-copies of training images."""
    import great_expectations as gx

    E = gx.expectations
    config, present = checks.config, set(frame.columns)
    exps = checks(
        "schema", E.ExpectTableColumnsToMatchSet, column_set=IMAGE_COLUMNS, exact_match=False
    )
    for column in IMAGE_COLUMNS:
        if column in present:
            exps += checks("schema", E.ExpectColumnValuesToBeOfType, column=column, type_="str")
    if "label" in present:
        exps += checks("label_set", E.ExpectColumnValuesToNotBeNull, column="label")
        exps += checks("label_set", E.ExpectColumnValuesToBeInSet, column="label", value_set=labels)
        exps += checks(
            "labels_in_every_split",
            E.ExpectColumnDistinctValuesToContainSet,
            column="label",
            value_set=labels,
        )
    # Each derived column holds "path: what is wrong" on the rows that break its rule.
    path, decodes = frame["path"].astype(str), frame["decodes"].astype(bool)
    width, height = frame["width"], frame["height"]
    size = path + ": " + width.astype(str) + "x" + height.astype(str)
    mode = frame["mode"].astype(str)
    derived = {
        "_undecoded_image": _undecoded(path, frame["error"]).where(~decodes),
        "_converted_mode": (path + ": " + mode).where(decodes & ~_isin(mode, IMAGE_MODES)),
        "_small_image": size.where(np.minimum(width, height) < config.min_image_side),
        "_wide_image": size.where(frame["aspect"] > config.max_aspect_ratio),
    }
    exps += checks("image_decodes", E.ExpectColumnValuesToBeNull, column="_undecoded_image")
    exps += checks("image_mode", E.ExpectColumnValuesToBeNull, column="_converted_mode")
    exps += checks("image_size", E.ExpectColumnValuesToBeNull, column="_small_image")
    exps += checks("image_aspect", E.ExpectColumnValuesToBeNull, column="_wide_image")
    if split != "train":
        more, found = _leaked_images(frame, train, checks)
        exps, derived = exps + more, derived | found
    return _Asset(split, split, frame.assign(**derived), exps, value_chars=IMAGE_VALUE_CHARS)


def _image_all_asset(frames: dict[str, pd.DataFrame], checks: _Checks) -> _Asset:
    """Every split together (train, validation, test order): files with the bytes of an
    earlier one, and images with a pHash near an earlier image's (other bytes)."""
    import great_expectations as gx

    E = gx.expectations
    config = checks.config
    rows = pd.concat(
        [frames[s][["path", "decodes", "sha256", "phash"]] for s in SPLITS], ignore_index=True
    )
    path = rows["path"].astype(str)
    repeated = rows["sha256"].duplicated()
    exps: list[Any] = []
    derived: dict[str, pd.Series] = {}
    if checks.active("image_duplicates"):
        first = rows.loc[~repeated].set_index("sha256")["path"].astype(str)
        derived["_repeated_image"] = (path + " = " + rows["sha256"].map(first)).where(repeated)
        exps += checks(
            "image_duplicates",
            E.ExpectColumnValuesToBeNull,
            column="_repeated_image",
            mostly=1 - config.max_duplicate_rate,
        )
    if checks.active("image_near_duplicates"):
        # One row per content: a repeat of the same bytes counts under image_duplicates.
        unique = rows.loc[_hashed(rows) & ~repeated]
        derived["_near_duplicate_image"] = _near_copies(
            unique, unique, config.near_duplicate_distance, rows.index, earlier=True
        )
        exps += checks(
            "image_near_duplicates",
            E.ExpectColumnValuesToBeNull,
            column="_near_duplicate_image",
            mostly=1 - config.max_duplicate_rate,
        )
    return _Asset(ALL, ALL, rows.assign(**derived), exps, value_chars=IMAGE_VALUE_CHARS)


def validate_images(
    frames: dict[str, pd.DataFrame],
    config: ValidationConfig,
    labels: list[str],
    docs_dir: Path | None = None,
) -> ValidationReport:
    """The suite for an image classifier's splits, as :func:`validate_dataset`.

    Each split: schema (path, label, group), label_set, labels_in_every_split,
    image_decodes, image_mode, image_size, image_aspect; validation and test also
    image_leakage and image_leakage_near (against train); ``all`` splits: image_duplicates
    and image_near_duplicates; the label_counts and label_balance tables as for text.
    Flagged rows are named by path (``"train/a.png: OSError: image file is truncated"``,
    ``"test/b.png ~ train/a.png (2 bits)"``). A file that does not decode fails
    image_decodes and image_size (0x0) and is left out of the near-duplicate checks.

    Args:
        frames: split -> one row per image: path, label, group and the columns of
            :func:`pipeline.images.describe_images` (decodes, error, mode, width, height,
            aspect, sha256, phash).
        config: thresholds (min_image_side, max_aspect_ratio, near_duplicate_distance,
            max_duplicate_rate, ...) and the severity of each check.
        labels: the allowed labels.
        docs_dir: if given and ``config.data_docs``, GX Data Docs are built there.

    Returns:
        The report; the caller decides whether a failure stops the flow.

    Raises:
        ValueError: a split lacks the described columns (describe it first).
    """
    for split in SPLITS:
        missing = [c for c in ("path", *IMAGE_DESCRIBED) if c not in frames[split].columns]
        if missing:
            raise ValueError(
                f"the {split} images lack column(s) {missing}: describe them first with "
                "pipeline.images.describe_images(table, root)"
            )
    _quiet_gx()
    checks = _Checks(config)
    assets = [_image_asset(s, frames[s], checks, labels, frames["train"]) for s in SPLITS]
    assets += [_image_all_asset(frames, checks), *_summary_assets(frames, checks, labels)]
    values: dict[str, Any] = {
        f"validation.{key}": value for key, value in config.model_dump().items()
    } | {"data.labels": labels}
    return _run_suite(assets, config, docs_dir, values, None, IMAGE_SUITE)
