"""Datasets under ``data/<name>/``: import a source as a new DVC version, or use one as is.

Every dataset this project versions goes through here, the retention suite included
(:func:`ensure_suite`); so does rebuilding the recorded datasets that need no DVC remote
(the example and the default retention suite) before another one is versioned.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import retention, versioning
from pipeline.config import EXAMPLE_SOURCE, DataConfig, ForgettingConfig
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
    source: str | None = None,
    files: dict[str, Path] | None = None,
) -> versioning.DataVersion:
    """Write ``frames`` as ``data/<name>/`` and version them with DVC, all or nothing.

    For ``source: dataset:NAME`` nothing is written: the folder must still hash to its
    recorded md5. For the example, the rebuilt data must hash to the md5 recorded in
    ``data.dvc`` (if any): the example is pinned.

    Args:
        dropped: rows left out while preparing, by reason (recorded in the manifest).
        extra: more manifest fields, e.g. from :func:`forced_meta`.
        source: what the manifest records as the source (default: the configured one,
            see :func:`pipeline.data.describe_source`).
        files: copied into the dataset folder beside the splits (an image dataset's
            images): path inside the folder -> the file copied.

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
        labels=sorted(
            {str(x) for f in frames.values() for x in f.get("label", []) if isinstance(x, str)}
        ),
        source=source or describe_source(config, project_dir),
        extra=dict(extra or {}),
        dropped=dict(dropped or {}),
    )
    notes = restore_builtin(project_dir, config.data_dir, keep=name)
    staged = versioning.stage_folder(project_dir)
    try:
        write_splits(frames, staged)
        copy_files(files or {}, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    expected = recorded[name].md5 if config.source == EXAMPLE_SOURCE and name in recorded else None
    return _commit(
        notes,
        project_dir=project_dir,
        data_dir=config.data_dir,
        staged=staged,
        record=record,
        expected_md5=expected,
        push=config.dvc_push,
    )


def copy_files(files: dict[str, Path], folder: Path) -> None:
    """Copy each source file to ``folder / relative`` (no path may leave ``folder``)."""
    root = folder.resolve()
    for relative, source in files.items():
        target = (folder / relative).resolve()
        if not target.is_relative_to(root):
            raise DataError(f"{relative!r}: a file inside the dataset may not leave its folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


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


def restore_builtin(project_dir: Path, data_dir: str, keep: str) -> list[str]:
    """Rebuild the recorded datasets missing from ``data_dir`` that need no DVC remote.

    ``dvc add`` of ``data_dir`` drops whatever is missing from it, so every recorded dataset
    but ``keep`` (the one about to be versioned) must be there first. The example and the
    default retention suite can be rebuilt from installed packages and built sources;
    :func:`pipeline.versioning.commit_dataset` pulls the rest.

    Returns:
        Why a missing recorded dataset could not be rebuilt here, one line each (DVC must
        restore those; if it cannot, the error carries these lines).
    """
    recorded = versioning.recorded_datasets(project_dir / f"{data_dir}.dvc")
    notes = []
    for name, record in recorded.items():
        folder = project_dir / data_dir / name
        if name == keep or folder.is_dir():
            continue
        if name == EXAMPLE_NAME:
            # Not checked here: commit_dataset refuses an example that hashes differently.
            write_splits(prepare_frames(DataConfig(), folder), folder)
        elif name == retention.SUITE_NAME:
            notes += _rebuild_suite(folder, record.md5, project_dir)
    return notes


def _rebuild_suite(folder: Path, md5: str, project_dir: Path) -> list[str]:
    """Build the default suite into ``folder``, kept only if it hashes to ``md5``; why
    not, otherwise (a suite recorded with another config, or a source not built here)."""
    try:
        retention.build_suite(folder, ForgettingConfig(), project_dir)
        if versioning.folder_md5(folder) == md5:
            return []
        note = f"{retention.SUITE_NAME} was recorded with another forgetting config"
    except DataError as err:
        note = f"{retention.SUITE_NAME} could not be rebuilt here: {err}"
    shutil.rmtree(folder, ignore_errors=True)
    return [note]


def _commit(notes: list[str], **commit: Any) -> versioning.DataVersion:
    """``versioning.commit_dataset``; a failed restore says why the rebuild was not done."""
    try:
        return versioning.commit_dataset(**commit)
    except versioning.DataVersionError as err:
        if not notes:
            raise
        raise versioning.DataVersionError(f"{err}; " + "; ".join(notes)) from err


def ensure_suite(
    project_dir: Path, config: ForgettingConfig, data_dir: str = "data", push: bool = True
) -> retention.Suite:
    """The configured retention suite as the DVC-versioned dataset ``data/retention-suite``.

    Builds the suite into a staged folder; if ``data.dvc`` already records that version
    and the workspace holds it, the stage is discarded, else the build is committed
    (``dvc add``, manifest entry, push).

    Raises:
        DataError: a source is missing (the message names the command that builds it) or
            an extra task file is invalid.
        DataVersionError: no DVC repo, or DVC failed (data/ and data.dvc unchanged).
    """
    if not (project_dir / ".dvc").is_dir():
        raise versioning.DataVersionError(
            f"{project_dir} is not a DVC repository (no .dvc/); run `dvc init` there first"
        )
    name = retention.SUITE_NAME
    folder = project_dir / data_dir / name
    recorded = versioning.recorded_datasets(project_dir / f"{data_dir}.dvc").get(name)
    staged = versioning.stage_folder(project_dir)
    try:
        warnings = retention.build_suite(staged, config, project_dir)
        md5 = versioning.folder_md5(staged)
        current = versioning.folder_md5(folder) if folder.is_dir() else None
        if recorded is not None and md5 == recorded.md5 == current:
            shutil.rmtree(staged)
            return retention.Suite(retention.load_suite(folder), md5, warnings, folder)
        tasks = retention.load_suite(staged)
        record = versioning.DatasetRecord(
            name=name,
            md5="",  # computed from the staged files
            rows={task.name: task.n_items for task in tasks},
            labels=[],
            source="retention suite: " + ", ".join(task.name for task in tasks),
        )
        notes = restore_builtin(project_dir, data_dir, keep=name)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    version = _commit(
        notes,
        project_dir=project_dir,
        data_dir=data_dir,
        staged=staged,
        record=record,
        push=push,
    )
    return retention.Suite(retention.load_suite(folder), version.md5, warnings, folder)


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
