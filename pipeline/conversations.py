"""Conversations for generative fine-tuning: chat JSONL and translation pairs, read and checked.

A conversation is a list of ``{"role", "content"}`` turns, the format of the chat-template
ecosystem: an optional ``system`` turn first, then ``user`` and ``assistant`` alternating,
ending with the ``assistant`` answer the model is trained to give.

- :func:`read_chat` reads a JSONL file with a ``messages`` list per line.
- :func:`read_pairs` reads translation pairs (CSV or JSONL with source and target columns,
  or a gettext ``.po`` file) and :func:`pair_conversation` renders one as chat turns with
  the configured instruction.
- :func:`conversation_table` turns conversations into the split table every kind shares:
  ``messages`` (JSON), ``prompt``, ``response`` and ``group`` (rows of one group stay in
  one split), plus ``source``/``target`` for pairs.
- :func:`load_chat_example` and :func:`load_translation_example` build the offline
  examples (chatterbot-corpus, Django's German messages).

Every structural problem is a :class:`pipeline.data.DataError` naming the file, the line
(or entry) and the fix; nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.data import DataError, package_file

ROLES = ("system", "user", "assistant")
CHAT_EXAMPLE_PACKAGE = "chatterbot-corpus==1.3.3"
TRANSLATION_EXAMPLE_PACKAGE = "django==5.2.19"
DEFAULT_INSTRUCTION = "Translate from English to German:"

Turn = dict[str, str]


@dataclass(frozen=True)
class Pair:
    """One translation pair and where it came from (``file:line`` or ``file: msgid``)."""

    source: str
    target: str
    where: str


def check_messages(messages: Any, where: str) -> list[Turn]:
    """``messages`` as a list of turns, or a DataError saying what is wrong at ``where``.

    Rules: a non-empty list of objects with a known ``role`` and a non-empty string
    ``content``; ``system`` only first; then ``user`` and ``assistant`` alternate, starting
    with ``user`` and ending with ``assistant``.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of turns")
    turns: list[Turn] = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"}:
            raise DataError(
                f"{where}: turn {i + 1} must be an object with 'role' and 'content' only"
            )
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise DataError(
                f"{where}: turn {i + 1} has unknown role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: turn {i + 1} ({role}) has empty content")
        turns.append({"role": role, "content": content})
    _check_order([t["role"] for t in turns], where)
    return turns


def _check_order(roles: list[str], where: str) -> None:
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise DataError(f"{where}: a system turn may only come first")
    if "assistant" not in body:
        raise DataError(f"{where}: no assistant turn; every conversation ends with the answer")
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(
                f"{where}: turn {i + 1 + len(roles) - len(body)} is {role!r} where {expected!r} "
                "belongs: user and assistant turns alternate, starting with user"
            )
    if body[-1] != "assistant":
        raise DataError(f"{where}: the last turn is {body[-1]!r}; end with the assistant's answer")


