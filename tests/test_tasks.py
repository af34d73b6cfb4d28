"""The task seam: kinds by name, text classification implementing the whole protocol,
and the base probe's embeddings cached by base weights and data."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from pipeline import tasks
from pipeline.config import RetuneConfig
from pipeline.tasks.base import TaskKind
from pipeline.tasks.text_classification import TextClassification, probe_features

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
    with pytest.raises(ValueError, match="unknown task 'chat'; known: text-classification"):
        tasks.get("chat")


def test_probe_embeddings_are_cached_by_base_weights_and_texts(tmp_path: Path):
    config = RetuneConfig()
    calls: list[list[str]] = []

    def embed(texts: list[str], max_length: int) -> np.ndarray:
        calls.append(texts)
        return np.arange(len(texts) * 3, dtype=np.float32).reshape(len(texts), 3) + max_length

    texts = ["a good film", "a bad film"]
    first = probe_features(config, "sha-1", texts, tmp_path, embed)
    again = probe_features(config, "sha-1", texts, tmp_path, embed)
    assert np.array_equal(first, again) and len(calls) == 1  # the second came from disk
    assert first[0, 0] == config.train.max_length
    probe_features(config, "sha-2", texts, tmp_path, embed)  # other base weights
    probe_features(config, "sha-1", [*texts, "new"], tmp_path, embed)  # other data
    assert len(calls) == 3
    assert len(list((tmp_path / config.forgetting.cache_dir / "probe").glob("*.npy"))) == 3
    probe_features(config, "unresolved:hub-id", texts, tmp_path, embed)  # nothing to key by
    assert len(calls) == 4
