"""Forgetting arithmetic: scores, paired bootstrap, gate, CKA, cache and WiSE-FT on tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from pipeline import forgetting, mitigation
from pipeline.config import ForgettingConfig
from pipeline.embeddings import embed_layers, embed_texts
from pipeline.forgetting import (
    TaskOutputs,
    compare,
    forgetting_gate,
    layer_cka,
    linear_cka,
    score_encoder,
    score_task,
)
from pipeline.retention_tasks import RetentionTask

# Unit vectors at these angles (degrees): all six pairwise angles differ (10, 30, 70, 20, 60, 40).
ANGLES = np.deg2rad([0.0, 10.0, 30.0, 70.0])
EMBEDDINGS = np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)  # (4, 2), L2-normalised
PAIRS = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
PAIR_ANGLES = np.array([10.0, 30.0, 70.0, 20.0, 60.0, 40.0])
WORDS = (
    "cat dog horse cow sheep car bus train plane boat apple pear plum grape lemon red blue "
    "green black white king queen prince river lake ocean hill mountain valley city town"
).split()


def similarity(name: str, texts: list[str], pairs: np.ndarray, scores: np.ndarray):
    return RetentionTask(name, "similarity", "test", texts, pairs=pairs, scores=scores)


def test_similarity_score_is_the_spearman_of_cosines():
    human = 1.0 - PAIR_ANGLES / 90.0  # smaller angle -> larger cosine -> larger score
    task = similarity("tiny", ["a", "b", "c", "d"], PAIRS, human)
    out = score_task(EMBEDDINGS, task)
    assert out.score == pytest.approx(1.0)
    assert out.items == pytest.approx(np.cos(np.deg2rad(PAIR_ANGLES)))
    reversed_task = similarity("tiny", ["a", "b", "c", "d"], PAIRS, -human)
    assert score_task(EMBEDDINGS, reversed_task).score == pytest.approx(-1.0)
    # Agrees with scipy on scores that rank the cosines otherwise (one swap: 1 - 6*2/210).
    swapped = human.copy()
    swapped[[0, 3]] = swapped[[3, 0]]  # the 10- and 20-degree pairs trade places
    out = score_task(EMBEDDINGS, similarity("tiny", ["a", "b", "c", "d"], PAIRS, swapped))
    cosine = np.cos(np.deg2rad(PAIR_ANGLES))
    assert out.score == pytest.approx(spearmanr(cosine, swapped).statistic)
    assert out.score == pytest.approx(1 - 6 * 2 / (6 * 35))


def test_row_wise_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(4, 30)).astype(float)  # many ties
    y = rng.normal(size=(4, 30))
    expected = [spearmanr(a, b).statistic for a, b in zip(x, y, strict=True)]
    assert forgetting._spearman(x, y) == pytest.approx(expected)
    assert np.isnan(forgetting._spearman(np.ones((1, 5)), y[:1, :5])[0])


def test_probe_score_is_test_accuracy_of_a_logistic_regression():
    # Two clusters, perfectly separable: accuracy 1; labels shuffled in the test part: lower.
    rng = np.random.default_rng(0)
    emb = np.concatenate([rng.normal(3, 0.1, (20, 4)), rng.normal(-3, 0.1, (20, 4))])
    labels = np.array([0] * 20 + [1] * 20)
    is_test = np.zeros(40, dtype=bool)
    is_test[[0, 1, 2, 3, 20, 21, 22, 23]] = True
    task = RetentionTask(
        "p",
        "probe",
        "test",
        [str(i) for i in range(40)],
        labels=labels,
        is_test=is_test,
        label_names=("a", "b"),
    )
    out = score_task(emb, task)
    assert out.score == 1.0 and out.items.tolist() == [1.0] * 8
    flipped = labels.copy()
    flipped[[0, 1]] = 1  # two test rows now carry the wrong cluster's label
    out = score_task(emb, RetentionTask(**{**task.__dict__, "labels": flipped}))
    assert out.score == pytest.approx(6 / 8)


def test_paired_bootstrap_drop_matches_a_hand_computation():
    task = RetentionTask(
        "p",
        "probe",
        "test",
        ["x"] * 4,
        labels=np.zeros(4, int),
        is_test=np.ones(4, bool),
        label_names=("a",),
    )
    base = TaskOutputs("p", np.array([1.0, 1.0, 1.0, 0.0]), 0.75)
    cand = TaskOutputs("p", np.array([1.0, 0.0, 1.0, 0.0]), 0.5)
    drops = forgetting.bootstrap_drops(task, base, cand, 5, np.random.default_rng(7))
    idx = np.random.default_rng(7).integers(0, 4, size=(5, 4))
    # The drop on a resample is the share of resampled items where only the base was right.
    assert drops == pytest.approx((idx == 1).mean(axis=1))
    result = compare({"p": base}, {"p": cand}, [task], resamples=2000)
    row = result.tasks[0]
    assert row.drop == pytest.approx(0.25) and row.retention == pytest.approx(2 / 3)
    assert row.ci_low == pytest.approx(0.0) and 0.5 <= row.ci_high <= 0.75
    assert result.mean_drop == pytest.approx(0.25) and result.worst_task == "p"


def test_mean_drop_and_worst_task_over_several_tasks():
    human = 1.0 - PAIR_ANGLES / 90.0
    a = similarity("a", ["a", "b", "c", "d"], PAIRS, human)
    b = similarity("b", ["a", "b", "c", "d"], PAIRS, human)
    base = {"a": score_task(EMBEDDINGS, a), "b": score_task(EMBEDDINGS, b)}
    worse = EMBEDDINGS[[0, 2, 1, 3]]  # swaps two texts: ranks change on task b only
    cand = {"a": score_task(EMBEDDINGS, a), "b": score_task(worse, b)}
    result = compare(base, cand, [a, b], resamples=500)
    drop_b = 1.0 - spearmanr(score_task(worse, b).items, human).statistic
    assert result.tasks[0].drop == 0.0
    assert result.tasks[1].drop == pytest.approx(drop_b)
    assert result.mean_drop == pytest.approx(drop_b / 2)
    assert result.worst_task == "b" and result.worst_drop == pytest.approx(drop_b)


def test_compare_rejects_outputs_from_another_suite_version():
    task = similarity("a", ["a", "b", "c", "d"], PAIRS, PAIR_ANGLES)
    ref = TaskOutputs("a", np.zeros(6), 0.1)
    with pytest.raises(ValueError, match="'a': the reference has 6 items, the candidate 5"):
        compare({"a": ref}, {"a": TaskOutputs("a", np.zeros(5), 0.1)}, [task])


def _comparison(drops: list[float], ci_high: float) -> forgetting.Comparison:
    rows = [
        forgetting.TaskDrop(f"t{i}", "similarity", "spearman", 10, 0.5, 0.5 - d, d, 1, d - 0.01, d)
        for i, d in enumerate(drops)
    ]
    worst = max(rows, key=lambda r: r.drop)
    return forgetting.Comparison(
        "base", rows, float(np.mean(drops)), 0.0, ci_high, worst.task, worst.drop
    )


def test_gate_passes_within_limits_and_names_each_failure():
    config = ForgettingConfig()
    assert forgetting_gate(_comparison([0.01, 0.0], ci_high=0.02), config).passed
    verdict = forgetting_gate(_comparison([0.01, 0.08], ci_high=0.06), config)
    assert not verdict.passed and verdict.refused
    assert len(verdict.failures) == 2
    assert "upper bound above 0.020" in verdict.failures[0]
    assert verdict.failures[1].startswith("t1: spearman 0.500 -> 0.420, drop 0.080")
    assert "refused: " in verdict.summary()
    warn = forgetting_gate(_comparison([0.08], 0.08), config.model_copy(update={"gate": "warn"}))
    assert not warn.passed and not warn.refused and warn.summary().startswith("warning: ")
    off = forgetting_gate(_comparison([0.5], 0.5), config.model_copy(update={"gate": "off"}))
    assert off.passed and off.summary() == "off"
    limits = config.model_copy(update={"max_mean_drop": 0.1, "max_task_drop": 0.1})
    assert forgetting_gate(_comparison([0.08], 0.08), limits).passed


def test_linear_cka_hand_values_and_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # rotation and scale
    # Hand-computed: x = [[1,0],[0,1],[-1,-1]] (centred), y = x[:, :1]:
    # ||y'x||^2 = 2^2 + 1^2 = 5, ||x'x|| = ||[[2,1],[1,2]]|| = sqrt(10), ||y'y|| = 2.
    small = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    assert linear_cka(small, small[:, :1]) == pytest.approx(5 / (np.sqrt(10) * 2))
    assert linear_cka(x, rng.normal(size=(50, 8))) < 0.5
    with pytest.raises(ValueError, match="same layers and texts"):
        layer_cka(np.zeros((3, 5, 4)), np.zeros((3, 6, 4)))


# --- tiny models: the measure end to end --------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_base_model: Path):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(tiny_base_model), AutoTokenizer.from_pretrained(
        tiny_base_model
    )


@pytest.fixture(scope="module")
def self_defined_tasks(tiny) -> list[RetentionTask]:
    """Tasks whose answers are the tiny base model's own: base scores 1.0 by construction."""
    encoder, tokenizer = tiny
    emb = embed_texts(encoder, tokenizer, WORDS, max_length=16)
    rows, cols = np.triu_indices(len(WORDS), k=1)
    pairs = np.stack([rows, cols], axis=1)
    sim = similarity("words", WORDS, pairs, (emb[rows] * emb[cols]).sum(1).astype(np.float64))
    centred = emb - emb.mean(0)
    direction = np.linalg.svd(centred, full_matrices=False)[2][0]
    labels = (centred @ direction > 0).astype(np.int64)  # the base's first principal axis
    probe = RetentionTask(
        "axis",
        "probe",
        "test",
        WORDS,
        labels=labels,
        is_test=np.arange(len(WORDS)) % 3 == 0,
        label_names=("neg", "pos"),
    )
    return [sim, probe]