def read_chat(path: Path, encoding: str = "utf-8") -> list[list[Turn]]:
    """The conversations of a chat JSONL file (one ``{"messages": [...]}`` per line).

    Raises:
        DataError: a line that is not JSON, has no ``messages`` or breaks a rule of
            :func:`check_messages`, naming the file and line; an empty file.
    """
    conversations = []
    for number, line in enumerate(_read_text(path, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not valid JSON: {err.msg}") from None
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"{where} has no 'messages' list")
        conversations.append(check_messages(record["messages"], where))
    if not conversations:
        raise DataError(f"{path} holds no conversations")
    return conversations


def _read_text(path: Path, encoding: str) -> str:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(
            f"data file {path} is not valid {encoding} (byte {err.start}); set data.encoding"
        ) from None


def read_pairs(
    path: Path,
    source_column: str = "source",
    target_column: str = "target",
    encoding: str = "utf-8",
) -> list[Pair]:
    """Translation pairs from a CSV or JSONL file with source and target columns, or a
    gettext ``.po`` file (translated, non-fuzzy singular entries; ``msgid`` -> ``msgstr``).

    Raises:
        DataError: a missing column (naming the columns found), an empty source or target,
            a ``.po`` file that does not parse, or no pairs at all.
    """
    if path.suffix == ".po":
        pairs = _read_po(path, encoding)
    elif path.suffix in {".csv", ".jsonl"}:
        pairs = _read_pair_table(path, source_column, target_column, encoding)
    else:
        raise DataError(f"{path}: pairs must be a .csv, .jsonl or .po file")
    if not pairs:
        raise DataError(f"{path} holds no translation pairs")
    return pairs


def _read_pair_table(path: Path, source: str, target: str, encoding: str) -> list[Pair]:
    from pipeline.data import read_table

    frame = read_table(path, encoding)
    missing = [c for c in (source, target) if c not in frame.columns]
    if missing:
        found = ", ".join(c for c in frame.columns if c != "_line")
        raise DataError(
            f"{path} has no column {', '.join(repr(c) for c in missing)} (found: {found}); "
            "set data.source_column / data.target_column"
        )
    lines = frame["_line"] if "_line" in frame else pd.Series(range(2, len(frame) + 2))
    pairs = []
    for src, tgt, line in zip(frame[source], frame[target], lines, strict=True):
        where = f"{path}: line {line}"
        for name, value in ((source, src), (target, tgt)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: empty {name!r}; every pair needs both texts")
        pairs.append(Pair(src, tgt, where))
    return pairs


def _read_po(path: Path, encoding: str) -> list[Pair]:
    import polib

    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        catalog = polib.pofile(str(path), encoding=encoding)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a gettext .po file polib can parse: {err}") from None
    return [
        Pair(entry.msgid, entry.msgstr, f"{path}: line {entry.linenum}")
        for entry in catalog
        if entry.msgid
        and entry.msgstr
        and not entry.fuzzy
        and not entry.obsolete
        and not entry.msgid_plural
    ]


def pair_conversation(pair: Pair, instruction: str, system: str | None = None) -> list[Turn]:
    """A pair as chat turns: ``instruction`` and the source asked, the target answered."""
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [
        {"role": "user", "content": f"{instruction}\n{pair.source}"},
        {"role": "assistant", "content": pair.target},
    ]


def conversation_table(
    conversations: Sequence[list[Turn]],
    groups: Sequence[str] | None = None,
    pairs: Sequence[Pair] | None = None,
) -> pd.DataFrame:
    """The shared split table: one row per conversation.

    Columns: ``messages`` (the turns as JSON), ``prompt`` (every turn's text before the
    final answer, for duplicate and leakage checks), ``response`` (the final answer),
    ``group`` (default: the prompt, so one prompt never sits in two splits) and, with
    ``pairs``, ``source`` and ``target``.
    """
    prompts = [prompt_text(c) for c in conversations]
    table = pd.DataFrame(
        {
            "messages": [json.dumps(c, ensure_ascii=False) for c in conversations],
            "prompt": prompts,
            "response": [c[-1]["content"] for c in conversations],
            "group": list(groups) if groups is not None else prompts,
        }
    )
    if pairs is not None:
        table["source"] = [p.source for p in pairs]
        table["target"] = [p.target for p in pairs]
    return table


def prompt_text(conversation: list[Turn]) -> str:
    """The text of every turn before the final answer, one per line."""
    return "\n".join(t["content"] for t in conversation[:-1])


def messages_of(table: pd.DataFrame) -> list[list[Turn]]:
    """The conversations of a split table (its ``messages`` column, parsed)."""
    return [json.loads(m) for m in table["messages"]]


def load_chat_example(languages: Iterable[str] = ("english",)) -> list[list[Turn]]:
    """chatterbot-corpus's question/answer pairs as one-turn conversations, duplicates
    (same question and answer) removed, in file and entry order.

    Each YAML entry is ``[question, answer, more answers...]``; the first answer is kept.
    """
    import yaml

    marker = package_file("chatterbot_corpus/data/english/greetings.yml", CHAT_EXAMPLE_PACKAGE)
    root = marker.parent.parent
    seen: set[tuple[str, str]] = set()
    conversations = []
    for language in languages:
        for path in sorted((root / language).glob("*.yml")):
            for entry in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
                texts = [_yaml_text(x) for x in entry[:2]]
                if len(texts) < 2 or not all(texts) or tuple(texts) in seen:
                    continue
                seen.add((texts[0], texts[1]))
                conversations.append(
                    [
                        {"role": "user", "content": texts[0]},
                        {"role": "assistant", "content": texts[1]},
                    ]
                )
    return conversations


def _yaml_text(value: Any) -> str:
    return " ".join(str(value).split()) if value is not None else ""


_PLACEHOLDER = re.compile(r"%\([A-Za-z_][A-Za-z0-9_]*\)[sdifr]|%[sdif]|\{[A-Za-z0-9_]*\}")


def placeholders(text: str) -> list[str]:
    """The format placeholders of a UI string (``%(name)s``, ``%s``, ``{0}``), sorted."""
    return sorted(_PLACEHOLDER.findall(text))


def load_translation_example(language: str = "de") -> list[Pair]:
    """English -> ``language`` pairs from the Django wheel's own message catalogues
    (``django/**/locale/<language>/LC_MESSAGES/django.po``), one per distinct msgid,
    in path order."""
    marker = package_file("django/__init__.py", TRANSLATION_EXAMPLE_PACKAGE)
    files = sorted(marker.parent.glob(f"**/locale/{language}/LC_MESSAGES/django.po"))
    if not files:
        raise DataError(f"the django package ships no {language!r} catalogue")
    seen: set[str] = set()
    pairs = []
    for path in files:
        for pair in _read_po(path, "utf-8"):
            if pair.source not in seen:
                seen.add(pair.source)
                pairs.append(pair)
    return pairs
