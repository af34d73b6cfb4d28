"""DVC versioning in a real git + DVC repo with a local remote."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, make_project

from pipeline.versioning import (
    DatasetRecord,
    DataVersionError,
    commit_dataset,
    folder_md5,
    history,
    recorded_datasets,
    recorded_md5,
    restore_dataset,
    stage_folder,
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "p", with_data_dvc=False)


def staged(project: Path, text: str) -> Path:
    folder = stage_folder(project)
    (folder / "train.csv").write_text(f"text,label\n{text},a\n", encoding="utf-8")
    return folder


def record(name: str = "d") -> DatasetRecord:
    return DatasetRecord(name=name, md5="", rows={"train": 1}, labels=["a"], source="test")


def test_commit_writes_manifest_and_pushes_to_the_remote(project: Path):
    version = commit_dataset(project, "data", staged(project, "hello"), record())
    assert version.md5 == folder_md5(project / "data" / "d")
    assert version.data_md5 == recorded_md5(project / "data.dvc")
    assert recorded_datasets(project / "data.dvc")["d"].md5 == version.md5
    assert version.pushed and version.remote_url == str(project.parent / "p-dvc-remote")
    data_md5 = version.data_md5.removesuffix(".dir")
    remote = project.parent / "p-dvc-remote" / "files" / "md5"
    assert (remote / data_md5[:2] / f"{data_md5[2:]}.dir").is_file()


def test_folder_md5_is_what_dvc_records(project: Path):
    commit_dataset(project, "data", staged(project, "x"), record())
    meta = yaml.safe_load((project / "data.dvc").read_text())
    assert folder_md5(project / "data") == meta["outs"][0]["md5"]


def test_two_datasets_live_side_by_side(project: Path):
    first = commit_dataset(project, "data", staged(project, "one"), record("one"))
    second = commit_dataset(project, "data", staged(project, "two"), record("two"))
    datasets = recorded_datasets(project / "data.dvc")
    assert set(datasets) == {"one", "two"}
    assert datasets["one"].md5 == first.md5 and datasets["two"].md5 == second.md5
    assert first.data_md5 != second.data_md5


def test_expected_md5_mismatch_changes_nothing(project: Path):
    commit_dataset(project, "data", staged(project, "hello"), record())
    before = (project / "data.dvc").read_bytes()
    folder = staged(project, "tampered")
    with pytest.raises(DataVersionError, match="hashes to .* but data.dvc records"):
        commit_dataset(
            project,
            "data",
            folder,
            record(),
            expected_md5=recorded_datasets(project / "data.dvc")["d"].md5,
        )
    assert (project / "data.dvc").read_bytes() == before
    assert "hello" in (project / "data" / "d" / "train.csv").read_text()
    assert not folder.exists()


def test_a_recorded_dataset_missing_from_the_workspace_is_pulled(project: Path):
    commit_dataset(project, "data", staged(project, "one"), record("one"))
    shutil.rmtree(project / "data" / "one")
    commit_dataset(project, "data", staged(project, "two"), record("two"))
    assert (project / "data" / "one" / "train.csv").read_text().startswith("text,label\none")


def test_modified_other_dataset_blocks_versioning(project: Path):
    commit_dataset(project, "data", staged(project, "one"), record("one"))
    (project / "data" / "one" / "train.csv").write_text("text,label\nedited,a\n")
    with pytest.raises(
        DataVersionError, match="data/one hashes to .* restore it with `dvc checkout`"
    ):
        commit_dataset(project, "data", staged(project, "two"), record("two"))


def test_restore_an_older_version_from_cache_and_from_remote(project: Path, tmp_path: Path):
    v1 = commit_dataset(project, "data", staged(project, "old"), record())
    commit_dataset(project, "data", staged(project, "new"), record())
    out = restore_dataset(project, v1.data_md5, "d", tmp_path / "restored")
    assert (out / "train.csv").read_text() == "text,label\nold,a\n"
    assert folder_md5(out) == v1.md5
    shutil.rmtree(project / ".dvc" / "cache")
    again = restore_dataset(project, v1.data_md5, "d", tmp_path / "again")
    assert folder_md5(again) == v1.md5
    assert "new" in (project / "data" / "d" / "train.csv").read_text()  # workspace untouched
    assert not list(project.glob(".retune-restore-*"))
    with pytest.raises(DataVersionError, match="holds no dataset 'nope'"):
        restore_dataset(project, v1.data_md5, "nope", tmp_path / "x")


def test_history_reads_data_dvc_from_git(project: Path):
    v1 = commit_dataset(project, "data", staged(project, "a"), record())
    subprocess.run(["git", "-C", str(project), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "data v1"], check=True)
    v2 = commit_dataset(project, "data", staged(project, "b"), record())
    entries = history(project)
    assert [e.subject for e in entries] == ["(uncommitted)", "data v1"]
    assert entries[0].datasets == {"d": v2.md5} and entries[1].datasets == {"d": v1.md5}
    assert entries[1].data_md5 == v1.data_md5


def test_not_a_dvc_repo_says_how_to_fix(tmp_path: Path):
    with pytest.raises(DataVersionError, match="not a DVC repository.*dvc init"):
        commit_dataset(tmp_path, "data", tmp_path, record())


def test_committed_example_manifest():
    datasets = recorded_datasets(REPO_ROOT / "data.dvc")
    example = datasets["rotten-tomatoes"]
    assert example.labels == ["fresh", "rotten"]
    assert sum(example.rows.values()) == 12805  # 12,808 minus 3 cross-split duplicates
    assert example.dropped == {"cross-split near-duplicate": 3}
    assert recorded_md5(REPO_ROOT / "missing.dvc") is None


def test_dropped_rows_and_a_forced_import_round_trip_through_data_dvc(project: Path):
    forced = DatasetRecord(
        name="d",
        md5="",
        rows={"train": 1},
        labels=["a"],
        source="/somewhere/else/d.csv",
        extra={"allow_invalid": True, "failed_checks": ["all: min_rows_per_label failed " * 8]},
        dropped={"cross-split near-duplicate": 2},
    )
    commit_dataset(project, "data", staged(project, "one"), forced)
    # A second import re-adds data/ (DVC rewrites data.dvc): the first record survives it.
    commit_dataset(project, "data", staged(project, "two"), record("e"))
    back = recorded_datasets(project / "data.dvc")
    assert back["d"].dropped == {"cross-split near-duplicate": 2}
    assert back["d"].extra == forced.extra and back["d"].source == "/somewhere/else/d.csv"
    assert back["e"].dropped == {} and "dropped" not in back["e"].to_meta()
