"""The Lee similarity benchmark, the Spearman score and the before/after report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.forgetting import ForgettingReport, SimilarityTask, load_lee, similarity_spearman

# Unit vectors at these angles (degrees): all six pairwise angles differ (10, 30, 70, 20, 60, 40).
ANGLES = np.deg2rad([0.0, 10.0, 30.0, 70.0])
EMBEDDINGS = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)  # (4, 2), L2-normalised
PAIRS = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
PAIR_ANGLES = np.array([10.0, 30.0, 70.0, 20.0, 60.0, 40.0])


def task_with(scores: np.ndarray, pairs: np.ndarray = PAIRS) -> SimilarityTask:
    return SimilarityTask("tiny", ["a", "b", "c", "d"], pairs, scores)


def test_load_lee_shapes_and_ranges():
    task = load_lee()
    assert task.name == "lee"
    assert len(task.texts) == 50
    assert all(isinstance(t, str) and t for t in task.texts)
    assert task.pairs.shape == (1225, 2)
    assert task.scores.shape == (1225,)
    assert (task.pairs[:, 0] < task.pairs[:, 1]).all()
    assert len({tuple(p) for p in task.pairs}) == 1225
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


def test_spearman_is_one_when_cosine_ranks_match_the_scores():
    # Smaller angle -> larger cosine -> larger human score.
    scores = 1.0 - PAIR_ANGLES / 90.0
    assert similarity_spearman(EMBEDDINGS, task_with(scores)) == pytest.approx(1.0)


def test_spearman_is_minus_one_when_reversed():
    scores = PAIR_ANGLES / 90.0
    assert similarity_spearman(EMBEDDINGS, task_with(scores)) == pytest.approx(-1.0)


def test_spearman_hand_computed_with_one_swap():
    # Cosine ranks (1 = most similar): pairs at 10, 20, 30, 40, 60, 70 degrees.
    # Swap the human order of the 30 and 40 degree pairs: sum d^2 = 2,
    # rho = 1 - 6 * 2 / (6 * 35) = 33/35.
    rank_by_angle = {10.0: 6, 20.0: 5, 30.0: 4, 40.0: 3, 60.0: 2, 70.0: 1}
    scores = np.array([rank_by_angle[a] for a in PAIR_ANGLES], dtype=float)
    scores[PAIR_ANGLES == 30.0], scores[PAIR_ANGLES == 40.0] = 3.0, 4.0
    assert similarity_spearman(EMBEDDINGS, task_with(scores)) == pytest.approx(33 / 35)


def test_spearman_uses_only_the_listed_pairs():
    pairs = np.array([[2, 3], [0, 3], [0, 1]])  # 40, 70, 10 degrees
    assert similarity_spearman(
        EMBEDDINGS, task_with(np.array([0.5, 0.1, 0.9]), pairs)
    ) == pytest.approx(1.0)
    assert similarity_spearman(
        EMBEDDINGS, task_with(np.array([0.1, 0.5, 0.9]), pairs)
    ) == pytest.approx(0.5)


def test_forgetting_report_drop_is_base_minus_tuned():
    report = ForgettingReport("lee", base_score=0.62, tuned_score=0.5)
    assert report.drop == pytest.approx(0.12)
    assert ForgettingReport("lee", 0.5, 0.62).drop == pytest.approx(-0.12)
    assert ForgettingReport("lee", 0.4, 0.4).drop == 0.0
    assert report.to_dict() == {
        "task": "lee",
        "base_score": 0.62,
        "tuned_score": 0.5,
        "drop": pytest.approx(0.12),
    }
