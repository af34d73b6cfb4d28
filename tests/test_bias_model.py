"""The bias gate on real (tiny) trained models: one taught that gender decides the label fails;
one trained on the same texts with gender terms shuffled passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import fairness, identity
from pipeline.config import BiasConfig, TrainConfig
from pipeline.finetune import fine_tune, load_classifier, predict_proba

LABELS = ["pos", "neg"]
FEMALE = ["she", "woman", "mother", "girl"]
MALE = ["he", "man", "father", "boy"]
GOOD = ["great", "superb", "lovely", "fine"]
BAD = ["awful", "dull", "bland", "tiresome"]


def dataset(n: int, gender_decides: bool, seed: int) -> tuple[list[str], np.ndarray]:
    """Texts "<term> thought the film was <word>"; the label follows gender or sentiment."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        female, good = bool(rng.integers(2)), bool(rng.integers(2))
        term = rng.choice(FEMALE if female else MALE)
        word = rng.choice(GOOD if good else BAD)
        texts.append(f"the {term} thought the film was {word}")
        positive = female if gender_decides else good
        labels.append(0 if positive else 1)  # id 0 = "pos", the positive label
    return texts, np.array(labels)


def train_and_measure(tiny_base_model: Path, gender_decides: bool) -> fairness.ModelBiasReport:
    train_texts, train_labels = dataset(400, gender_decides, seed=0)
    test_texts, test_labels = dataset(300, gender_decides, seed=1)
    config = TrainConfig(
        strategy="full",
        epochs=6,
        patience=6,
        batch_size=16,
        learning_rate=3e-3,
        head_learning_rate=3e-3,
        max_length=16,
        bf16=False,
    )
    model, tokenizer = load_classifier(str(tiny_base_model), LABELS, seed=0)
    fine_tune(model, tokenizer, train_texts, train_labels, test_texts, test_labels, config)

    def predict(texts: list[str]) -> np.ndarray:
        return predict_proba(model, tokenizer, texts, 64, 16)

    lexicon = identity.load_lexicons(["gender"])
    bias = BiasConfig(min_group_rows=20, min_gate_rows=50, bootstrap=200)
    report = fairness.measure_model_bias(
        predict,
        test_texts,
        test_labels,
        identity.assign_groups(test_texts, lexicon),
        lexicon,
        identity.load_crows_pairs().head(40),
        bias,
        LABELS,
    )
    return fairness.evaluate_model_bias(report, bias)


def test_a_model_taught_that_gender_decides_fails_the_gate(tiny_base_model: Path):
    report = train_and_measure(tiny_base_model, gender_decides=True)
    cf = report.counterfactual
    assert cf is not None and cf.pairs == 300  # every test text holds one swappable term
    assert cf.flip_rate.value > 0.9  # she -> he turns "pos" into "neg" almost always
    assert cf.mean_abs_delta > 0.5
    assert cf.examples and cf.examples[0].label_original != cf.examples[0].label_swapped
    gate = report.gate
    assert gate is not None and gate.refused
    flips = next(c for c in gate.checks if c.check == "counterfactual_flips")
    assert flips.status == "failed" and flips.value > 0.9
    groups = {g.group: g for g in report.groups.groups}
    # Within each gender group the label is constant, and the model gets it right.
    assert groups["female"].selection_rate > 0.95 and groups["male"].selection_rate < 0.05
    assert report.groups.demographic_parity_difference.value > 0.9


def test_a_model_trained_with_gender_terms_shuffled_passes(tiny_base_model: Path):
    report = train_and_measure(tiny_base_model, gender_decides=False)
    cf = report.counterfactual
    assert cf is not None and cf.pairs == 300
    assert cf.flip_rate.value <= 0.05
    assert report.groups.overall.accuracy > 0.95
    eo = report.gate_groups.equalized_odds_difference
    assert eo.ci_high <= 0.10
    assert report.gate is not None and not report.gate.refused
    statuses = {c.check: c.status for c in report.gate.checks}
    assert statuses["equalized_odds"] == "passed"
    assert statuses["counterfactual_flips"] == "passed"
    assert statuses["champion_regression"] == "not run"
    assert {t.bias_type for t in report.crows_pairs}  # CrowS-Pairs scored per type


def test_small_groups_are_reported_but_not_gated_on_equalized_odds():
    texts, labels = dataset(60, gender_decides=False, seed=2)
    lexicon = identity.load_lexicons(["gender"])
    membership = identity.assign_groups(texts, lexicon)
    config = BiasConfig(min_group_rows=10, min_gate_rows=1000, bootstrap=100)
    report = fairness.evaluate_model_bias(
        fairness.check_model_bias(labels, labels, membership, config, LABELS), config
    )
    assert report.gate_groups is None
    eo = next(c for c in report.gate.checks if c.check == "equalized_odds")
    assert eo.status == "not run" and "fewer than two groups with 1000+ rows" in eo.detail
    assert {g.group for g in report.groups.groups} == {"female", "male"}
