"""The Great Expectations gate, run for real (ephemeral context) on small frames."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.config import ValidationConfig
from pipeline.data import SPLITS
from pipeline.validation import (
    DataValidationError,
    ExpectationOutcome,
    ValidationReport,
    validate_dataset,
)

LABELS = ["fresh", "rotten"]
N_EXPECTATIONS = 8 + 8 + 9  # train, validation, test (test adds the leakage check)


def frame(texts: list[str | None], labels: list[str | None]) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": texts, "label": labels, "group": [f"movie {i}" for i in range(len(texts))]}
    )


def good_frames() -> dict[str, pd.DataFrame]:
    return {
        "train": frame(
            ["a warm, funny film", "dull and far too long", "sharp writing", "a mess"],
            ["fresh", "rotten", "fresh", "rotten"],
        ),
        "validation": frame(
            ["lovely to look at", "flat jokes", "a small triumph", "forgettable"],
            ["fresh", "rotten", "fresh", "rotten"],
        ),
        "test": frame(["brave and moving", "tedious", "great cast"], ["fresh", "rotten", "fresh"]),
    }


def validate(frames: dict[str, pd.DataFrame], **config: int) -> ValidationReport:
    return validate_dataset(frames, ValidationConfig(**config), LABELS)


def outcome(report: ValidationReport, split: str, expectation: str, column: str | None = None):
    found = [
        o
        for o in report.outcomes
        if o.split == split and o.expectation == expectation and o.column == column
    ]
    assert len(found) == 1, (split, expectation, column)
    return found[0]


def failed(report: ValidationReport) -> set[tuple[str, str, str | None]]:
    return {(o.split, o.expectation, o.column) for o in report.failures}


def test_good_frames_pass_every_expectation():
    report = validate(good_frames())
    assert report.success
    assert report.failures == []
    assert len(report.outcomes) == N_EXPECTATIONS
    assert [o.split for o in report.outcomes] == ["train"] * 8 + ["validation"] * 8 + ["test"] * 9
    assert report.summary() == f"all {N_EXPECTATIONS} expectations passed"
    in_set = outcome(report, "train", "expect_column_values_to_be_in_set", "label")
    assert (in_set.unexpected_count, in_set.element_count) == (0, 4)


def test_label_outside_the_set_is_counted():
    frames = good_frames()
    frames["validation"].loc[[1, 2], "label"] = ["meh", "Fresh"]
    report = validate(frames)
    assert not report.success
    assert failed(report) == {("validation", "expect_column_values_to_be_in_set", "label")}
    bad = outcome(report, "validation", "expect_column_values_to_be_in_set", "label")
    assert bad.unexpected_count == 2
    assert bad.element_count == 4
    assert bad.detail == "e.g. ['meh', 'Fresh']"


def test_empty_and_whitespace_text_are_counted():
    frames = good_frames()
    frames["train"].loc[[0, 2], "text"] = ["", "   "]
    report = validate(frames)
    blank = outcome(report, "train", "expect_column_values_to_not_match_regex", "text")
    assert not blank.success
    assert (blank.unexpected_count, blank.element_count) == (2, 4)
    # "" is also shorter than min_text_chars=3; "   " has exactly 3 characters and passes.
    short = outcome(report, "train", "expect_column_value_lengths_to_be_between", "text")
    assert (short.success, short.unexpected_count) == (False, 1)
    assert failed(report) == {
        ("train", "expect_column_values_to_not_match_regex", "text"),
        ("train", "expect_column_value_lengths_to_be_between", "text"),
    }


def test_missing_text_and_label_are_counted():
    frames = good_frames()
    frames["test"] = frame(["brave and moving", None, "great cast"], ["fresh", "rotten", None])
    report = validate(frames)
    text_null = outcome(report, "test", "expect_column_values_to_not_be_null", "text")
    label_null = outcome(report, "test", "expect_column_values_to_not_be_null", "label")
    assert (text_null.success, text_null.unexpected_count, text_null.element_count) == (
        False,
        1,
        3,
    )
    assert (label_null.success, label_null.unexpected_count) == (False, 1)


def test_label_missing_from_one_split_fails_only_that_split():
    frames = good_frames()
    frames["validation"]["label"] = "fresh"
    report = validate(frames)
    assert failed(report) == {
        ("validation", "expect_column_distinct_values_to_contain_set", "label")
    }
    missing = outcome(report, "validation", "expect_column_distinct_values_to_contain_set", "label")
    assert missing.detail == "missing ['rotten']"
    for split in ("train", "test"):
        other = outcome(report, split, "expect_column_distinct_values_to_contain_set", "label")
        assert other.success


def test_test_text_also_in_train_fails_the_leakage_check():
    frames = good_frames()
    frames["test"] = frame(
        ["brave and moving", "sharp writing", "a mess", "great cast", "a mess"],
        ["fresh", "fresh", "rotten", "fresh", "rotten"],
    )
    report = validate(frames)
    assert failed(report) == {("test", "expect_column_values_to_not_be_in_set", "text")}
    leak = outcome(report, "test", "expect_column_values_to_not_be_in_set", "text")
    assert (leak.unexpected_count, leak.element_count) == (3, 5)
    assert "sharp writing" in leak.detail and "a mess" in leak.detail


def test_text_longer_than_max_text_chars_is_counted():
    frames = good_frames()
    frames["train"].loc[0, "text"] = "x" * 21
    frames["train"].loc[1, "text"] = "y" * 20  # exactly max: allowed
    report = validate(frames, max_text_chars=20)
    long = outcome(report, "train", "expect_column_value_lengths_to_be_between", "text")
    assert (long.success, long.unexpected_count, long.element_count) == (False, 1, 4)
    # The good texts of the other splits are all within 3..20 characters.
    for split in ("validation", "test"):
        assert outcome(report, split, "expect_column_value_lengths_to_be_between", "text").success


def test_missing_column_and_empty_split_fail_the_table_checks():
    frames = good_frames()
    frames["train"] = frames["train"].drop(columns=["group"])
    frames["test"] = frames["test"].iloc[0:0]
    report = validate(frames)
    columns = outcome(report, "train", "expect_table_columns_to_match_set")
    assert not columns.success
    assert columns.detail == "observed ['label', 'text']"
    rows = outcome(report, "test", "expect_table_row_count_to_be_between")
    assert not rows.success
    assert rows.detail == "observed 0"
    assert outcome(report, "validation", "expect_table_row_count_to_be_between").success


def test_summary_names_split_expectation_and_counts():
    frames = good_frames()
    frames["validation"].loc[1, "label"] = "meh"
    report = validate(frames)
    assert report.summary() == (
        f"1 of {N_EXPECTATIONS} expectations failed:\n"
        "  - validation: expect_column_values_to_be_in_set on column 'label' failed on 1 of 4 rows:"
        " e.g. ['meh']"
    )
    as_dict = report.to_dict()
    assert as_dict["success"] is False
    assert len(as_dict["outcomes"]) == N_EXPECTATIONS
    assert {"split", "expectation", "column", "success", "unexpected_count"} <= set(
        as_dict["outcomes"][0]
    )


def test_data_validation_error_carries_the_report_and_names_the_source():
    frames = good_frames()
    frames["validation"].loc[1, "label"] = "meh"
    report = validate(frames)
    err = DataValidationError(report, "data/reviews.csv")
    assert err.report is report
    assert str(err).startswith(
        f"data from data/reviews.csv failed validation: 1 of {N_EXPECTATIONS} expectations failed:"
    )
    assert "validation: expect_column_values_to_be_in_set" in str(err)
    with pytest.raises(DataValidationError, match="data from example failed validation"):
        raise DataValidationError(report, "example")


# --- ValidationReport alone (no GX) --------------------------------------------------------------


def test_report_summary_from_hand_made_outcomes():
    ok = ExpectationOutcome("train", "expect_a", "text", True, 0, 10)
    bad_col = ExpectationOutcome("test", "expect_b", "label", False, 3, 10, "e.g. ['x']")
    bad_table = ExpectationOutcome("validation", "expect_c", None, False, 0, 0)
    report = ValidationReport([ok, bad_col, bad_table])
    assert not report.success
    assert report.failures == [bad_col, bad_table]
    assert report.summary().splitlines() == [
        "2 of 3 expectations failed:",
        "  - test: expect_b on column 'label' failed on 3 of 10 rows: e.g. ['x']",
        "  - validation: expect_c failed on 0 of 0 rows",
    ]


def test_empty_report_is_a_success():
    report = ValidationReport()
    assert report.success
    assert report.summary() == "all 0 expectations passed"


def test_every_split_is_validated():
    report = validate(good_frames())
    assert {o.split for o in report.outcomes} == set(SPLITS)
