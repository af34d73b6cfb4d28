"""The validation suite on generative tables: chat conversations and translation pairs."""

from __future__ import annotations

import pandas as pd

from pipeline import conversations as conv
from pipeline.config import ValidationConfig
from pipeline.validation import TokenCounts, validate_conversations

PAIRS = [
    ("Save", "Sichern"),
    ("Delete %(name)s", "%(name)s löschen"),
    ("Close", "Schliessen"),
    ("Open the file", "Datei öffnen"),
    ("Cancel", "Abbrechen"),
    ("Yes", "Ja"),
]


def pair_frames(rows: dict[str, list[tuple[str, str]]]) -> dict[str, pd.DataFrame]:
    frames = {}
    for split, pairs in rows.items():
        found = [conv.Pair(s, t, f"x: {i}") for i, (s, t) in enumerate(pairs)]
        turns = [conv.pair_conversation(p, conv.DEFAULT_INSTRUCTION) for p in found]
        frames[split] = conv.conversation_table(turns, [p.source for p in found], found)
    return frames


def failed(report, check: str) -> list:
    return [o for o in report.failures if o.check == check]


def test_clean_pairs_pass_every_check():
    frames = pair_frames({"train": PAIRS[:4], "validation": PAIRS[4:5], "test": PAIRS[5:]})
    report = validate_conversations(frames, ValidationConfig(), docs_dir=None)
    assert report.success and not report.warnings, [o.line() for o in report.failures]
    status = {c: s["status"] for c, s in report.check_status().items()}
    for check in ("copies", "length_ratio", "placeholders", "leakage", "duplicates", "mojibake"):
        assert status[check] == "passed", check
    assert status["label_set"] == "not run"


def test_copies_odd_lengths_placeholders_and_leaked_prompts_are_named():
    train = PAIRS[:3] + [("Help", "Help"), ("OK", "In Ordnung, das ist alles gut so")]
    test = [("Delete %(name)s", "Löschen"), ("Save", "Sichern")]  # dropped placeholder; leak
    report = validate_conversations(
        pair_frames({"train": train, "validation": PAIRS[4:5], "test": test}),
        ValidationConfig(),
        max_length_ratio=4.0,
    )
    copies = failed(report, "copies")
    assert [o.split for o in copies] == ["train"] and "'Help'" in copies[0].detail
    assert copies[0].fix.startswith("translate these rows")
    ratio = failed(report, "length_ratio")
    assert ratio and ratio[0].limit == "generation.max_length_ratio=4.0"
    assert "--set generation.max_length_ratio=" in ratio[0].fix
    holes = failed(report, "placeholders")
    assert [o.split for o in holes] == ["test"] and "Delete %(name)s" in holes[0].detail
    leak = failed(report, "leakage")
    assert [o.split for o in leak] == ["test"] and leak[0].severity == "error"
    assert not report.success  # leakage is an error; the pair checks warn


def test_cut_off_conversations_count_against_the_share():
    frames = pair_frames({"train": PAIRS[:4], "validation": PAIRS[4:5], "test": PAIRS[5:]})
    counts = {s: [10] * len(f) for s, f in frames.items()}
    counts["train"][0] = 300
    report = validate_conversations(
        frames, ValidationConfig(max_truncated_share=0.0), tokens=TokenCounts(counts, 256)
    )
    cut = failed(report, "truncated")
    assert [o.split for o in cut] == ["train"] and cut[0].unexpected_count == 1
    assert "--set train.max_length=512" in cut[0].fix
