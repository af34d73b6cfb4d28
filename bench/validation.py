"""Time the whole GX validation suite on 1,000,000 short texts against plain pandas.

Run from the project root: ``.venv/bin/python bench/validation.py`` (see bench/README.md).
Exits 1 if the suite takes 30 s or more, or if its counts differ from the baseline's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ValidationConfig  # noqa: E402
from pipeline.data import SPLITS  # noqa: E402
from pipeline.validation import (  # noqa: E402
    BLANK_REGEX,
    MOJIBAKE_REGEX,
    normalise_text,
    validate_dataset,
)

LABELS = ["negative", "neutral", "positive"]
LIMIT_S = 30.0
WORDS = (
    "the a film car road drive late fast slow safe future google self driving never love hate "
    "think maybe city traffic ride cheap smart crash robot trust people today tomorrow"
).split()


def synthetic_frames(rows: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Three splits (80/10/10) of 4-word texts made unique by a number, plus planted faults.

    Planted: 0.5% of rows repeat an earlier text (1 in 10 with another label; a repeat
    that lands in another split also leaks), 0.2% carry mojibake ("Ã©"), 300 test rows copy a
    train text exactly and 300 validation rows copy one upper-cased.
    """
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), size=(rows, 4))]
    texts = np.array([f"{' '.join(w)} {i}" for i, w in enumerate(words)], dtype=object)
    n_dup, n_moji = rows // 200, rows // 500
    dup_rows = rng.choice(np.arange(1, rows), size=n_dup, replace=False)
    earlier = rng.integers(0, dup_rows)  # for each repeating row, an earlier row
    texts[dup_rows] = texts[earlier]
    moji_rows = rng.choice(rows, size=n_moji, replace=False)
    texts[moji_rows] = [t + " cafÃ©" for t in texts[moji_rows]]
    labels = np.array(LABELS)[rng.choice(3, size=rows, p=[0.45, 0.4, 0.15])]
    same = slice(0, n_dup * 9 // 10)  # 9 in 10 repeats keep their label; the rest conflict
    labels[dup_rows[same]] = labels[earlier[same]]
    confidence = rng.uniform(0.3, 1.0, size=rows)
    confidence[rng.random(rows) < 0.02] = np.nan
    frame = pd.DataFrame(
        {"text": texts.astype(str), "label": labels, "group": texts.astype(str)}
    ).assign(confidence=confidence)
    n_train, n_val = int(rows * 0.8), int(rows * 0.1)
    frames = {
        "train": frame.iloc[:n_train],
        "validation": frame.iloc[n_train : n_train + n_val],
        "test": frame.iloc[n_train + n_val :],
    }
    train_texts = frames["train"]["text"].to_numpy()
    frames["test"].iloc[:300, 0] = train_texts[:300]
    frames["validation"].iloc[:300, 0] = [t.upper() for t in train_texts[300:600]]
    return {s: f.reset_index(drop=True) for s, f in frames.items()}


def pandas_counts(
    frames: dict[str, pd.DataFrame], config: ValidationConfig, labels: list[str]
) -> dict[tuple[str, str], int]:
    """The flagged-row count of every check, in plain pandas (the baseline).

    Written as one would for speed: membership tests on object dtype (pandas' isin on
    arrow strings boxes every value of the pool) and the suite's RE2-friendly regexes.
    """
    counts: dict[tuple[str, str], int] = {}
    train = frames["train"]["text"].dropna().astype(object)
    train_norm = {normalise_text(t) for t in train}
    for split in SPLITS:
        text, label = frames[split]["text"], frames[split]["label"]
        counts[split, "null_text"] = int(text.isna().sum())
        counts[split, "empty_text"] = int(text.str.contains(BLANK_REGEX, na=False).sum())
        length = text.str.len()
        counts[split, "text_length"] = int(
            ((length < config.min_text_chars) | (length > config.max_text_chars)).sum()
        )
        counts[split, "label_set"] = int((~label.isin(labels) & label.notna()).sum())
        if split != "train":
            counts[split, "leakage"] = int(text.astype(object).isin(train).sum())
            norm = [normalise_text(t) for t in text.dropna()]
            counts[split, "leakage_normalized"] = sum(n in train_norm for n in norm)
    rows = pd.concat([frames[s] for s in SPLITS], ignore_index=True)
    text = rows["text"]
    counts["all", "duplicates"] = int((text.duplicated() & text.notna()).sum())
    labels_per_text = rows.dropna(subset=["text", "label"]).groupby("text")["label"].nunique()
    conflicted = labels_per_text.index[labels_per_text > 1].astype(object)
    counts["all", "conflicting_labels"] = int(text.astype(object).isin(conflicted).sum())
    counts["all", "mojibake"] = int(text.str.contains(MOJIBAKE_REGEX, na=False).sum())
    conf = rows["confidence"]
    counts["all", "confidence_range"] = int(
        ((conf < config.confidence_min) | (conf > config.confidence_max)).sum()
    )
    counts["all", "confidence_missing"] = int(conf.isna().sum())
    below = 0
    ratios = []
    for split in SPLITS:
        label_rows = frames[split]["label"].value_counts().reindex(labels, fill_value=0)
        below += int((label_rows < config.min_rows_per_label).sum())
        ratios.append(label_rows.max() / label_rows.min() if label_rows.min() else np.inf)
    counts["all", "min_rows_per_label"] = below
    counts["all", "class_imbalance"] = sum(r > config.max_imbalance_ratio for r in ratios)
    return counts


def suite_counts(report) -> dict[tuple[str, str], int]:
    """The same counts from the GX report (label_set adds its null and in-set expectations)."""
    counts: dict[tuple[str, str], int] = {}
    for o in report.outcomes:
        if o.unexpected_count is None or o.check == "schema":
            continue
        if o.check == "label_set" and o.expectation == "expect_column_values_to_not_be_null":
            continue  # the baseline counts labels outside the set among non-null ones
        counts[o.split, o.check] = counts.get((o.split, o.check), 0) + o.unexpected_count
    return counts


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--docs", action="store_true", help="also time a run with Data Docs")
    args = parser.parse_args()

    config = ValidationConfig()
    frames, build_s = timed(synthetic_frames, args.rows)
    print(
        f"{args.rows:,} rows built in {build_s:.1f} s: "
        + ", ".join(f"{s} {len(f):,}" for s, f in frames.items())
    )
    import great_expectations  # noqa: F401  (import time is not part of either measurement)

    report, suite_s = timed(validate_dataset, frames, config, LABELS)
    baseline, pandas_s = timed(pandas_counts, frames, config, LABELS)
    print(f"{'GX suite':<18}{suite_s:8.2f} s   ({len(report.outcomes)} expectations)")
    print(f"{'pandas baseline':<18}{pandas_s:8.2f} s")
    print(f"{'ratio':<18}{suite_s / pandas_s:8.2f} x   (GX suite / pandas baseline)")
    if args.docs:
        with tempfile.TemporaryDirectory() as tmp:
            _, docs_s = timed(validate_dataset, frames, config, LABELS, Path(tmp))
        print(f"{'GX suite + docs':<18}{docs_s:8.2f} s")
    print(report.summary())

    failed = 0
    gx_counts = suite_counts(report)
    for key, expected in sorted(baseline.items()):
        if gx_counts.get(key) != expected:
            print(f"count mismatch {key}: suite {gx_counts.get(key)}, pandas {expected}")
            failed = 1
    if not failed:
        print(f"counts: all {len(baseline)} agree with the pandas baseline")
    if suite_s >= LIMIT_S:
        print(f"too slow: the suite took {suite_s:.1f} s, the limit is {LIMIT_S:.0f} s")
        failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
