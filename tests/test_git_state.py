"""Which files make a git tree dirty in the lineage record (a real git repo, no MLflow)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import make_project

from pipeline.lineage import GitState, dirty_files, git_state


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True)


def test_untracked_data_and_dvc_pointers_leave_the_tree_clean(tmp_path: Path):
    project = make_project(tmp_path / "p")
    (project / "downloaded.csv").write_text("text,label\nhi,a\n", encoding="utf-8")
    (project / "notes.md").write_text("# notes\n", encoding="utf-8")
    for output in (
        "runs/r1/report.json",
        "mlflow/1/m/artifacts/code/pipeline/x.py",
        ".prefect/p.toml",
    ):
        (project / output).parent.mkdir(parents=True)
        (project / output).write_text("{}", encoding="utf-8")
    (project / "data.dvc").write_text("outs: []\n", encoding="utf-8")  # tracked: an import
    with (project / ".gitignore").open("a", encoding="utf-8") as f:
        f.write("/data\n")
    state = git_state(project)
    assert (state.dirty, state.dirty_files, state.dirty_files_tag()) == (False, (), "none")


def test_code_untracked_or_changed_makes_it_dirty_and_is_named(tmp_path: Path):
    project = make_project(tmp_path / "p")
    (project / "flows").mkdir()
    (project / "flows" / "extra.py").write_text("x = 1\n", encoding="utf-8")
    (project / "extra.yaml").write_text("an untracked config: not code\n", encoding="utf-8")
    (project / "retune.yaml").write_text("train: {epochs: 1}\n", encoding="utf-8")
    git(project, "add", "retune.yaml")
    git(project, "commit", "-qm", "config")
    (project / "retune.yaml").write_text("train: {epochs: 3}\n", encoding="utf-8")
    (project / "README").write_text("tracked, not code, but changed\n", encoding="utf-8")
    git(project, "add", "README")
    state = git_state(project)
    assert state.dirty
    assert state.dirty_files == ("README", "flows/extra.py", "retune.yaml")
    assert state.dirty_files_tag() == "README, flows/extra.py, retune.yaml"


def test_porcelain_renames_and_a_long_list():
    porcelain = "R  new.py\0old.py\0?? data.csv\0 M pipeline/a.py\0?? b.py\0!! ignored.py\0"
    assert dirty_files(porcelain) == ["b.py", "new.py", "pipeline/a.py"]
    many = GitState("abc", True, tuple(f"f{i}.py" for i in range(25)))
    assert many.dirty_files_tag().endswith("f19.py (+5 more)")


def test_outside_a_git_repo_the_state_is_unknown(tmp_path: Path):
    assert git_state(tmp_path) == GitState("unknown", False)
