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


def reviews_csv(path: Path, n: int = 80, bad: str | None = None) -> Path:
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
    assert sum(record.rows.values()) == 160 and record.labels == ["neg", "pos"]
    assert record.source == "reviews.csv" and record.dropped == {}  # inside: relative
    assert "read 160 rows; none dropped" in result.output
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
    reviews_csv(project / "reviews.csv", n=80)
    assert data_import(project, "reviews.csv").exit_code == 0
    first = recorded_datasets(project / "data.dvc")["reviews"].md5
    subprocess.run(["git", "-C", str(project), "add", "data.dvc", ".gitignore"], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "reviews v1"], check=True)
    reviews_csv(project / "reviews.csv", n=81)
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
        r"column 'review' missing in .*; found: reveiw, sentiment, film\. Did you mean 'reveiw'\? "
        r"Set --text-col to",
    ),
    (
        "text too long",
        b"review,sentiment,film\ngood,pos,a\n" + b"x" * 50 + b",neg,b\n",
        ["--max-text-bytes", "40"],
        r"line 3, field 'review': text of 50 bytes exceeds the safety limit --max-text-bytes=40",
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
            "review": [f"text {i}" for i in range(200)],
            "sentiment": [i % 2 for i in range(200)],
            "film": [f"f{i}" for i in range(200)],
        }
    ).to_parquet(path)
    assert data_import(project, "ints.parquet").exit_code == 0
    assert recorded_datasets(project / "data.dvc")["reviews"].labels == ["0", "1"]


