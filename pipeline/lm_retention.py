"""What a causal LM must keep: likelihood of general text and of its base's own answers.

The generative kinds measure forgetting on ``likelihood`` retention tasks, scored per item
by the mean log-probability per token (:func:`pipeline.lm_eval.mean_logliks`), so the
shared machinery (:func:`pipeline.forgetting.compare`, its paired bootstrap over items, the
gate) reads them as it reads the classifier's tasks. A drop is in nats per token:
``log(perplexity_tuned / perplexity_base)``, so 0.05 is about 5% more perplexity.

- ``lee`` and ``brown``: the retention suite's Lee documents and its Brown-corpus test
  sentences (the same versioned files the classifier's suite holds), as plain text.
- ``general-answers``: a fixed set of general instructions (``pipeline/prompts/general.json``)
  with the base model's own greedy answers; the likelihood of those answers is the base's
  behaviour the tuned model should keep (drift from it is what chat fine-tuning costs).
  The answers depend only on the base weights and the prompts, and are cached by both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import cache, lm_eval, sft
from pipeline.forgetting import TaskOutputs
from pipeline.retention_tasks import RetentionTask

PROMPTS_FILE = Path(__file__).with_name("prompts") / "general.json"
ANSWERS = "general-answers"
LIKELIHOOD = "likelihood"


def general_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    return list(json.loads(path.read_text(encoding="utf-8"))["prompts"])


def text_tasks(suite_tasks: list[RetentionTask], sentences: int) -> list[RetentionTask]:
    """``lee`` (its documents) and ``brown`` (the first ``sentences`` of its test split)
    from the retention suite, as likelihood tasks; absent suite tasks are left out."""
    by_name = {t.name: t for t in suite_tasks}
    tasks = []
    if "lee" in by_name:
        lee = by_name["lee"]
        tasks.append(RetentionTask("lee", LIKELIHOOD, lee.source, list(lee.texts)))
    if "brown" in by_name:
        brown = by_name["brown"]
        assert brown.is_test is not None
        test = [t for t, is_test in zip(brown.texts, brown.is_test, strict=True) if is_test]
        tasks.append(RetentionTask("brown", LIKELIHOOD, brown.source, test[:sentences]))
    return tasks


def answers_task(prompts: list[str], answers: list[str]) -> RetentionTask:
    """The base's answers to ``prompts`` as a likelihood task over conversations (JSON)."""
    texts = [
        json.dumps(
            [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
            ensure_ascii=False,
        )
        for p, a in zip(prompts, answers, strict=True)
        if a.strip()
    ]
    return RetentionTask(
        ANSWERS,
        LIKELIHOOD,
        "pipeline/prompts/general.json + the base model's greedy answers",
        texts,
    )


def base_answers(
    prompts: list[str],
    answer: Callable[[list[str]], list[str]],
    cache_dir: Path,
    weights_sha: str,
    max_new_tokens: int,
) -> list[str]:
    """The base's greedy answers to ``prompts``, from ``cache_dir`` when there, else from
    ``answer`` (saved for the next run). Keyed by base weights, prompts and length."""
    if weights_sha.startswith("unresolved:"):  # a hub id not on disk: nothing to key by
        return answer(prompts)
    key = {
        "what": "base-answers",
        "weights_sha256": weights_sha,
        "prompts_md5": cache.texts_md5(prompts),
        "max_new_tokens": str(max_new_tokens),
    }
    return list(cache.cached_json(cache_dir, key, lambda: answer(prompts)))


def task_items(task: RetentionTask, tokenizer: Any, max_length: int) -> list[sft.Tokenized]:
    """What is scored: the answers of a conversation task, every token of a text task."""
    if task.name == ANSWERS:
        return sft.tokenize_all(tokenizer, [json.loads(t) for t in task.texts], max_length)
    return lm_eval.text_items(tokenizer, task.texts, max_length)


def score_lm(
    model: Any, tokenizer: Any, tasks: list[RetentionTask], max_length: int, batch_size: int = 16
) -> dict[str, TaskOutputs]:
    """Every likelihood task's per-item mean log-probability per token and their mean."""
    outputs = {}
    for task in tasks:
        items = task_items(task, tokenizer, max_length)
        values = lm_eval.mean_logliks(model, items, tokenizer.pad_token_id, batch_size)
        outputs[task.name] = TaskOutputs(task.name, values, float(np.nanmean(values)))
    return outputs


@torch.no_grad()
def lm_layers(
    model: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 16
) -> np.ndarray:
    """Mean-pooled hidden states of every layer over real tokens: (L + 1, N, H), fp32.
    Index 0 is the embeddings' output (for per-layer CKA between base and tuned)."""
    device = next(model.parameters()).device
    model.eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    per_batch = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = inner.model(**batch, output_hidden_states=True).hidden_states  # L+1 x (B,T,H)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = [(h.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0) for h in hidden]
        per_batch.append(torch.stack(pooled).cpu().numpy())  # (L + 1, B, H)
    return np.concatenate(per_batch, axis=1)
