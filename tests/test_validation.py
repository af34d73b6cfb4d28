"""The Great Expectations suite, run for real (ephemeral context) on small hand-made frames."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import DEFAULT_SEVERITY, ValidationConfig
from pipeline.data import SPLITS
from pipeline.validation import (
    CHECK_KEYS,
    IMAGE_CHECKS,
    PAIR_CHECKS,
    TABLE_HEADER,
    DataValidationError,
    ExpectationOutcome,
    TokenCounts,
    ValidationReport,
    normalise_text,
    validate_dataset,
)

LABELS = ["fresh", "rotten"]
PER_LABEL = 8  # rows per label and split in the good frames: 16 per split, 48 in all
# Expectations on the good frames: per split schema 4 (columns + 3 types), null_text,
# empty_text, text_length, truncated, label_set 2, labels_in_every_split; validation and
# test add leakage and leakage_normalized; "all" has duplicates, conflicting_labels,
# mojibake; the two summary tables one each.
N_EXPECTATIONS = 11 + 13 + 13 + 3 + 1 + 1
WORDS = ["warm", "dull", "sharp", "messy", "brave", "flat", "lovely", "tedious"]


def frame(texts: list, labels: list, **extra: list) -> pd.DataFrame:
    groups = [f"movie {i}" for i in range(len(texts))]
    return pd.DataFrame({"text": texts, "label": labels, "group": groups, **extra})


def good_frames() -> dict[str, pd.DataFrame]:
    """Distinct texts (also after normalising) in every split, 8 rows per label."""
    frames = {}
    for split in SPLITS:
        texts = [f"a {WORDS[i % 8]} {split} film, take {i}" for i in range(2 * PER_LABEL)]
        frames[split] = frame(texts, LABELS * PER_LABEL)
    return frames


def word_tokens(frames: dict[str, pd.DataFrame], max_length: int = 128) -> TokenCounts:
    """Hand-countable token counts: words plus the two special tokens."""
    return TokenCounts(
        {
            s: [len(t.split()) + 2 if isinstance(t, str) else 0 for t in f["text"]]
            for s, f in frames.items()
        },
        max_length,
    )


def validate(frames: dict[str, pd.DataFrame], max_length: int = 128, **config) -> ValidationReport:
    tokens = word_tokens(frames, max_length) if all("text" in f for f in frames.values()) else None
    return validate_dataset(frames, ValidationConfig(**config), LABELS, tokens=tokens)


def outcome(report: ValidationReport, split: str, check: str, expectation: str | None = None):
    found = [
        o
        for o in report.outcomes
        if o.split == split and o.check == check and expectation in (None, o.expectation)
    ]
    assert len(found) == 1, (split, check, expectation, found)
    return found[0]


def failed(report: ValidationReport) -> set[tuple[str, str]]:
    return {(o.split, o.check) for o in report.failures}


def counts(o: ExpectationOutcome) -> tuple[bool, int | None, int]:
    return o.success, o.unexpected_count, o.element_count


# --- good data ----------------------------------------------------------------------------------


def test_good_frames_pass_every_check():
    report = validate(good_frames())
    assert report.success
    assert report.failures == report.errors == report.warnings == []
    assert len(report.outcomes) == N_EXPECTATIONS
    assert report.summary() == f"all {N_EXPECTATIONS} expectations passed"
    per_split = {s: sum(o.split == s for o in report.outcomes) for s in [*SPLITS, "all"]}
    assert per_split == {"train": 11, "validation": 13, "test": 13, "all": 5}
    assert counts(outcome(report, "train", "label_set", "expect_column_values_to_be_in_set")) == (
        True,
        0,
        16,
    )
    assert counts(outcome(report, "all", "duplicates")) == (True, 0, 48)
    assert counts(outcome(report, "all", "min_rows_per_label")) == (True, 0, 6)
    assert counts(outcome(report, "all", "class_imbalance")) == (True, 0, 3)
    # Every check ran except the confidence ones (the frames have no confidence column)
    # and those of translation pairs and images.
    status = {check: s["status"] for check, s in report.check_status().items()}
    assert status == {
        check: "not run"
        if check.startswith("confidence") or check in PAIR_CHECKS or check in IMAGE_CHECKS
        else "passed"
        for check in DEFAULT_SEVERITY
    }


def test_every_outcome_carries_its_check_severity():
    report = validate(good_frames())
    for o in report.outcomes:
        assert o.severity == DEFAULT_SEVERITY[o.check], o


# --- one check at a time: the right count on a hand-made bad frame ------------------------------


def test_label_outside_the_set_is_counted():
    frames = good_frames()
    frames["validation"].loc[[1, 2], "label"] = ["meh", "Fresh"]
    report = validate(frames)
    assert not report.success
    assert failed(report) == {("validation", "label_set")}
    bad = outcome(report, "validation", "label_set", "expect_column_values_to_be_in_set")
    assert counts(bad) == (False, 2, 16)
    assert bad.detail == "e.g. ['meh', 'Fresh']"


def test_missing_text_and_label_are_counted():
    frames = good_frames()
    frames["test"].loc[3, "text"] = None
    frames["test"].loc[4, "label"] = None
    report = validate(frames)
    assert failed(report) == {("test", "null_text"), ("test", "label_set")}
    assert counts(outcome(report, "test", "null_text")) == (False, 1, 16)
    label_null = outcome(report, "test", "label_set", "expect_column_values_to_not_be_null")
    assert counts(label_null) == (False, 1, 16)
    # A null label is not counted twice: the in-set check skips nulls.
    assert outcome(report, "test", "label_set", "expect_column_values_to_be_in_set").success


def test_empty_and_whitespace_text_are_counted():
    frames = good_frames()
    frames["train"].loc[[0, 2], "text"] = ["", " \t "]
    report = validate(frames)
    assert failed(report) == {("train", "empty_text"), ("train", "text_length")}
    assert counts(outcome(report, "train", "empty_text")) == (False, 2, 16)
    # "" is shorter than min_text_chars=3; " \t " has exactly 3 characters and passes.
    assert counts(outcome(report, "train", "text_length")) == (False, 1, 16)


def test_text_longer_than_max_text_chars_is_counted():
    frames = good_frames()
    frames["train"].loc[0, "text"] = "x" * 41
    frames["train"].loc[1, "text"] = "y" * 40  # exactly max: allowed
    report = validate(frames, max_text_chars=40)
    assert failed(report) == {("train", "text_length")}
    assert counts(outcome(report, "train", "text_length")) == (False, 1, 16)


def test_label_missing_from_one_split_fails_that_split_and_the_label_tables():
    frames = good_frames()
    frames["validation"]["label"] = "fresh"
    report = validate(frames)
    assert failed(report) == {
        ("validation", "labels_in_every_split"),
        ("all", "min_rows_per_label"),
        ("all", "class_imbalance"),
    }
    missing = outcome(report, "validation", "labels_in_every_split")
    assert (missing.unexpected_count, missing.detail) == (None, "missing ['rotten']")
    rows = outcome(report, "all", "min_rows_per_label")
    assert counts(rows) == (False, 1, 6)
    assert rows.detail == "validation/rotten: 0 rows"
    imbalance = outcome(report, "all", "class_imbalance")
    assert (imbalance.severity, imbalance.unexpected_count, imbalance.detail) == (
        "warn",
        1,
        "validation: inf",
    )
    assert [o.check for o in report.errors] == ["labels_in_every_split", "min_rows_per_label"]


def test_too_few_rows_per_label_are_counted_per_split_and_label():
    frames = good_frames()
    frames["test"] = frames["test"].drop(index=[1, 3, 5, 7])  # 4 rotten rows left in test
    report = validate(frames, min_rows_per_label=5)
    assert failed(report) == {("all", "min_rows_per_label")}
    rows = outcome(report, "all", "min_rows_per_label")
    assert (rows.unexpected_count, rows.element_count, rows.unit) == (1, 6, "split/label pairs")
    assert rows.detail == "test/rotten: 4 rows"
    # 8 fresh / 4 rotten = 2.0: within the default 10, over a limit of 1.5.
    report = validate(frames, min_rows_per_label=4, max_imbalance_ratio=1.5)
    assert failed(report) == {("all", "class_imbalance")}
    assert outcome(report, "all", "class_imbalance").detail == "test: 2.0"
    assert report.success  # class_imbalance only warns


def test_duplicates_are_rows_repeating_an_earlier_text_over_all_splits():
    frames = good_frames()
    train_text = frames["train"].loc[0, "text"]
    frames["train"].loc[2, "text"] = train_text  # fresh, like row 0
    frames["train"].loc[4, "text"] = train_text
    report = validate(frames)
    dup = outcome(report, "all", "duplicates")
    # 2 of 48 rows repeat an earlier one: 4.2%, over the 2% threshold.
    assert (dup.success, dup.unexpected_count, dup.element_count, dup.severity) == (
        False,
        2,
        48,
        "warn",
    )
    assert dup.detail == f"e.g. ['{train_text}', '{train_text}']"
    assert failed(report) == {("all", "duplicates")}
    assert report.success and report.warnings == [dup]
    # Under a 5% threshold the same count is reported, and the check passes.
    relaxed = outcome(validate(frames, max_duplicate_rate=0.05), "all", "duplicates")
    assert (relaxed.success, relaxed.unexpected_count) == (True, 2)


def test_severity_error_makes_duplicates_stop_the_flow():
    frames = good_frames()
    frames["train"].loc[[2, 4], "text"] = frames["train"].loc[0, "text"]
    report = validate(frames, severity={"duplicates": "error"})
    assert not report.success
    assert [(o.check, o.severity, o.unexpected_count) for o in report.errors] == [
        ("duplicates", "error", 2)
    ]
    assert report.warnings == []


def test_a_check_set_to_off_has_no_outcome():
    frames = good_frames()
    frames["train"].loc[[2, 4], "text"] = frames["train"].loc[0, "text"]
    frames["test"].loc[0, "text"] = "  "
    report = validate(frames, severity={"duplicates": "off", "empty_text": "off"})
    checks = {o.check for o in report.outcomes}
    assert "duplicates" not in checks and "empty_text" not in checks
    assert len(report.outcomes) == N_EXPECTATIONS - 1 - 3
    # "  " is still too short: text_length is on.
    assert failed(report) == {("test", "text_length")}
    rows = {row[0]: row for row in report.table_rows()}
    assert rows["duplicates"] == ("duplicates", "off", "off", "")
    assert rows["empty_text"] == ("empty_text", "off", "off", "")


def test_same_text_with_conflicting_labels_counts_every_such_row():
    frames = good_frames()
    text = frames["train"].loc[0, "text"]  # fresh
    frames["train"].loc[1, "text"] = text  # rotten
    frames["train"].loc[2, "text"] = text  # fresh
    report = validate(frames, max_duplicate_rate=0.1)
    assert failed(report) == {("all", "conflicting_labels")}
    conflict = outcome(report, "all", "conflicting_labels")
    assert counts(conflict) == (False, 3, 48)
    assert outcome(report, "all", "duplicates").unexpected_count == 2


def test_test_and_validation_texts_also_in_train_leak():
    frames = good_frames()
    train = frames["train"]["text"]
    # Even rows are fresh in every split: the leaked rows keep their label.
    frames["test"].loc[[0, 2, 4], "text"] = [train[4], train[6], train[6]]
    frames["validation"].loc[0, "text"] = train[8]
    report = validate(frames, max_duplicate_rate=0.1)
    assert failed(report) == {
        ("test", "leakage"),
        ("test", "leakage_normalized"),
        ("validation", "leakage"),
        ("validation", "leakage_normalized"),
    }
    assert counts(outcome(report, "test", "leakage")) == (False, 3, 16)
    assert counts(outcome(report, "validation", "leakage")) == (False, 1, 16)
    # An exact leak is also a leak after normalising.
    assert outcome(report, "test", "leakage_normalized").unexpected_count == 3
    assert train[6] in outcome(report, "test", "leakage").detail


def test_leakage_after_normalising_case_and_whitespace():
    frames = good_frames()
    train = frames["train"]["text"]
    frames["validation"].loc[0, "text"] = "  " + train[0].upper().replace(" ", " \t ")
    report = validate(frames)
    assert failed(report) == {("validation", "leakage_normalized")}
    norm = outcome(report, "validation", "leakage_normalized")
    assert counts(norm) == (False, 1, 16)
    assert norm.detail == f"e.g. ['{normalise_text(train[0])}']"
    assert outcome(report, "validation", "leakage").success


def test_normalise_text_lowercases_and_folds_whitespace():
    assert normalise_text("  Sharp\t\tWRITING \n here ") == "sharp writing here"
    assert normalise_text("a\u00a0b") == "a b"  # no-break space is whitespace too


MOJIBAKE = ["cafÃ© culture", "donâ€™t go", "a \ufffd here", "bad\x85 byte", "car_Ñ_ nope"]
CLEAN = ["\u201ccurly\u201d quotes", "crème brûlée for two", "naïve and sweet"]


def test_mojibake_is_counted_and_clean_accents_are_not():
    frames = good_frames()
    frames["train"].loc[: len(MOJIBAKE) - 1, "text"] = MOJIBAKE
    frames["test"].loc[: len(CLEAN) - 1, "text"] = CLEAN
    report = validate(frames)
    moji = outcome(report, "all", "mojibake")
    # 5 of 48 rows: 10.4%, over the 1% threshold.
    assert counts(moji) == (False, 5, 48)
    assert moji.severity == "error"
    assert failed(report) == {("all", "mojibake")}
    relaxed = outcome(validate(frames, max_mojibake_rate=0.15), "all", "mojibake")
    assert (relaxed.success, relaxed.unexpected_count) == (True, 5)


def test_confidence_range_and_missing_rate_when_the_column_exists():
    frames = good_frames()
    for split in SPLITS:
        frames[split]["confidence"] = 0.9
    frames["train"].loc[[0, 1], "confidence"] = [1.2, -0.1]
    frames["test"].loc[[0, 1, 2], "confidence"] = None
    report = validate(frames)
    assert counts(outcome(report, "all", "confidence_range")) == (False, 2, 48)
    missing = outcome(report, "all", "confidence_missing")
    # 3 of 48 missing: 6.25%, over the default 5%, and a warning only.
    assert (missing.success, missing.unexpected_count, missing.severity) == (False, 3, "warn")
    assert failed(report) == {("all", "confidence_range"), ("all", "confidence_missing")}
    assert outcome(report, "train", "schema", "expect_column_values_to_be_in_type_list").success
    report = validate(frames, confidence_min=-1, confidence_max=2, max_confidence_missing_rate=0.1)
    assert report.failures == []
    assert len(report.outcomes) == N_EXPECTATIONS + 3 + 2  # a type check per split, 2 on "all"


def test_confidence_checks_only_run_when_the_column_exists():
    report = validate(good_frames())
    assert not [o for o in report.outcomes if "confidence" in (o.column or o.check)]


def test_schema_flags_missing_columns_and_non_string_values():
    frames = good_frames()
    frames["train"] = frames["train"].drop(columns=["group"])
    frames["validation"]["label"] = frames["validation"]["label"].astype(object)
    frames["validation"].loc[[0, 2], "label"] = [1, 0]
    frames["test"]["confidence"] = ["high"] * 16
    report = validate(frames, severity={"label_set": "off", "confidence_range": "off"})
    columns = outcome(report, "train", "schema", "expect_table_columns_to_match_set")
    assert (columns.success, columns.unexpected_count) == (False, None)
    assert columns.detail == "missing columns ['group']"
    label_type = [
        o
        for o in report.outcomes
        if o.split == "validation" and o.check == "schema" and o.column == "label"
    ]
    assert [counts(o) for o in label_type] == [(False, 2, 16)]
    conf_type = outcome(report, "test", "schema", "expect_column_values_to_be_in_type_list")
    # A column of strings has pandas' str dtype: GX judges the dtype, not each row.
    assert (conf_type.success, conf_type.unexpected_count) == (False, None)
    assert conf_type.detail == "observed str"
    assert {(o.split, o.check) for o in report.errors} >= {
        ("train", "schema"),
        ("validation", "schema"),
        ("test", "schema"),
    }


def test_an_empty_split_fails_the_label_checks():
    frames = good_frames()
    frames["test"] = frames["test"].iloc[0:0]
    report = validate(frames)
    assert failed(report) == {("test", "labels_in_every_split"), ("all", "min_rows_per_label")}
    rows = outcome(report, "all", "min_rows_per_label")
    assert (rows.unexpected_count, rows.detail) == (2, "test/fresh: 0 rows, test/rotten: 0 rows")


# --- report: summary, dict, table, error --------------------------------------------------------


def test_summary_and_to_dict_name_split_check_expectation_and_counts():
    frames = good_frames()
    frames["validation"].loc[1, "label"] = "meh"
    frames["train"].loc[[2, 4], "text"] = frames["train"].loc[0, "text"]
    report = validate(frames)
    text = frames["train"].loc[0, "text"]
    assert report.summary().splitlines() == [
        f"2 of {N_EXPECTATIONS} expectations failed (1 error, 1 warning):",
        "  - validation: label_set (expect_column_values_to_be_in_set on 'label') failed on 1 of"
        " 16 rows [error]: e.g. ['meh']; limit data.labels=[fresh, rotten] (change: --set"
        " data.labels=[fresh, rotten, meh], or --set validation.severity.label_set=warn)",
        "  - all: duplicates (expect_column_values_to_be_null on '_repeated_text') failed on 2 of"
        f" 48 rows [warn]: e.g. ['{text}', '{text}']; limit validation.max_duplicate_rate=0.02"
        " (change: --set validation.max_duplicate_rate=0.05, or"
        " --set validation.severity.duplicates=off)",
    ]
    as_dict = report.to_dict()
    assert (as_dict["success"], as_dict["expectations"], as_dict["failed"]) == (
        False,
        N_EXPECTATIONS,
        2,
    )
    assert [e["check"] for e in as_dict["errors"]] == ["label_set"]
    assert as_dict["errors"][0]["unexpected_count"] == 1
    assert [w["check"] for w in as_dict["warnings"]] == ["duplicates"]
    assert as_dict["checks"]["duplicates"] == {
        "severity": "warn",
        "status": "failed",
        "unexpected": 2,
        "failing": 2,
        "elements": 48,
    }
    assert as_dict["checks"]["confidence_range"]["status"] == "not run"
    assert as_dict["docs_index"] is None
    rows = {row[0]: row for row in report.table_rows()}
    assert len(rows) == len(DEFAULT_SEVERITY) and len(TABLE_HEADER) == 4
    assert rows["label_set"] == ("label_set", "error", "failed", "1 of 48")
    assert rows["duplicates"] == ("duplicates", "warn", "failed", "2 of 48")
    assert rows["schema"] == ("schema", "error", "passed", "-")
    assert rows["confidence_missing"] == ("confidence_missing", "warn", "not run", "")


def test_data_validation_error_carries_the_report_and_names_the_source():
    frames = good_frames()
    frames["validation"].loc[1, "label"] = "meh"
    report = validate(frames)
    err = DataValidationError(report, "data/reviews.csv")
    assert err.report is report
    assert str(err).startswith(
        f"data from data/reviews.csv failed validation: 1 of {N_EXPECTATIONS} expectations "
        "failed (1 error, 0 warnings):\n  - validation: label_set "
        "(expect_column_values_to_be_in_set on 'label') failed on 1 of 16 rows [error]"
    )
    with pytest.raises(DataValidationError, match="data from example failed validation"):
        raise DataValidationError(report, "example")


def test_data_docs_site_is_built_into_docs_dir(tmp_path: Path):
    frames = good_frames()
    frames["test"].loc[0, "text"] = frames["train"].loc[3, "text"]
    docs = tmp_path / "docs"
    report = validate_dataset(frames, ValidationConfig(), LABELS, docs)
    assert report.docs_index == (docs / "index.html").resolve()
    index = report.docs_index.read_text(encoding="utf-8")
    assert "validations/retune-test/" in index and "expectations/retune-all.html" in index
    [page] = (docs / "validations" / "retune-test").rglob("*.html")
    html = page.read_text(encoding="utf-8")
    # The leakage expectation, rendered, with the leaked text among its unexpected values.
    assert "_leaked_text" in html and "values must be null" in html
    assert frames["train"].loc[3, "text"] in html
    assert report.to_dict()["docs_index"] == str(report.docs_index)
    assert str(DataValidationError(report, "x")).endswith(f"\nGX Data Docs: {report.docs_index}")


def test_no_data_docs_when_disabled_or_without_a_folder(tmp_path: Path):
    report = validate_dataset(good_frames(), ValidationConfig(data_docs=False), LABELS, tmp_path)
    assert report.docs_index is None
    assert list(tmp_path.iterdir()) == []
    assert validate(good_frames()).docs_index is None


def test_gx_logs_nothing_below_warning_and_draws_no_progress_bars(caplog, capfd):
    caplog.set_level(logging.DEBUG)
    validate_dataset(good_frames(), ValidationConfig(), LABELS)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("great_expectations")] == []
    assert capfd.readouterr() == ("", "")


# --- ValidationReport alone (no GX) --------------------------------------------------------------


def test_report_from_hand_made_outcomes():
    ok = ExpectationOutcome("train", "null_text", "expect_a", "text", True, "error", 0, 10)
    bad = ExpectationOutcome("test", "label_set", "expect_b", "label", False, "error", 3, 10, "x")
    warn = ExpectationOutcome("all", "duplicates", "expect_c", "t", False, "warn", 4, 30)
    table = ExpectationOutcome("validation", "schema", "expect_d", None, False, "warn", None, 5)
    report = ValidationReport([ok, bad, warn, table])
    assert not report.success
    assert report.errors == [bad]
    assert report.warnings == [warn, table]
    assert report.summary().splitlines() == [
        "3 of 4 expectations failed (1 error, 2 warnings):",
        "  - test: label_set (expect_b on 'label') failed on 3 of 10 rows [error]: x",
        "  - all: duplicates (expect_c on 't') failed on 4 of 30 rows [warn]",
        "  - validation: schema (expect_d) failed [warn]",
    ]
    only_warnings = ValidationReport([ok, warn])
    assert only_warnings.success
    assert only_warnings.summary().startswith("1 of 2 expectations failed (0 errors, 1 warning)")


def test_empty_report_is_a_success():
    report = ValidationReport()
    assert report.success
    assert report.summary() == "all 0 expectations passed"
    assert report.table_rows() == []


# --- length as the model sees it, and messages that say how to change a limit -----------------


def test_truncated_texts_warn_with_their_share_by_default():
    frames = good_frames()
    frames["train"].loc[[0, 1, 2], "text"] = [f"word{i} " * 20 for i in range(3)]  # 22 tokens
    frames["train"].loc[3, "text"] = "one two three four five six"  # 8 tokens: exactly the max
    report = validate(frames, max_length=8)
    assert report.success  # max_truncated_share 1.0: a warning only
    truncated = outcome(report, "train", "truncated")
    assert (truncated.success, truncated.severity, truncated.unexpected_count) == (False, "warn", 3)
    assert truncated.detail == (
        "3 of 16 texts (18.8%) have more than 8 tokens: the model sees only their first 8"
    )
    assert truncated.limit == "train.max_length=8, validation.max_truncated_share=1.0"
    assert "--set train.max_length=16" in truncated.fix
    assert outcome(report, "validation", "truncated").success
    assert report.check_status()["truncated"]["status"] == "warned"
    assert ("truncated", "error", "warned", "3 of 48") in report.table_rows()


def test_truncated_share_above_the_limit_is_an_error_naming_its_keys():
    frames = good_frames()
    frames["train"].loc[[0, 1, 2], "text"] = [f"word{i} " * 20 for i in range(3)]
    report = validate(frames, max_length=8, max_truncated_share=0.1)
    assert not report.success
    truncated = outcome(report, "train", "truncated")
    assert (truncated.severity, truncated.unexpected_count) == ("error", 3)
    assert report.check_status()["truncated"]["status"] == "failed"
    assert truncated.line().endswith(
        "; limit train.max_length=8, validation.max_truncated_share=0.1 (change: --set "
        "train.max_length=16, or --set validation.max_truncated_share=0.19, or "
        "--set validation.severity.truncated=warn)"
    )
    # At exactly the limit's share it passes at error level and still warns.
    at_limit = validate(frames, max_length=8, max_truncated_share=0.1875)
    assert at_limit.success and outcome(at_limit, "train", "truncated").severity == "warn"


def test_without_token_counts_truncated_does_not_run_and_long_articles_pass_text_length():
    frames = good_frames()
    frames["train"].loc[0, "text"] = "a long article " * 1700  # 25,500 characters
    report = validate_dataset(frames, ValidationConfig(), LABELS)
    assert report.success
    assert report.check_status()["truncated"]["status"] == "not run"
    assert outcome(report, "train", "text_length").success


def everything_wrong() -> dict[str, pd.DataFrame]:
    """Frames failing every check at once (with a confidence column, without group)."""
    frames = good_frames()
    train, validation, test = frames["train"], frames["validation"], frames["test"]
    train.loc[0, "text"] = None  # null_text
    train.loc[1, "text"] = "   "  # empty_text
    train.loc[2, "text"] = "ab"  # text_length
    train.loc[3, "text"] = "word " * 30  # truncated
    train.loc[4, "label"] = "meh"  # label_set
    train.loc[[5, 7, 9], "text"] = "the same film"  # duplicates and, with labels, conflicts
    train.loc[6, "text"] = "the same film"
    train.loc[8, "text"] = "caf\u00c3\u00a9 noir"  # mojibake
    validation["label"] = "fresh"  # labels_in_every_split, min_rows_per_label, imbalance
    test.loc[0, "text"] = train.loc[10, "text"]  # leakage
    test.loc[1, "text"] = train.loc[11, "text"].upper()  # leakage_normalized
    for split, f in frames.items():
        f["confidence"] = [1.5] + [None] * 3 + [0.5] * (len(f) - 4)  # range and missing
        frames[split] = f.drop(columns=["group"])  # schema
    return frames


def test_every_check_names_its_keys_values_and_the_commands_that_change_them():
    assert set(CHECK_KEYS) == set(DEFAULT_SEVERITY)
    frames = everything_wrong()
    report = validate_dataset(
        frames,
        ValidationConfig(max_truncated_share=0.0),
        LABELS,
        tokens=word_tokens(frames, max_length=16),
    )
    values = {
        "validation.min_text_chars": "3",
        "validation.max_text_chars": "1000000",
        "train.max_length": "16",
        "validation.max_truncated_share": "0.0",
        "data.labels": "[fresh, rotten]",
        "validation.min_rows_per_label": "5",
        "validation.max_duplicate_rate": "0.02",
        "validation.max_mojibake_rate": "0.01",
        "validation.max_imbalance_ratio": "10.0",
        "validation.confidence_min": "0.0",
        "validation.confidence_max": "1.0",
        "validation.max_confidence_missing_rate": "0.05",
    }
    for check, keys in CHECK_KEYS.items():
        if check in PAIR_CHECKS or check in IMAGE_CHECKS:
            continue  # tests/test_conversation_validation.py, tests/test_image_validation.py
        mine = [o for o in report.failures if o.check == check]
        assert mine, f"{check} did not fail"
        for o in mine:
            level = "warn" if o.severity == "error" else "off"
            assert f"--set validation.severity.{check}={level}" in o.line(), o.line()
            assert o.limit == ", ".join(f"{k}={values[k]}" for k in keys), o.line()
            if not keys:
                assert o.fix.startswith("fix these rows"), o.line()
    rows = next(o for o in report.failures if o.check == "min_rows_per_label")
    assert rows.line().endswith(
        "validation/rotten: 0 rows; limit validation.min_rows_per_label=5 (change: add rows for "
        "these labels (or groups, which decide the split), or "
        "--set validation.severity.min_rows_per_label=warn)"
    )


def test_too_few_rows_suggest_the_smallest_count_as_the_limit():
    frames = good_frames()
    frames["test"] = frames["test"].drop(index=[1, 3, 5, 7])  # 4 rotten rows left
    report = validate(frames)
    rows = outcome(report, "all", "min_rows_per_label")
    assert rows.line().endswith(
        "[error]: test/rotten: 4 rows; limit validation.min_rows_per_label=5 (change: --set "
        "validation.min_rows_per_label=4, or --set validation.severity.min_rows_per_label=warn)"
    )
