"""`retune data import/list/history`: atomic imports into a real git + DVC repo."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_project
from typer.testing import CliRunner

from flows.cli import app
from pipeline.versioning import folder_md5, recorded_datasets


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "p", with_data_dvc=False)


def snapshot(project: Path) -> dict[str, bytes]:
    """Every file that an import may touch: data/, data.dvc, the DVC cache, the remote."""
    roots = [project / "data", project / ".dvc" / "cache", project.parent / "p-dvc-remote"]
    files = {
        str(p): p.read_bytes()
        for root in roots
        if root.exists()
        for p in root.rglob("*")
        if p.is_file()
    }
    dvc_file = project / "data.dvc"
    files["data.dvc"] = dvc_file.read_bytes() if dvc_file.exists() else b"<absent>"
    return files


def reviews_csv(path: Path, n: int = 30, bad: str | None = None) -> Path:
    rows = ["review,sentiment,film"]
    for i in range(n):
        rows.append(f"a fine film {i},pos,f{i}")
        rows.append(f"a dull film {i},neg,f{i}")
    if bad is not None:
        rows.append(bad)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def data_import(project: Path, path: str, *extra: str):
    args = [
        "data",
        "import",
        path,
        "--name",
        "reviews",
        "--text-col",
        "review",
        "--label-col",
        "sentiment",
        "--group-col",
        "film",
        "--project-dir",
        str(project),
        *extra,
    ]
    return CliRunner().invoke(app, args)


def test_import_versions_pushes_and_lists(project: Path):
    reviews_csv(project / "reviews.csv")
    result = data_import(project, "reviews.csv")
    assert result.exit_code == 0, result.output
    record = recorded_datasets(project / "data.dvc")["reviews"]
    assert record.md5 == folder_md5(project / "data" / "reviews")
    assert f"md5: {record.md5}" in result.output
    assert sum(record.rows.values()) == 60 and record.labels == ["neg", "pos"]
    assert sorted(p.name for p in (project / "data" / "reviews").iterdir()) == [
        "test.csv",
        "train.csv",
        "validation.csv",
    ]
    remote = project.parent / "p-dvc-remote"
    dir_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(
        ".dir"
    )
    assert (remote / "files" / "md5" / dir_md5[:2] / f"{dir_md5[2:]}.dir").is_file()

    listed = CliRunner().invoke(app, ["data", "list", "--project-dir", str(project)])
    assert listed.exit_code == 0
    assert "reviews" in listed.output and record.md5[:20] in listed.output and "ok" in listed.output

    before = snapshot(project)
    again = data_import(project, "reviews.csv")
    assert again.exit_code == 0
    assert snapshot(project)["data.dvc"] == before["data.dvc"]  # same content, same version


def test_history_lists_each_committed_version(project: Path):
    reviews_csv(project / "reviews.csv", n=30)
    assert data_import(project, "reviews.csv").exit_code == 0
    first = recorded_datasets(project / "data.dvc")["reviews"].md5
    subprocess.run(["git", "-C", str(project), "add", "data.dvc", ".gitignore"], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "reviews v1"], check=True)
    reviews_csv(project / "reviews.csv", n=31)
    assert data_import(project, "reviews.csv").exit_code == 0
    second = recorded_datasets(project / "data.dvc")["reviews"].md5
    assert first != second

    result = CliRunner().invoke(app, ["data", "history", "--project-dir", str(project)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "working" in text and "reviews v1" in text
    assert text.index(second[:12]) < text.index(first[:12])  # newest first


BAD_INPUTS = [
    ("missing", None, [], r"data file .*nothere\.csv does not exist"),
    ("empty", b"", [], r"data file .*empty\.csv is empty"),
    ("header only", b"review,sentiment,film\n", [], r"header\.csv has no data rows"),
    (
        "latin-1 bytes",
        "review,sentiment,film\ngood,pos,a\ncaf\u00e9,neg,b\n".encode("latin-1"),
        [],
        r"not valid utf-8: byte 0xe9 at line 3; pass the file's encoding, e.g. --encoding latin-1",
    ),
    (
        "ragged row",
        b"review,sentiment,film\ngood,pos,a\nbad,neg,b,extra\n",
        [],
        r"line 3 has 4 fields, the header has 3",
    ),
    (
        "short row",
        b"review,sentiment,film\ngood,pos\n",
        [],
        r"line 2 has 2 fields, the header has 3",
    ),
    (
        "unclosed quote",
        b'review,sentiment,film\ngood,pos,a\n"never closed,neg,b\n',
        [],
        r"malformed CSV from line 3",
    ),
    (
        "misspelled column",
        b"reveiw,sentiment,film\ngood,pos,a\n",
        [],
        r"column 'review' missing in .*; found: reveiw, sentiment, film\. Did you mean 'reveiw'\?",
    ),
    (
        "text too long",
        b"review,sentiment,film\ngood,pos,a\n" + b"x" * 50 + b",neg,b\n",
        ["--max-text-bytes", "40"],
        r"line 3, field 'review': text of 50 bytes exceeds data\.max_text_bytes=40",
    ),
]


@pytest.mark.parametrize(
    ("case", "content", "extra", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_csv_is_refused_and_nothing_changes(project: Path, case, content, extra, expected):
    reviews_csv(project / "good.csv")
    assert data_import(project, "good.csv").exit_code == 0  # an existing version to protect
    name = {"missing": "nothere.csv", "empty": "empty.csv", "header only": "header.csv"}.get(
        case, "bad.csv"
    )
    if content is not None:
        (project / name).write_bytes(content)
    before = snapshot(project)
    result = data_import(project, name, *extra)
    assert result.exit_code == 1
    assert result.output.startswith("error: ")
    assert re.search(expected, result.output), result.output
    assert snapshot(project) == before


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (0.5, r"line 2, field 'sentiment': label 0\.5 is a float"),
        ([1], r"label \[1\] is a list"),
        (True, r"label True is a bool"),
    ],
)
def test_labels_must_be_strings_or_integers(project: Path, label, expected):
    path = project / "bad.jsonl"
    lines = [
        {"review": "ok", "sentiment": "pos", "film": "a"},
        {"review": "hm", "sentiment": label, "film": "b"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    before = snapshot(project)
    result = data_import(project, "bad.jsonl")
    assert result.exit_code == 1
    assert re.search(expected, result.output), result.output
    assert snapshot(project) == before


def test_integer_labels_are_accepted(project: Path):
    path = project / "ints.parquet"
    pd.DataFrame(
        {
            "review": [f"t{i}" for i in range(40)],
            "sentiment": [i % 2 for i in range(40)],
            "film": [f"f{i}" for i in range(40)],
        }
    ).to_parquet(path)
    assert data_import(project, "ints.parquet").exit_code == 0
    assert recorded_datasets(project / "data.dvc")["reviews"].labels == ["0", "1"]


def test_paths_outside_the_project_are_refused(project: Path, tmp_path: Path):
    outside = reviews_csv(tmp_path / "outside.csv")
    before = snapshot(project)
    result = data_import(project, str(outside))
    assert result.exit_code == 1
    assert (
        "outside the project" in result.output and "copy it into the project first" in result.output
    )
    traversal = data_import(project, "../outside.csv")
    assert traversal.exit_code == 1 and "outside the project" in traversal.output
    reviews_csv(project / "ok.csv")
    bad_name = CliRunner().invoke(
        app,
        [
            "data",
            "import",
            "ok.csv",
            "--name",
            "../../etc",
            "--text-col",
            "review",
            "--label-col",
            "sentiment",
            "--project-dir",
            str(project),
        ],
    )
    assert bad_name.exit_code == 1 and "dataset name '../../etc' is not allowed" in bad_name.output
    assert snapshot(project) == before


def test_failed_push_rolls_back_data_cache_and_dvc_file(project: Path):
    reviews_csv(project / "reviews.csv", n=30)
    assert data_import(project, "reviews.csv").exit_code == 0
    before = snapshot(project)
    # Make the remote unwritable for DVC: replace its folder by a plain file.
    remote = project.parent / "p-dvc-remote"
    subprocess.run(["rm", "-rf", str(remote)], check=True)
    remote.write_text("not a folder", encoding="utf-8")
    reviews_csv(project / "reviews.csv", n=31)
    result = data_import(project, "reviews.csv")
    assert result.exit_code == 1
    assert "DVC failed to version data/" in result.output
    remote.unlink()
    after = snapshot(project)
    before_local = {k: v for k, v in before.items() if "p-dvc-remote" not in k}
    assert after == before_local


def test_unreadable_parquet_is_refused(project: Path):
    (project / "broken.parquet").write_bytes(b"PAR1 this is not really parquet")
    before = snapshot(project)
    result = data_import(project, "broken.parquet")
    assert result.exit_code == 1
    assert "broken.parquet could not be read as Parquet" in result.output
    assert snapshot(project) == before
