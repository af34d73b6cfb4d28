"""Chat JSONL and translation pairs: read, checked with errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import conversations as conv
from pipeline.data import DataError


def write_chat(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GOOD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My router blinks red."},
        {"role": "assistant", "content": "Restart it."},
    ]
}


def test_a_chat_file_reads_into_checked_turns(tmp_path: Path):
    path = write_chat(tmp_path / "chat.jsonl", [GOOD, {"messages": GOOD["messages"][1:]}])
    read = conv.read_chat(path)
    assert read == [GOOD["messages"], GOOD["messages"][1:]]
    table = conv.conversation_table(read)
    assert list(table.columns) == ["messages", "prompt", "response", "group"]
    assert table["prompt"].tolist() == ["Be brief.\nMy router blinks red.", "My router blinks red."]
    assert table["response"].tolist() == ["Restart it.", "Restart it."]
    assert conv.messages_of(table) == read


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
        ({"text": "hi"}, "line 2 has no 'messages' list"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "line 2: no assistant turn",
        ),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            "line 2: turn 1 has unknown role 'bot'; use one of system, user, assistant",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": " "},
                ]
            },
            "line 2: turn 2 (assistant) has empty content",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            "line 2: turn 2 is 'user' where 'assistant' belongs",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "line 2: the last turn is 'user'; end with the assistant's answer",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            "line 2: a system turn may only come first",
        ),
    ],
)
def test_a_bad_conversation_is_named_by_file_and_line(tmp_path: Path, record, problem):
    path = write_chat(tmp_path / "chat.jsonl", [GOOD, record])
    with pytest.raises(DataError) as err:
        conv.read_chat(path)
    assert str(err.value).startswith(f"{path}: {problem}")


def test_a_line_that_is_not_json_is_named(tmp_path: Path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"chat.jsonl: line 2 is not valid JSON"):
        conv.read_chat(path)


def test_pairs_from_csv_jsonl_and_po(tmp_path: Path):
    (tmp_path / "p.csv").write_text("en,de\nSave,Sichern\nDelete %(name)s,%(name)s löschen\n")
    pairs = conv.read_pairs(tmp_path / "p.csv", "en", "de")
    assert [(p.source, p.target) for p in pairs] == [
        ("Save", "Sichern"),
        ("Delete %(name)s", "%(name)s löschen"),
    ]
    assert pairs[1].where.endswith("p.csv: line 3")
    (tmp_path / "p.jsonl").write_text(json.dumps({"source": "Yes", "target": "Ja"}) + "\n")
    assert conv.read_pairs(tmp_path / "p.jsonl")[0].target == "Ja"
    po = tmp_path / "de.po"
    po.write_text(
        'msgid ""\nmsgstr "Content-Type: text/plain; charset=UTF-8\\n"\n\n'
        'msgid "Save"\nmsgstr "Sichern"\n\n'
        '#, fuzzy\nmsgid "Close"\nmsgstr "Schliessen"\n\n'
        'msgid "Open"\nmsgstr ""\n',
        encoding="utf-8",
    )
    assert [(p.source, p.target) for p in conv.read_pairs(po)] == [("Save", "Sichern")]
    turns = conv.pair_conversation(pairs[0], "Translate from English to German:")
    assert turns == [
        {"role": "user", "content": "Translate from English to German:\nSave"},
        {"role": "assistant", "content": "Sichern"},
    ]
    table = conv.conversation_table([turns], groups=["Save"], pairs=pairs[:1])
    assert table.loc[0, "source"] == "Save" and table.loc[0, "target"] == "Sichern"


def test_a_pairs_file_without_its_target_column_is_refused(tmp_path: Path):
    (tmp_path / "p.csv").write_text("source,german\nSave,Sichern\n")
    with pytest.raises(DataError, match=r"p.csv has no column 'target' \(found: source, german\)"):
        conv.read_pairs(tmp_path / "p.csv")


def test_a_po_file_that_does_not_parse_is_refused(tmp_path: Path):
    po = tmp_path / "broken.po"
    po.write_text('msgid "Save"\nmsgstr "Sichern\n\nmsgid\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.po is not a gettext .po file polib can parse"):
        conv.read_pairs(po)


def test_placeholders_are_found_in_ui_strings():
    assert conv.placeholders("Delete %(name)s and %s of {0} {count}") == [
        "%(name)s",
        "%s",
        "{0}",
        "{count}",
    ]
    assert conv.placeholders("no placeholders, 100% sure") == []


def test_the_offline_examples_load():
    chat = conv.load_chat_example()
    assert 800 <= len(chat) <= 1000  # about 900 unique English pairs
    assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in chat)
    assert len({(c[0]["content"], c[1]["content"]) for c in chat}) == len(chat)
    pairs = conv.load_translation_example("de")
    assert 500 <= len(pairs) <= 800
    assert len({p.source for p in pairs}) == len(pairs)
    assert any(p.source == "Save" for p in pairs) or any("Save" in p.source for p in pairs)
