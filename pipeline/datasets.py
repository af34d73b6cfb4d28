"""Datasets under ``data/<name>/``: import a source as a new DVC version, or use one as is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import versioning
from pipeline.config import EXAMPLE_SOURCE, DataConfig
from pipeline.data import (
    DATASET_PREFIX,
    EXAMPLE_NAME,
    SPLITS,
    DataError,
    dataset_name,
    describe_source,
    prepare_frames,
    write_splits,
)
from pipeline.validation import TokenCounts, ValidationReport

# A text is tokenised up to this many characters per token of max_length: no natural text
# packs that many characters into max_length tokens, so "over the limit" is exact while a
# 25,000-character article costs no more than a short one.
CHARS_PER_TOKEN_READ = 16


def import_dataset(
    frames: dict[str, pd.DataFrame],
    config: DataConfig,
    project_dir: Path,
    dropped: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> versioning.DataVersion:
    """Write ``frames`` as ``data/<name>/`` and version them with DVC, all or nothing.

    For ``source: dataset:NAME`` nothing is written: the folder must still hash to its
    recorded md5. For the example, the rebuilt data must hash to the md5 recorded in
    ``data.dvc`` (if any): the example is pinned.

    Args:
        dropped: rows left out while preparing, by reason (recorded in the manifest).
        extra: more manifest fields, e.g. from :func:`forced_meta`.

    Raises:
        DataVersionError: a hash mismatch or a DVC failure (nothing changed).
    """
    name = dataset_name(config)
    dvc_file = project_dir / f"{config.data_dir}.dvc"
    recorded = versioning.recorded_datasets(dvc_file)
    if config.source.startswith(DATASET_PREFIX):
        return use_dataset(name, config, project_dir)
    record = versioning.DatasetRecord(
        name=name,
        md5="",  # computed from the staged files
        rows={split: len(frames[split]) for split in SPLITS},
        labels=sorted({str(x) for f in frames.values() for x in f["label"] if isinstance(x, str)}),
        source=describe_source(config, project_dir),
        extra=dict(extra or {}),
        dropped=dict(dropped or {}),
    )
    staged = versioning.stage_folder(project_dir)
    write_splits(frames, staged)
    expected = recorded[name].md5 if config.source == EXAMPLE_SOURCE and name in recorded else None
    return versioning.commit_dataset(
        project_dir,
        config.data_dir,
        staged,
        record,
        expected_md5=expected,
        push=config.dvc_push,
        rebuild=rebuild_example,
    )


def count_tokens(frames: dict[str, pd.DataFrame], base_model: str, max_length: int) -> TokenCounts:
    """Tokens per text (special tokens included) as the base model's tokenizer counts them.

    Counts are exact up to ``CHARS_PER_TOKEN_READ * max_length`` characters of a text, which
    is all the truncation check needs; a missing text counts 0.

    Raises:
        FileNotFoundError: the packaged base model is not installed.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.finetune import resolve_base_model

    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum" is the point
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(base_model))
    read = CHARS_PER_TOKEN_READ * max_length
    counts: dict[str, list[int]] = {}
    for split, frame in frames.items():
        texts = [t[:read] if isinstance(t, str) else "" for t in frame.get("text", [])]
        if not texts:
            counts[split] = []
            continue
        ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        counts[split] = [len(x) if t else 0 for x, t in zip(ids, texts, strict=True)]
    return TokenCounts(counts, max_length)


def forced_meta(report: ValidationReport) -> dict[str, Any]:
    """Manifest fields of a dataset versioned past error-level failures (``--allow-invalid``)."""
    return {"allow_invalid": True, "failed_checks": [o.line() for o in report.errors]}


def rebuild_example(name: str, folder: Path) -> bool:
    """Write the example dataset or the default retention suite into ``folder`` (no DVC).

    Returns False for any other dataset (it must be pulled from the DVC remote).
    """
    if name != EXAMPLE_NAME:
        from pipeline.retention import rebuild_suite

        return rebuild_suite(name, folder)
    write_splits(prepare_frames(DataConfig(), folder), folder)
    return True


def use_dataset(name: str, config: DataConfig, project_dir: Path) -> versioning.DataVersion:
    """An already imported dataset, checked against its recorded md5.

    Raises:
        DataError: the dataset is not recorded in data.dvc.
        DataVersionError: its folder changed since it was versioned.
    """
    dvc_file = project_dir / f"{config.data_dir}.dvc"
    recorded = versioning.recorded_datasets(dvc_file)
    if name not in recorded:
        known = ", ".join(recorded) or "none"
        raise DataError(
            f"dataset '{name}' is not recorded in {dvc_file.name} (known: {known}); "
            f"import it with `retune data import FILE --name {name}`"
        )
    folder = project_dir / config.data_dir / name
    actual = versioning.folder_md5(folder) if folder.is_dir() else None
    if actual != recorded[name].md5:
        raise versioning.DataVersionError(
            f"{folder} hashes to {actual} but {dvc_file.name} records {recorded[name].md5}: "
            f"it changed since it was versioned; run `dvc checkout` or import it again"
        )
    data_md5 = versioning.recorded_md5(dvc_file)
    assert data_md5 is not None
    return versioning.DataVersion(
        recorded[name], data_md5, dvc_file, versioning.remote_url(project_dir), pushed=False
    )


@dataclass(frozen=True)
class DatasetStatus:
    record: versioning.DatasetRecord
    state: str  # "ok", "modified" or "missing" (in the workspace)


def list_datasets(project_dir: Path, data_dir: str = "data") -> list[DatasetStatus]:
    """Every dataset recorded in data.dvc, with the state of its folder."""
    statuses = []
    for name, record in versioning.recorded_datasets(project_dir / f"{data_dir}.dvc").items():
        folder = project_dir / data_dir / name
        if not folder.is_dir():
            state = "missing"
        else:
            state = "ok" if versioning.folder_md5(folder) == record.md5 else "modified"
        statuses.append(DatasetStatus(record, state))
    return statuses
