"""Pieces of the generative kind that need no flow: its cached base report, its data."""

from __future__ import annotations

from pathlib import Path

from pipeline import conversations as conv
from pipeline.config import RetuneConfig
from pipeline.tasks import generative


def test_the_base_report_is_computed_once_per_base_and_test_split(tmp_path: Path):
    config = RetuneConfig.model_validate({"task": "chat"})
    turns = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    test = conv.conversation_table(turns)
    calls = []

    def compute() -> generative.GenerationReport:
        calls.append(1)
        return generative.GenerationReport(1, 3, 2.0, 7.39, 0.5, examples=[{"prompt": "hi"}])

    first = generative.cached_report(config, "ab" * 32, test, tmp_path, compute)
    again = generative.cached_report(config, "ab" * 32, test, tmp_path, compute)
    assert first == again and len(calls) == 1
    generative.cached_report(config, "cd" * 32, test, tmp_path, compute)  # another base
    other = conv.conversation_table([[turns[0][0], {"role": "assistant", "content": "hey"}]])
    generative.cached_report(config, "ab" * 32, other, tmp_path, compute)  # other answers
    assert len(calls) == 3
    generative.cached_report(config, "unresolved:hub/id", test, tmp_path, compute)
    assert len(calls) == 4  # nothing to key by: computed every time


def test_pairs_are_grouped_by_source_and_wrapped_with_the_instruction(tmp_path: Path):
    (tmp_path / "ui.csv").write_text("en,de\nSave,Sichern\nSave,Speichern\nOpen,Öffnen\n")
    config = RetuneConfig.model_validate(
        {
            "task": "translation",
            "data": {"source": "ui.csv"},
            "generation": {
                "source_column": "en",
                "target_column": "de",
                "system_prompt": "Be exact.",
            },
        }
    )
    prepared = generative.prepare_conversations(config, tmp_path, "translation")
    rows = [r for f in prepared.frames.values() for r in f.to_dict("records")]
    assert sorted(r["source"] for r in rows) == ["Open", "Save", "Save"]
    splits = {s for s, f in prepared.frames.items() for src in f["source"] if src == "Save"}
    assert len(splits) == 1  # one msgid, one split
    first = conv.messages_of(prepared.frames[next(iter(splits))])[0]
    assert first[0] == {"role": "system", "content": "Be exact."}
    assert first[1]["content"].startswith("Translate from English to German:\n")
    assert prepared.source == "ui.csv"
