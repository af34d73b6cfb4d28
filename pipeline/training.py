"""The training sequence, once: base model, regulariser, LoRA, fine-tune, merge, save.

Both the flow's in-process training and :mod:`pipeline.worker` (one process per rank under
torchrun) run :func:`train_classifier`, so a model trained either way is built the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ForgettingConfig, TrainConfig
from pipeline.finetune import (
    FineTuneResult,
    MetricLogger,
    apply_lora,
    cache_point,
    fine_tune,
    finish_lora,
    load_classifier,
    rank_and_world,
    save_model,
)
from pipeline.mitigation import TeacherCache, build_regularizer

ADAPTER_FOLDER = "adapter"  # beside out_dir: the LoRA adapter when train.lora_merge is false


def train_classifier(
    config: TrainConfig,
    forgetting: ForgettingConfig | None,
    labels: Sequence[str],
    train_texts: list[str],
    train_labels: np.ndarray,
    val_texts: list[str],
    val_labels: np.ndarray,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    logger: MetricLogger | None = None,
    progress: Callable[[int], Any] | None = None,
    teacher_cache: TeacherCache | None = None,
) -> tuple[Any, Any, FineTuneResult]:
    """Fine-tune a new classifier on the base model and save it to ``out_dir``.

    The regulariser (``forgetting.l2sp`` / ``forgetting.distill``) is built from the
    pretrained weights before LoRA is applied and before any step. With LoRA the saved
    (served) model is always merged; with ``lora_merge: false`` the adapter is saved as
    well, to ``out_dir.parent / "adapter"``. Under torch.distributed only rank 0 saves.

    Args:
        forgetting: the mitigations that act during training; None for none.
        train_labels / val_labels: label indices into ``labels``, shape (N,).
        checkpoint_dir: resumable checkpoints (see :func:`pipeline.finetune.fine_tune`).
        teacher_cache: where distillation's teacher embeddings of the base are kept
            between runs (see :func:`pipeline.mitigation.teacher_embeddings`).

    Returns:
        The trained classifier (merged, in eval mode), its tokenizer and the result.

    Raises:
        TrainingInterrupted: SIGTERM during training; the checkpoint resumes it.
    """
    model, tokenizer = load_classifier(config.base_model, list(labels), config.seed, config.pooling)
    regularizer = None
    if forgetting is not None:
        regularizer = build_regularizer(
            model,
            tokenizer,
            forgetting.l2sp,
            forgetting.distill,
            forgetting.distill_batch_size,
            config.seed,
            frozen=_frozen_distill_layers(model, config),
            teacher_cache=teacher_cache,
        )
    if config.strategy == "lora":
        model = apply_lora(model, config)
    result = fine_tune(
        model,
        tokenizer,
        train_texts,
        train_labels,
        val_texts,
        val_labels,
        config,
        logger=logger,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        regularizer=regularizer,
    )
    rank, _ = rank_and_world()
    if config.strategy == "lora":
        if not config.lora_merge and rank == 0:
            model.save_pretrained(out_dir.parent / ADAPTER_FOLDER)
        model = finish_lora(model)  # the served model is always merged
    if rank == 0:
        save_model(model, tokenizer, out_dir)
    return model, tokenizer, result


def _frozen_distill_layers(model: Any, config: TrainConfig) -> int | None:
    """Layers that stay frozen while the regulariser acts, if their outputs may be cached.

    As for the task (``train.cache_frozen``): partial's first K, all of them for head.
    lp-ft regularises only its full phase, LoRA adapts every layer: nothing to cache.
    """
    if not config.cache_frozen or config.strategy not in {"head", "partial"}:
        return None
    return cache_point(model, config.strategy, config.frozen_layers)
