"""The task seam: kinds by name, text classification implementing the whole protocol,
and the base probe's embeddings cached by base weights and data."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from pipeline import tasks
from pipeline.config import RetuneConfig
from pipeline.retention import Suite
from pipeline.retention_tasks import RetentionTask
from pipeline.tasks import text_classification
from pipeline.tasks.base import TaskKind
from pipeline.tasks.text_classification import TextClassification, base_embeddings, cached_predict

pytestmark = pytest.mark.unit


def protocol_methods() -> set[str]:
    return {
        name
        for name, member in vars(TaskKind).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def test_text_classification_implements_every_step_of_the_protocol_with_its_arguments():
    kind = tasks.get("text-classification")
    assert isinstance(kind, TextClassification) and kind.name == "text-classification"
    assert len(protocol_methods()) >= 14
    for name in protocol_methods():
        wanted = list(inspect.signature(getattr(TaskKind, name)).parameters)[1:]
        got = list(inspect.signature(getattr(kind, name)).parameters)
        assert got == wanted, name


def test_the_config_names_the_kind_and_an_unknown_kind_is_refused():
    assert tasks.get(RetuneConfig().task).name == "text-classification"
    assert [tasks.get(name).name for name in ("chat", "translation")] == ["chat", "translation"]
    with pytest.raises(
        ValueError,
        match="unknown task 'poem'; known: chat, image-classification, text-classification, "
        "translation",
    ):
        tasks.get("poem")


def test_base_embeddings_are_cached_by_base_weights_and_texts(tmp_path: Path):
    config = RetuneConfig()
    calls: list[list[str]] = []

    def embed(texts: list[str], max_length: int) -> np.ndarray:
        calls.append(texts)
        return np.arange(len(texts) * 3, dtype=np.float32).reshape(len(texts), 3) + max_length

    texts = ["a good film", "a bad film"]
    first = base_embeddings(config, "sha-1", texts, tmp_path, embed)
    again = base_embeddings(config, "sha-1", texts, tmp_path, embed)
    assert np.array_equal(first, again) and len(calls) == 1  # the second came from disk
    assert first[0, 0] == config.train.max_length
    base_embeddings(config, "sha-2", texts, tmp_path, embed)  # other base weights
    base_embeddings(config, "sha-1", [*texts, "new"], tmp_path, embed)  # other data
    assert len(calls) == 3
    assert len(list((tmp_path / config.forgetting.cache_dir / "probe").glob("*.npy"))) == 3
    base_embeddings(config, "unresolved:hub-id", texts, tmp_path, embed)  # nothing to key by
    assert len(calls) == 4


def test_a_versions_predictions_are_cached_by_its_digest_and_the_texts(tmp_path: Path):
    config = RetuneConfig()
    calls: list[list[str]] = []

    def predict(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return np.full((len(texts), 2), 0.5 + len(calls), dtype=np.float32)

    champion = cached_predict(config, predict, "digest-1", tmp_path)
    first = champion(["a", "b"])
    assert np.array_equal(champion(["a", "b"]), first) and len(calls) == 1
    champion(["a", "c"])  # other texts
    cached_predict(config, predict, "digest-2", tmp_path)(["a", "b"])  # another version
    assert len(calls) == 3


WORDS = "cat dog horse cow car bus train plane apple pear red blue king queen river lake".split()


def test_a_second_measure_of_the_base_reads_every_embedding_from_the_cache(
    tmp_path: Path, tiny_base_model: Path, monkeypatch
):
    """Same base and data: the probe, its test metrics, its bias predictions and the
    retention scores come from the cache, and the base model is not even loaded."""
    import pandas as pd

    config = RetuneConfig.model_validate(
        {
            "train": {"base_model": str(tiny_base_model), "bf16": False},
            "data": {"labels": ["a", "b"]},
        }
    )
    rows, cols = np.triu_indices(len(WORDS), k=1)
    task = RetentionTask(
        "words",
        "similarity",
        "test",
        WORDS,
        pairs=np.stack([rows, cols], 1),
        scores=np.arange(len(rows), dtype=np.float64),
    )
    suite = Suite([task], "suite-md5", [], tmp_path)
    train = pd.DataFrame({"text": [f"{w} one" for w in WORDS], "label": ["a", "b"] * 8})
    test = pd.DataFrame({"text": [f"{w} two" for w in WORDS[:6]], "label": ["a", "b"] * 3})
    swaps = ["the king said", "the queen said"]
    first = text_classification.measure_base(config, train, test, suite, tmp_path)
    expected = first.predict(swaps)

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded although every input is cached")

    monkeypatch.setattr(text_classification.finetune, "load_encoder", no_load)
    again = text_classification.measure_base(config, train, test, suite, tmp_path)
    assert again.retention.cached and not first.retention.cached
    assert again.probe.to_dict() == first.probe.to_dict()
    assert np.array_equal(again.predict(swaps), expected)
    with pytest.raises(AssertionError, match="was loaded"):
        again.predict(["a text never embedded"])  # a new text does need the model