def test_identical_models_give_zero_drop_and_pass(tiny, self_defined_tasks):
    encoder, tokenizer = tiny
    base = score_encoder(encoder, tokenizer, self_defined_tasks, max_length=16)
    again = score_encoder(encoder, tokenizer, self_defined_tasks, max_length=16)
    assert base["words"].score == pytest.approx(1.0)
    report = forgetting.evaluate_forgetting(
        base, again, self_defined_tasks, ForgettingConfig(bootstrap=200), "md5"
    )
    for row in report.base.tasks:
        assert (row.drop, row.ci_low, row.ci_high, row.retention) == (0.0, 0.0, 0.0, 1.0)
    assert report.base.mean_drop == 0.0 and report.base.mean_ci_high == 0.0
    assert report.gate.passed


def test_scrambled_weights_give_a_large_drop_and_fail_the_gate(tiny, self_defined_tasks):
    import copy

    encoder, tokenizer = tiny
    scrambled = copy.deepcopy(encoder)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in scrambled.parameters():
            flat = p.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=gen)])
    base = score_encoder(encoder, tokenizer, self_defined_tasks, max_length=16)
    cand = score_encoder(scrambled, tokenizer, self_defined_tasks, max_length=16)
    report = forgetting.evaluate_forgetting(
        base, cand, self_defined_tasks, ForgettingConfig(bootstrap=200), "md5"
    )
    words = report.base.tasks[0]
    assert words.drop > 0.5 and words.ci_low > 0.3
    assert report.base.mean_ci_high > 0.02
    assert report.gate.refused
    assert any(f.startswith("words: spearman 1.000 -> ") for f in report.gate.failures)


