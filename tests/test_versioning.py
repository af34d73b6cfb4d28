"""DVC versioning in a real git + DVC repo with a local remote."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import make_project

from pipeline.versioning import DataVersionError, recorded_md5, version_data


def write_data(project: Path, text: str) -> None:
    (project / "data").mkdir(exist_ok=True)
    (project / "data" / "train.csv").write_text(f"text,label\n{text},a\n", encoding="utf-8")


@pytest.fixture
def empty_project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "p", with_data_dvc=False)


def test_version_data_writes_dvc_file_and_pushes_to_the_remote(empty_project: Path):
    write_data(empty_project, "hello")
    version = version_data(empty_project, "data")
    assert version.md5.endswith(".dir")
    assert recorded_md5(empty_project / "data.dvc") == version.md5
    assert version.n_files == 1 and version.pushed
    remote = empty_project.parent / "p-dvc-remote"
    md5 = version.md5.removesuffix(".dir")
    assert (remote / "files" / "md5" / md5[:2] / (md5[2:] + ".dir")).is_file()


def test_same_content_gives_same_md5_and_new_content_a_new_one(empty_project: Path):
    write_data(empty_project, "hello")
    first = version_data(empty_project, "data", push=False).md5
    write_data(empty_project, "hello")
    assert version_data(empty_project, "data", expected_md5=first, push=False).md5 == first
    write_data(empty_project, "changed")
    assert version_data(empty_project, "data", push=False).md5 != first


def test_mismatch_with_expected_md5_restores_the_dvc_file(empty_project: Path):
    write_data(empty_project, "hello")
    version_data(empty_project, "data", push=False)
    before = (empty_project / "data.dvc").read_bytes()
    write_data(empty_project, "tampered")
    with pytest.raises(DataVersionError, match="hashes to .* but data.dvc records"):
        version_data(empty_project, "data", expected_md5=recorded_md5(empty_project / "data.dvc"))
    assert (empty_project / "data.dvc").read_bytes() == before


def test_not_a_dvc_repo_says_how_to_fix(tmp_path: Path):
    write_data(tmp_path, "x")
    with pytest.raises(DataVersionError, match="not a DVC repository.*dvc init"):
        version_data(tmp_path, "data")


def test_recorded_md5_of_the_committed_example():
    committed = Path(__file__).resolve().parents[1] / "data.dvc"
    meta = yaml.safe_load(committed.read_text())
    assert recorded_md5(committed) == meta["outs"][0]["md5"]
    assert meta["outs"][0]["nfiles"] == 3
    assert recorded_md5(committed.parent / "missing.dvc") is None
