"""Keeping what the base model knew: regularisers toward it and weight-space interpolation.

- :class:`L2SP` penalises the distance of the encoder's weights from the pretrained ones.
- :class:`EmbeddingDistillation` keeps the mean-pooled embeddings of general text (gensim's
  Lee background news corpus, disjoint from the Lee evaluation documents) close to the
  base model's.
- :class:`LogitDistillation` keeps a causal LM's next-token distributions on that text
  close to its base's (KL).
- :func:`interpolate_encoder` blends tuned and base weights (WiSE-FT);
  :func:`pick_alpha` chooses the blend from a sweep.

The regularisers follow :class:`pipeline.finetune.Regularizer`: ``loss(model, step)`` is
added to the task loss, ``after_step(optimizer)`` runs after each optimizer step. They hold
their own reference copies, so they work on any strategy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import cache
from pipeline.data import package_file
from pipeline.finetune import rank_and_world

GENERAL_TEXT_REQUIREMENT = "gensim==4.4.0"


def load_general_text(path: Path | None = None, min_words: int = 6) -> list[str]:
    """Sentences of gensim's Lee background corpus (300 news documents, Latin-1).

    None of them is a Lee evaluation document (``lee.cor``), so distilling on them does
    not train on the retention suite.
    """
    path = path or package_file(
        "gensim/test/test_data/lee_background.cor", GENERAL_TEXT_REQUIREMENT
    )
    sentences = []
    for line in path.read_text(encoding="latin-1").splitlines():
        for sentence in re.split(r"(?<=[.!?])\s+", line.strip()):
            if len(sentence.split()) >= min_words:
                sentences.append(sentence)
    return sentences


class L2SP:
    """L2-SP (Li et al. 2018), decoupled: each step ``theta -= lr * weight * (theta - theta_0)``.

    The penalty ``weight / 2 * ||theta - theta_0||^2`` on the encoder, applied like AdamW's
    weight decay (but toward the pretrained weights, not zero) rather than through the
    loss: Adam would rescale a penalty gradient to full-size steps and make every weight
    oscillate around ``theta_0``. ``theta_0`` is copied when this is built, so build it from
    the freshly loaded (pretrained) model.
    """

    def __init__(self, model: nn.Module, weight: float):
        self.weight = weight
        self.anchor = {id(p): p.detach().clone() for p in model.base_model.parameters()}

    def loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            shrink = group["lr"] * self.weight
            for p in group["params"]:
                anchor = self.anchor.get(id(p))
                if anchor is not None:
                    if anchor.device != p.device:  # built on the CPU: move it once
                        anchor = self.anchor[id(p)] = anchor.to(p.device)
                    p.sub_(shrink * (p - anchor))

    def distance(self, model: nn.Module) -> float:
        """``||theta - theta_0||^2`` over the encoder (for logging and tests)."""
        return sum(
            float((p.detach() - self.anchor[id(p)].to(p.device)).pow(2).sum())
            for p in model.base_model.parameters()
        )


@dataclass(frozen=True)
class TeacherCache:
    """Where the distillation teacher's embeddings are kept between runs.

    They depend only on the base weights (``weights_sha256``), the general-text corpus and
    the length they are cut to; ``folder`` is the project's cache (see :mod:`pipeline.cache`).
    """

    folder: Path
    weights_sha256: str


def teacher_embeddings(
    encoder: nn.Module,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    teacher_cache: TeacherCache | None = None,
) -> np.ndarray:
    """The base encoder's mean-pooled, normalised fp32 embeddings of ``texts``: (N, H).

    With ``teacher_cache`` they are read from (or saved to) its folder, keyed by the base
    weights' sha256, the texts' md5, ``max_length`` and the device type.
    """
    from pipeline.embeddings import embed_texts

    def compute() -> np.ndarray:
        return embed_texts(encoder, tokenizer, texts, 64, max_length)

    if teacher_cache is None or teacher_cache.weights_sha256.startswith("unresolved:"):
        return compute()
    key = {
        "what": "distill-teacher",
        "weights_sha256": teacher_cache.weights_sha256,
        "texts_md5": cache.texts_md5(texts),
        "max_length": str(max_length),
        "bf16": "False",
        "device": next(encoder.parameters()).device.type,
    }
    return cache.cached_array(teacher_cache.folder, key, compute)


class EmbeddingDistillation:
    """``weight * mean(1 - cos(student, teacher))`` on a batch of general text per step.

    The teacher embeddings (mean-pooled, normalised, fp32) are computed once from the
    model as it is when this is built: the base model (or read from ``teacher_cache``, see
    :func:`teacher_embeddings`). Step ``s`` uses the texts at a
    seeded permutation's positions ``s * batch .. (s + 1) * batch`` (mod N), so a resumed
    run sees the same batches as an uninterrupted one.

    With ``frozen=K`` (the layers that stay frozen while training, see
    :func:`pipeline.finetune.cache_point`) the student's embeddings and first K layers run
    once, here, as ``cache_frozen`` does for the task: each step runs only the layers that
    train, and the frozen ones run without dropout. With every layer frozen the student is
    the teacher, and the loss is None.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: list[str],
        weight: float,
        batch_size: int = 16,
        max_length: int = 128,
        seed: int = 0,
        frozen: int | None = None,
        teacher_cache: TeacherCache | None = None,
    ):
        from pipeline.finetune import cache_frozen, tokenize_all

        if not texts:
            raise ValueError("embedding distillation needs general text")
        self.weight, self.batch_size = weight, batch_size
        self.tokenizer, self.max_length = tokenizer, max_length
        self.texts = texts
        was_training = model.training
        self.teacher = torch.from_numpy(
            teacher_embeddings(model.base_model, tokenizer, texts, max_length, teacher_cache)
        )  # (N, H)
        model.train(was_training)
        self.order = np.random.default_rng(seed).permutation(len(texts))
        layers = len(model.base_model.encoder.layer)
        self.frozen = frozen if frozen else None
        self.states: list[torch.Tensor] | None = None  # per text (len_i, H) after K layers
        if self.frozen is not None and self.frozen < layers:
            ids = tokenize_all(tokenizer, texts, max_length)
            pad_id = tokenizer.pad_token_id or 0
            self.states = cache_frozen(model, ids, self.frozen, pad_id, bf16=False)

    def batch_indices(self, step: int) -> np.ndarray:
        positions = (step * self.batch_size + np.arange(self.batch_size)) % len(self.texts)
        return self.order[positions]

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        if self.frozen is not None and self.states is None:
            return None  # the whole encoder is frozen: the student is the teacher
        idx = self.batch_indices(step)
        rank, world = rank_and_world()
        shard = idx[rank::world]  # under DDP each rank takes its share, like the task batch
        pooled = self.student(model, shard)  # (B, H)
        cosine = nn.functional.cosine_similarity(
            pooled, self.teacher[shard].to(pooled.device), dim=-1
        )
        # Sum over the shard / batch size, times world: DDP's gradient mean then equals the
        # gradient of the mean over the whole batch, as in single-process training.
        return self.weight * (1.0 - cosine).sum() * world / len(idx)

    def student(self, model: nn.Module, rows: np.ndarray) -> torch.Tensor:
        """Mean-pooled embeddings of ``texts[rows]`` by ``model`` as it is now: (B, H)."""
        from pipeline.finetune import pad_states, run_top_layers

        device = next(model.parameters()).device
        # Under PEFT, base_model is the LoRA wrapper; the encoder (adapters injected in
        # place) sits inside the wrapped classifier.
        classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
        encoder = classifier.base_model
        if self.states is not None:
            hidden, attention = pad_states([self.states[i] for i in rows], device)
            hidden = run_top_layers(encoder, hidden, attention, self.frozen or 0)  # (B, T, H)
        else:
            batch = self.tokenizer(
                [self.texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            attention = batch["attention_mask"]
            hidden = encoder(
                input_ids=batch["input_ids"], attention_mask=attention
            ).last_hidden_state  # (B, T, H)
        mask = attention.unsqueeze(-1).float()
        return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class LogitDistillation:
    """``weight`` times the mean per-token KL(base || tuned) of the next-token distribution
    on a batch of general text per step (a causal LM's distillation toward its base).

    The texts are gensim's Lee background sentences (:func:`load_general_text`), every
    position scored (:func:`pipeline.lm_eval.text_items`); step ``s`` takes the seeded
    permutation's positions ``s * batch .. (s + 1) * batch`` (mod N), so a resumed run sees
    the same batches. The teacher is the model as it is when this is built (the base): a
    frozen copy, or, with ``lora`` (``shared_base``), the same model with its adapters
    disabled, which costs no second copy of the weights.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: list[str],
        weight: float,
        batch_size: int = 8,
        max_length: int = 128,
        seed: int = 0,
        shared_base: bool = False,
    ):
        import copy

        from pipeline import lm_eval

        if not texts:
            raise ValueError("distillation needs general text")
        self.weight, self.batch_size = weight, batch_size
        self.items = lm_eval.text_items(tokenizer, texts, max_length)
        self.pad_id = tokenizer.pad_token_id
        self.order = np.random.default_rng(seed).permutation(len(self.items))
        self.teacher: nn.Module | None = None
        if not shared_base:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def batch_indices(self, step: int) -> np.ndarray:
        positions = (step * self.batch_size + np.arange(self.batch_size)) % len(self.items)
        return self.order[positions]

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def loss(self, model: nn.Module, step: int) -> torch.Tensor:
        from pipeline import lm_eval, sft

        idx = self.batch_indices(step)
        rank, world = rank_and_world()
        shard = [self.items[i] for i in idx[rank::world]]  # each rank its share, as the task
        device = next(model.parameters()).device
        batch = sft.pad_batch(shard, self.pad_id, device)
        student = lm_eval.scored_logits(model, batch)  # (N, V)
        with torch.no_grad():
            if self.teacher is not None:
                teacher = lm_eval.scored_logits(self.teacher.to(device), batch)
            else:  # the base under the adapters, without dropout, as the frozen copy
                was_training = model.training
                model.eval()
                with model.disable_adapter():
                    teacher = lm_eval.scored_logits(model, batch)
                model.train(was_training)
        positions = max(1, sum(len(self.items[i].input_ids) - 1 for i in idx))
        # Summed over the shard / the global batch's positions, times world: DDP's gradient
        # mean then equals the gradient of the mean over the whole batch.
        return self.weight * lm_eval.token_kl(teacher, student).sum() * world / positions


class Regularizers:
    """Several regularisers as one: their losses add up, each one's step hook runs."""

    def __init__(self, parts: list[Any]):
        self.parts = parts

    def loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        losses = [x for x in (p.loss(model, step) for p in self.parts) if x is not None]
        return torch.stack(losses).sum() if losses else None

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for part in self.parts:
            part.after_step(optimizer)


def build_regularizer(
    model: nn.Module,
    tokenizer: Any,
    l2sp: float,
    distill: float,
    batch_size: int,
    seed: int,
    frozen: int | None = None,
    teacher_cache: TeacherCache | None = None,
) -> Regularizers | None:
    """The configured regulariser(s) for ``model`` (call before training), or None.

    ``frozen``: layers that stay frozen during training, whose outputs distillation may
    cache (see :class:`EmbeddingDistillation`); ``teacher_cache``: where distillation's
    teacher embeddings are kept between runs.
    """
    parts: list[Any] = []
    if l2sp > 0:
        parts.append(L2SP(model, l2sp))
    if distill > 0:
        texts = load_general_text()
        parts.append(
            EmbeddingDistillation(
                model, tokenizer, texts, distill, batch_size, 128, seed, frozen, teacher_cache
            )
        )
    return Regularizers(parts) if parts else None


def build_lm_regularizer(
    model: nn.Module,
    tokenizer: Any,
    l2sp: float,
    distill: float,
    batch_size: int,
    max_length: int,
    seed: int,
    shared_base: bool,
) -> Regularizers | None:
    """The configured regulariser(s) for a causal LM (build before LoRA and before any
    step), or None: L2-SP and/or KL distillation (:class:`LogitDistillation`)."""
    parts: list[Any] = []
    if l2sp > 0:
        parts.append(L2SP(model, l2sp))
    if distill > 0:
        parts.append(
            LogitDistillation(
                model,
                tokenizer,
                load_general_text(),
                distill,
                batch_size,
                max_length,
                seed,
                shared_base,
            )
        )
    return Regularizers(parts) if parts else None


def encoder(model: nn.Module) -> nn.Module:
    """What WiSE-FT blends in a classifier: the encoder (the new head stays as tuned)."""
    return model.base_model


def whole(model: nn.Module) -> nn.Module:
    """What WiSE-FT blends in a causal LM: every weight, its output layer included."""
    return model


def encoder_state(model: nn.Module, part: Callable[[nn.Module], nn.Module] = encoder) -> dict:
    """A detached copy of ``part(model)``'s weights (the WiSE-FT anchor)."""
    return {n: t.detach().clone() for n, t in part(model).state_dict().items()}


@torch.no_grad()
def interpolate_encoder(
    model: nn.Module,
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    alpha: float,
    part: Callable[[nn.Module], nn.Module] = encoder,
) -> None:
    """Set ``part(model)`` (the encoder) to ``(1 - alpha) * base + alpha * tuned`` in place.

    Non-float buffers (position ids) are taken from ``tuned`` as they are.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    mixed = {}
    for name, t in tuned.items():
        if t.is_floating_point():
            mixed[name] = torch.lerp(base[name].to(t.dtype), t, alpha)
        else:
            mixed[name] = t
    part(model).load_state_dict(mixed)


@dataclass(frozen=True)
class AlphaPoint:
    alpha: float
    val_metric: float
    mean_drop: float
    mean_drop_ci_high: float
    worst_drop: float
    passed: bool  # within the forgetting budget (the gate's criteria)


@dataclass(frozen=True)
class AlphaChoice:
    alpha: float
    reason: str
    curve: list[AlphaPoint]


def pick_alpha(curve: list[AlphaPoint]) -> AlphaChoice:
    """The alpha with the best validation metric among those within the budget.

    If none is within it, the alpha that forgets least (smallest mean-drop upper bound):
    the gate then decides, and refuses it.
    """
    if not curve:
        raise ValueError("pick_alpha needs at least one point")
    within = [p for p in curve if p.passed]
    if within:
        best = max(within, key=lambda p: (p.val_metric, -p.alpha))
        return AlphaChoice(
            best.alpha,
            f"best validation metric {best.val_metric:.4f} within the forgetting budget",
            curve,
        )
    least = min(curve, key=lambda p: (p.mean_drop_ci_high, p.alpha))
    return AlphaChoice(
        least.alpha,
        f"no alpha within the forgetting budget; the one that forgets least "
        f"(mean drop upper bound {least.mean_drop_ci_high:.3f})",
        curve,
    )


def wise_ft(
    model: nn.Module,
    base: dict[str, torch.Tensor],
    alphas: list[float],
    validate: Callable[[nn.Module], float],
    retain: Callable[[nn.Module], Any],
    within_budget: Callable[[Any], bool],
    part: Callable[[nn.Module], nn.Module] = encoder,
) -> AlphaChoice:
    """Sweep WiSE-FT blends, keep the chosen one in ``model`` (in place).

    Args:
        base: the pretrained weights of ``part`` (:func:`encoder_state` of the base model).
        validate: model -> the task metric on the validation split (higher is better).
        retain: model -> a :class:`pipeline.forgetting.Comparison` against the base.
        within_budget: comparison -> whether the forgetting gate would pass it.
        part: what is blended: :func:`encoder` (a classifier) or :func:`whole` (a causal LM).
    """
    tuned = encoder_state(model, part)
    curve = []
    for alpha in sorted(set(alphas)):
        interpolate_encoder(model, base, tuned, alpha, part)
        kept = retain(model)
        curve.append(
            AlphaPoint(
                alpha,
                validate(model),
                kept.mean_drop,
                kept.mean_ci_high,
                kept.worst_drop,
                within_budget(kept),
            )
        )
    choice = pick_alpha(curve)
    interpolate_encoder(model, base, tuned, choice.alpha, part)
    return choice