def test_a_file_outside_the_project_imports_and_records_its_absolute_path(
    project: Path, tmp_path: Path
):
    outside = reviews_csv(tmp_path / "outside.csv")
    result = data_import(project, "../outside.csv")  # relative to --project-dir
    assert result.exit_code == 0, result.output
    record = recorded_datasets(project / "data.dvc")["reviews"]
    assert record.source == str(outside.resolve())
    assert record.md5 == folder_md5(project / "data" / "reviews")
    before = snapshot(project)
    bad_name = CliRunner().invoke(
        app,
        [
            "data",
            "import",
            str(outside),
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
    reviews_csv(project / "reviews.csv", n=80)
    assert data_import(project, "reviews.csv").exit_code == 0
    before = snapshot(project)
    # Make the remote unwritable for DVC: replace its folder by a plain file.
    remote = project.parent / "p-dvc-remote"
    subprocess.run(["rm", "-rf", str(remote)], check=True)
    remote.write_text("not a folder", encoding="utf-8")
    reviews_csv(project / "reviews.csv", n=81)
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


# --- validate before versioning, dropped rows, flags in messages, long news articles ----------


def split_of(group: str) -> str:
    from pipeline.data import split_by_group

    return str(split_by_group(pd.DataFrame({"group": [group]}), 0.15, 0.15)["split"].iloc[0])


def one_group_csv(path: Path) -> Path:
    """50 rows in one train-bound group: validation and test get no rows at all."""
    film = next(f"film {i}" for i in range(100) if split_of(f"film {i}") == "train")
    rows = ["review,sentiment,film"]
    rows += [f"review number {i},{'pos' if i % 2 else 'neg'},{film}" for i in range(50)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_a_file_failing_error_checks_is_refused_and_nothing_changes(project: Path):
    reviews_csv(project / "good.csv")
    assert data_import(project, "good.csv").exit_code == 0  # an existing version to protect
    one_group_csv(project / "small.csv")
    before = snapshot(project)
    result = data_import(project, "small.csv")
    assert result.exit_code == 1, result.output
    assert snapshot(project) == before
    out = result.output
    assert f"error: {project / 'small.csv'} was not imported: " in out
    assert "nothing was written" in out and "--allow-invalid" in out
    assert "min_rows_per_label" in out and "validation/neg: 0 rows" in out
    assert "limit validation.min_rows_per_label=5 (change: add rows for these labels" in (
        " ".join(out.split())
    )
    assert "train on it" not in out and "as dataset 'reviews'" not in out
    # The page a user opens offline shows the failed check with its rows.
    page = project / "reports" / "import" / "reviews" / "validation.html"
    assert f"validation report: {page}" in " ".join(out.split())
    html = page.read_text(encoding="utf-8")
    assert "min_rows_per_label" in html and "validation/neg: 0 rows" in html


def test_allow_invalid_versions_it_and_records_the_failed_checks(project: Path):
    one_group_csv(project / "small.csv")
    result = data_import(project, "small.csv", "--allow-invalid")
    assert result.exit_code == 0, result.output
    record = recorded_datasets(project / "data.dvc")["reviews"]
    assert record.rows == {"train": 50, "validation": 0, "test": 0}
    assert record.extra["allow_invalid"] is True
    failed = record.extra["failed_checks"]
    assert any(line.startswith("all: min_rows_per_label") for line in failed), failed
    assert any("labels_in_every_split" in line for line in failed), failed
    assert "train on it" not in result.output
    assert "versioned despite failed error-level checks" in result.output


def test_the_given_labels_are_checked(project: Path):
    reviews_csv(project / "reviews.csv")
    before = snapshot(project)
    result = data_import(project, "reviews.csv", "--labels", "pos,meh")
    assert result.exit_code == 1
    assert snapshot(project) == before
    out = " ".join(result.output.split())
    assert "label_set" in out and "e.g. ['neg'" in out
    # Named as the user sets it here: --labels, which overrides any --set data.labels.
    assert "limit --labels pos,meh" in out and "change: --labels pos,meh,neg" in out
    assert "data.labels" not in out
    # A limit changed with --set is the one applied.
    relaxed = data_import(
        project, "reviews.csv", "--set", "validation.min_rows_per_label=1000", "--labels", "pos,neg"
    )
    assert relaxed.exit_code == 1 and "validation.min_rows_per_label=1000" in relaxed.output


def test_import_errors_name_its_flags(project: Path):
    (project / "bad.csv").write_bytes(b"reveiw,sentiment,film\ngood,pos,a\n")
    result = data_import(project, "bad.csv")
    assert result.exit_code == 1
    assert "Did you mean 'reveiw'? Set --text-col to the column holding the text." in result.output
    assert "data.text_column" not in result.output
    (project / "nogroup.csv").write_bytes(b"review,sentiment,movie\ngood,pos,a\n")
    missing_group = data_import(project, "nogroup.csv")
    assert "Set --group-col to the column holding the group." in missing_group.output


TOPICS = {
    "business": "market shares profit company bank economy investors growth sales deal",
    "sport": "match team goal season coach player league win cup championship",
    "politics": "minister election party government vote labour parliament policy campaign",
    "tech": "software users mobile internet computer data network phone digital online",
    "entertainment": "film music award actor band album festival star director show",
}
COMMON = (
    "the a of to and in that is for on with as was it by at from said he she they this "
    "which have has been but not its their will would year people new more also one"
).split()


def news_csv(path: Path) -> tuple[Path, int]:
    """2,225 articles in 5 topics, most 2,000-25,000 characters, 2 of them cross-split copies.

    Returns the file and how many articles are longer than 2,000 characters.
    """
    import random

    rng = random.Random(0)
    rows, long = [], 0
    ids = iter(f"a{i}" for i in range(10_000))
    for n in range(2_223):
        topic = list(TOPICS)[n % 5]
        words = TOPICS[topic].split()
        size = rng.randint(2_000, 25_000) if rng.random() < 0.7 else rng.randint(300, 1_900)
        long += size > 2_000
        text, parts = f"Article {n} on {topic}.", []
        length = len(text)
        while length < size:
            word = rng.choice(words) if rng.random() < 0.3 else rng.choice(COMMON)
            parts.append(word)
            length += len(word) + 1
        rows.append({"id": next(ids), "topic": topic, "body": text + " " + " ".join(parts)})
    frame = pd.DataFrame(rows)
    # Two copies of train articles under new ids that land in validation or test.
    train_rows = frame[frame["id"].map(split_of) == "train"].head(2)
    fresh = [f"copy{i}" for i in range(500) if split_of(f"copy{i}") != "train"][:2]
    copies = train_rows.assign(id=fresh, body=train_rows["body"].str.upper())
    pd.concat([frame, copies]).to_csv(path, index=False)
    return path, long


def test_a_news_corpus_of_long_articles_imports_from_outside_with_warnings(
    project: Path, tmp_path: Path
):
    from pipeline.data import DROP_CROSS_SPLIT
    from pipeline.lineage import git_state

    (tmp_path / "downloads").mkdir()
    source, long = news_csv(tmp_path / "downloads" / "news.csv")
    assert long > 1_400  # many articles over 2,000 characters (up to 25,000)
    args = ["--text-col", "body", "--label-col", "topic", "--group-col", "id"]
    result = CliRunner().invoke(
        app,
        ["data", "import", str(source), "--name", "news", *args, "--project-dir", str(project)],
    )
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"read 2225 rows; dropped 2: - 2 rows: {DROP_CROSS_SPLIT} (its text" in out
    assert "truncated" in out and "tokens: the model sees only their first 128" in out
    assert "[warn]" in out and "train on it: retune run --set data.source=dataset:news" in out
    record = recorded_datasets(project / "data.dvc")["news"]
    assert sum(record.rows.values()) == 2_223
    assert record.dropped == {DROP_CROSS_SPLIT: 2}
    assert record.source == str(source)
    assert record.labels == sorted(TOPICS)
    # Untracked files that are not code (data.dvc, .gitignore, a copied CSV) leave it clean.
    (project / "news-copy.csv").write_bytes(source.read_bytes()[:1000])
    status = subprocess.run(
        ["git", "-C", str(project), "status", "--porcelain"], capture_output=True, text=True
    ).stdout
    assert "?? news-copy.csv" in status and "?? data.dvc" in status
    assert not git_state(project).dirty
    (project / "tweak.py").write_text("x = 1\n", encoding="utf-8")
    state = git_state(project)
    assert state.dirty and state.dirty_files == ("tweak.py",)