def test_alpha_zero_reproduces_the_base_scores_exactly(tiny, self_defined_tasks, tiny_base_model):
    from transformers import AutoModelForSequenceClassification

    encoder, tokenizer = tiny
    base_state = {n: t.clone() for n, t in encoder.state_dict().items()}
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base_model, num_labels=2)
    with torch.no_grad():  # "fine-tuning": move every encoder weight
        for p in model.base_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tuned = mitigation.encoder_state(model)
    head = model.classifier.weight.detach().clone()
    base = score_encoder(encoder, tokenizer, self_defined_tasks, max_length=16)

    mitigation.interpolate_encoder(model, base_state, tuned, 0.0)
    blended = score_encoder(model.base_model, tokenizer, self_defined_tasks, max_length=16)
    for name in base:
        assert blended[name].score == base[name].score
        assert np.array_equal(blended[name].items, base[name].items)
    assert torch.equal(model.classifier.weight, head)  # the head is never blended

    mitigation.interpolate_encoder(model, base_state, tuned, 0.5)
    name = "encoder.layer.0.attention.self.query.weight"
    expected = (base_state[name] + tuned[name]) / 2
    assert torch.allclose(model.base_model.state_dict()[name], expected, atol=1e-7)
    mitigation.interpolate_encoder(model, base_state, tuned, 1.0)
    assert torch.equal(model.base_model.state_dict()[name], tuned[name])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        mitigation.interpolate_encoder(model, base_state, tuned, 1.5)


