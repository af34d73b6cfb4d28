"""Datasets under ``data/<name>/``: import a source as a new DVC version, or use one as is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def import_dataset(
    frames: dict[str, pd.DataFrame], config: DataConfig, project_dir: Path
) -> versioning.DataVersion:
    """Write ``frames`` as ``data/<name>/`` and version them with DVC, all or nothing.

    For ``source: dataset:NAME`` nothing is written: the folder must still hash to its
    recorded md5. For the example, the rebuilt data must hash to the md5 recorded in
    ``data.dvc`` (if any): the example is pinned.

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
        source=describe_source(config),
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