def test_layer_cka_is_one_for_the_same_encoder_and_lower_after_change(tiny):
    import copy

    encoder, tokenizer = tiny
    layers = embed_layers(encoder, tokenizer, WORDS, max_length=16)
    assert layers.shape == (3, len(WORDS), 32)  # embeddings + 2 layers
    assert layer_cka(layers, layers) == pytest.approx([1.0, 1.0, 1.0])
    changed = copy.deepcopy(encoder)
    with torch.no_grad():
        torch.manual_seed(3)
        for p in changed.encoder.layer[1].parameters():
            p.copy_(torch.randn_like(p))
    cka = layer_cka(layers, embed_layers(changed, tokenizer, WORDS, max_length=16))
    assert cka[0] == pytest.approx(1.0) and cka[1] == pytest.approx(1.0)  # below the change
    assert cka[2] < 0.99


def test_cache_round_trip_and_key(tmp_path: Path, self_defined_tasks):
    outputs = {
        "words": TaskOutputs("words", np.arange(5.0), 0.25),
        "axis": TaskOutputs("axis", np.array([1.0, 0.0]), 0.5),
    }
    path = forgetting.cache_file(tmp_path, "ab" * 32, "3f2a.dir")
    assert path.name == f"retention-{'ab' * 10}-3f2a_dir.npz"
    assert forgetting.load_cached(path, self_defined_tasks) is None
    forgetting.save_cached(path, outputs, np.ones((2, 3, 4)))
    loaded, layers = forgetting.load_cached(path, self_defined_tasks)
    assert loaded["words"].score == 0.25 and loaded["axis"].items.tolist() == [1.0, 0.0]
    assert layers.shape == (2, 3, 4)
    other = [*self_defined_tasks, similarity("new", ["a", "b"], np.array([[0, 1]]), np.ones(1))]
    assert forgetting.load_cached(path, other) is None  # a task the cache does not hold


def test_report_dict_metrics_and_table(tiny, self_defined_tasks):
    encoder, tokenizer = tiny
    base = score_encoder(encoder, tokenizer, self_defined_tasks, max_length=16)
    report = forgetting.evaluate_forgetting(
        base,
        base,
        self_defined_tasks,
        ForgettingConfig(bootstrap=100),
        "md5",
        champion=base,
        champion_version="3",
        warnings=["brown skipped"],
    )
    body = report.to_dict()
    assert body["gate"]["summary"] == "passed" and body["gate"]["refused"] is False
    assert body["champion"]["reference"] == "champion v3"
    assert body["warnings"] == ["brown skipped"]
    metrics = report.metrics()
    assert metrics["retention_words_base"] == pytest.approx(1.0)
    assert metrics["forgetting_mean_drop"] == 0.0
    rows = report.table_rows()
    assert rows[0][:5] == ("words", "spearman", "1.000", "1.000", "+0.000")
    assert rows[-1][0] == "mean" and rows[-1][-1] == "+0.000"
