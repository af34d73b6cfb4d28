"""Fine-tuning an image classifier: the strategies of the text kind on a pretrained CNN.

- ``head``: the backbone frozen; its pooled features of every image are computed once
  (centre crop, no augmentation) and the head trains on them, started at the logistic
  regression on those features (``train.head_init: probe``).
- ``partial`` (the default, the seed's recipe): the stem and the first
  ``train.frozen_layers`` blocks frozen; with ``train.cache_frozen`` their output is
  computed once and the rest trains on it (no augmentation then: a cached crop is a fixed
  crop), else every step runs them on an augmented batch.
- ``full``: everything trains, on augmented batches.
- ``lp-ft``: ``head`` for ``train.lpft_probe_epochs``, then ``full``.

Frozen stages stay in eval mode: their BatchNorm statistics are the pretrained ones, so a
cached output equals a recomputed one. Augmentations (random resized crop, horizontal
flip) are drawn from a generator seeded by the run's seed and the step, so a resumed run
draws what an uninterrupted one would. The loop itself (epochs, early stopping, the best
weights, checkpoints and SIGTERM, DDP) is :func:`pipeline.finetune.run_phase`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import ImageConfig, TrainConfig
from pipeline.finetune import (
    FineTuneResult,
    MetricLogger,
    Optimization,
    Regularizer,
    fit_head,
    freeze_modules,
    logged_losses,
    micro_batches,
    rank_and_world,
    run_phase,
    start_phase,
)
from pipeline.image_models import (
    ImageClassifier,
    ImageSpec,
    build_classifier,
    centre_crop,
    frozen_stages,
    normalise,
    save_classifier,
)

POOLED = -1  # cache point of ``head``: the pooled features


@dataclass(frozen=True)
class ImageSplits:
    """Training and validation images as (N, 3, S, S) uint8 squares
    (:func:`pipeline.image_models.square_pixels`) and label ids (N,)."""

    train: torch.Tensor
    train_labels: np.ndarray
    val: torch.Tensor
    val_labels: np.ndarray


def cache_point(model: ImageClassifier, strategy: str, frozen_layers: int, cache: bool):
    """Where frozen outputs can be cached: :data:`POOLED` for head, the number of frozen
    stages for partial on a backbone that can run from a stage (MobileNetV2), else None."""
    if strategy == "head":
        return POOLED
    if strategy == "partial" and cache and hasattr(model.backbone, "run"):
        return frozen_layers + 1
    return None


def random_resized_crops(
    pixels: torch.Tensor, size: int, scale: float, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Each (3, S, S) square cropped to a random box (``scale``..1 of its area, aspect
    3/4..4/3), resized to ``size`` and flipped left-right with probability 1/2 when
    ``flip``. Returns (N, 3, size, size) float32 in 0..255."""
    n, side = len(pixels), pixels.shape[-1]
    draws = torch.rand((n, 4), generator=generator, dtype=torch.float64)
    out = torch.empty((n, 3, size, size), dtype=torch.float32)
    for i in range(n):
        area = side * side * (scale + (1 - scale) * draws[i, 0].item())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draws[i, 1].item())
        w = min(side, max(1, round(math.sqrt(area * ratio))))
        h = min(side, max(1, round(math.sqrt(area / ratio))))
        top = int(draws[i, 2].item() * (side - h + 1))
        left = int(draws[i, 3].item() * (side - w + 1))
        box = pixels[i : i + 1, :, top : top + h, left : left + w].float()
        out[i] = nn.functional.interpolate(box, (size, size), mode="bilinear", antialias=True)[0]
    if flip:
        flips = torch.rand(n, generator=generator) < 0.5
        out[flips] = out[flips].flip(-1)
    return out


@torch.no_grad()
def frozen_outputs(
    model: nn.Module,
    pixels: torch.Tensor,
    spec: ImageSpec,
    k: int,
    bf16: bool,
    batch_size: int = 128,
) -> torch.Tensor:
    """The frozen part's output for each image's centre crop: pooled features (N, D) for
    :data:`POOLED`, else the first ``k`` stages' maps (N, C, h, w); float32 or bf16.
    ``model``: a classifier, or its backbone alone."""
    device = next(model.parameters()).device
    backbone, parts = getattr(model, "backbone", model), []
    was = backbone.training
    backbone.eval()
    for start in range(0, len(pixels), batch_size):
        x = normalise(
            centre_crop(pixels[start : start + batch_size], spec.size), spec.mean, spec.std
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = backbone.embed(x.to(device)) if k == POOLED else backbone.run(x.to(device), 0, k)
        parts.append(y.to(torch.bfloat16 if bf16 else torch.float32).cpu())
    backbone.train(was)
    return torch.cat(parts)


class _ImageLogits(nn.Module):
    """The trainable forward, from images or from cached frozen outputs; frozen stages
    stay in eval mode whatever ``train()`` sets (their BatchNorm statistics are kept)."""

    def __init__(self, model: ImageClassifier, k: int | None, frozen: list[nn.Module]):
        super().__init__()
        self.model, self.k, self.frozen = model, k, frozen

    def train(self, mode: bool = True) -> _ImageLogits:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) logits and the (B, D) pooled features they read."""
        model = self.model
        features = pooled_features(model.backbone, x, self.k)
        return model.head(model.dropout(features)), features


def pooled_features(backbone: nn.Module, x: torch.Tensor, k: int | None) -> torch.Tensor:
    """Pooled features from images (k None), from the first ``k`` stages' output, or the
    cached features themselves (:data:`POOLED`)."""
    if k == POOLED:
        return x
    if k is not None:
        return backbone.pool(backbone.run(x, k))
    return backbone.embed(x)


class _Teacher:
    """Learning without Forgetting (Li & Hoiem 2016): the frozen base backbone and its
    ImageNet head; the loss is ``distill`` * T^2 * KL(base || tuned) of the ImageNet
    head's predictions at temperature T on the training batch, so the tuned backbone
    keeps answering the old task as the base did."""

    temperature = 2.0

    def __init__(self, model: ImageClassifier, head: nn.Module, weight: float, k: int | None):
        import copy

        self.backbone = copy.deepcopy(model.backbone).eval().requires_grad_(False)
        self.head = copy.deepcopy(head).requires_grad_(False)
        self.weight, self.k = weight, k

    def to(self, device: torch.device) -> _Teacher:
        self.backbone.to(device)
        self.head.to(device)
        return self

    def loss(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        with torch.no_grad():
            target = self.head(pooled_features(self.backbone, x, self.k)).float() / t
        student = self.head(features).float() / t
        kl = nn.functional.kl_div(
            student.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="sum"
        )
        return self.weight * t * t * kl


class ImageLoop:
    """One phase of image fine-tuning (see :class:`pipeline.finetune.TrainingLoop`)."""

    def __init__(
        self,
        model: ImageClassifier,
        spec: ImageSpec,
        splits: ImageSplits,
        config: TrainConfig,
        image: ImageConfig,
        teacher: tuple[nn.Module, float] | None = None,
    ):
        """``teacher``: the base's ImageNet head and the distillation weight (LwF), or
        None; taken from the model before any step (its backbone is still the base's)."""
        self.model, self.spec, self.splits, self.config, self.image = (
            model,
            spec,
            splits,
            config,
            image,
        )
        self.rank, self.world, self.device, self.bf16 = start_phase(model, config)
        frozen = frozen_stages(model, config.strategy, config.frozen_layers)
        self.trainable = freeze_modules(model, frozen)
        self.total = sum(p.numel() for p in model.parameters())
        self.k = cache_point(model, config.strategy, config.frozen_layers, config.cache_frozen)
        self._setup_data()
        self.fitted_head = config.strategy == "head" and config.head_init == "probe"
        if self.fitted_head:
            fit_head(_HeadView(model), self.train_in.float(), splits.train_labels)
        self.teacher = None
        if teacher is not None and config.strategy != "head":  # head: the backbone is kept
            self.teacher = _Teacher(model, teacher[0], teacher[1], self.k).to(self.device)
        self.core = _ImageLogits(model, self.k, frozen)
        self.net: nn.Module = self.core
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.core)
        self._setup_optimizer()

    def _setup_data(self) -> None:
        s, k = self.splits, self.k
        if k is None:
            self.train_in, self.val_in = s.train, s.val
        else:
            self.train_in = frozen_outputs(self.model, s.train, self.spec, k, self.bf16)
            self.val_in = frozen_outputs(self.model, s.val, self.spec, k, self.bf16)
        self.labels = torch.tensor(np.array(s.train_labels), dtype=torch.long)  # a copy

    def _setup_optimizer(self) -> None:
        config = self.config
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                lr = config.head_learning_rate if name.startswith("head.") else config.learning_rate
                decay = 0.0 if p.ndim < 2 else config.weight_decay
                groups.setdefault((lr, decay), []).append(p)
        param_groups = [
            {"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()
        ]
        self.total_steps = math.ceil(len(self.labels) / config.batch_size) * config.epochs
        self.opt = Optimization.build(
            self.model, param_groups, config, self.total_steps, self.device
        )

    def lengths(self) -> list[int]:
        return [1] * len(self.labels)  # images: no padding to bucket by

    def inputs(self, rows: list[int], step: int) -> torch.Tensor:
        """A batch as the net reads it: cached outputs, or augmented crops (seeded by the
        step, so a resumed run draws the same ones)."""
        if self.k is not None:
            return self.train_in[rows].to(self.device)
        squares, spec, image = self.train_in[rows], self.spec, self.image
        if image.augment:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
            crops = random_resized_crops(
                squares, spec.size, image.crop_scale, image.hflip, generator
            )
            x = normalise(crops, spec.mean, spec.std)  # crops are floats in 0..255
        else:
            x = normalise(centre_crop(squares, spec.size), spec.mean, spec.std)
        return x.to(self.device)

    def step(
        self, idx: list[int], step: int, regularizer: Regularizer | None
    ) -> tuple[float, float]:
        """One optimizer step on the global batch ``idx``: (task loss, distillation loss)."""
        shard, world = idx[self.rank :: self.world], self.world
        task, kept = 0.0, torch.zeros((), device=self.device)
        micro = micro_batches(shard, self.config.gradient_accumulation_steps)
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last or world == 1 else self.net.no_sync():
                x = self.inputs(part, step)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    logits, features = self.net(x)
                    target = self.labels[part].to(self.device)
                    # sum / global batch, times world: DDP's mean is then the global mean
                    loss = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
                    loss = loss * world / len(idx)
                    task += loss.item() / world
                    if self.teacher is not None:
                        kl = self.teacher.loss(x, features) * world / len(idx)
                        kept = kept + kl.detach()
                        loss = loss + kl
                loss.backward()
        self.opt.finish_step(None)
        return logged_losses(task, kept if self.teacher is not None else None, world, self.device)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        from sklearn.metrics import f1_score

        self.core.eval()
        labels = self.splits.val_labels
        logits = torch.cat(
            [self._eval_logits(self.val_in[i : i + 256]) for i in range(0, len(labels), 256)]
        )
        target = torch.as_tensor(labels, dtype=torch.long)
        pred = logits.argmax(1).numpy()
        return {
            "val_loss": nn.functional.cross_entropy(logits, target).item(),
            "val_accuracy": float((pred == labels).mean()),
            "val_macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        }

    def _eval_logits(self, part: torch.Tensor) -> torch.Tensor:
        if self.k is None:
            part = normalise(centre_crop(part, self.spec.size), self.spec.mean, self.spec.std)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.core(part.to(self.device))[0].float().cpu()


class _HeadView:
    """What :func:`pipeline.finetune.fit_head` reads: the linear head as ``classifier``."""

    def __init__(self, model: ImageClassifier):
        self.classifier = model.head


def fine_tune_images(
    model: ImageClassifier,
    spec: ImageSpec,
    splits: ImageSplits,
    config: TrainConfig,
    image: ImageConfig,
    logger: MetricLogger | None = None,
    progress: Callable[[int], Any] | None = None,
    checkpoint_dir: Path | None = None,
    teacher: tuple[nn.Module, float] | None = None,
) -> FineTuneResult:
    """Train ``model`` in place by ``config.strategy``; the best weights by the
    early-stopping metric stay (see :func:`pipeline.finetune.run_phase`).

    Args:
        teacher: the base's ImageNet head and the LwF weight (see :class:`_Teacher`).
    """
    if config.strategy != "lp-ft":
        loop = ImageLoop(model, spec, splits, config, image, teacher)
        return run_phase(loop, logger, progress, checkpoint_dir)
    probe = config.model_copy(
        update={
            "strategy": "head",
            "epochs": config.lpft_probe_epochs,
            "patience": config.lpft_probe_epochs,
        }
    )
    first = run_phase(
        ImageLoop(model, spec, splits, probe, image),
        logger,
        progress,
        checkpoint_dir and checkpoint_dir / "probe",
        "probe",
    )
    full = config.model_copy(update={"strategy": "full"})
    second = run_phase(
        ImageLoop(model, spec, splits, full, image, teacher),
        logger,
        progress,
        checkpoint_dir and checkpoint_dir / "full",
        "full",
    )
    return replace(
        second,
        history=first.history + second.history,
        train_seconds=first.train_seconds + second.train_seconds,
        loss_curve=first.loss_curve + second.loss_curve,
    )


def train_image_classifier(
    config: TrainConfig,
    image: ImageConfig,
    labels: list[str],
    splits: ImageSplits,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    logger: MetricLogger | None = None,
    progress: Callable[[int], Any] | None = None,
    distill: float = 0.0,
) -> tuple[ImageClassifier, ImageSpec, FineTuneResult]:
    """The training sequence, once for the flow and every torchrun rank: build the
    classifier on the base, fine-tune (with ``distill`` > 0 and a base with an ImageNet
    head, learning without forgetting), save to ``out_dir`` (rank 0 only)."""
    model, imagenet, spec = build_classifier(
        config.base_model, labels, image.size, config.seed, image.dropout
    )
    teacher = (imagenet, distill) if distill > 0 and imagenet is not None else None
    result = fine_tune_images(
        model, spec, splits, config, image, logger, progress, checkpoint_dir, teacher
    )
    if rank_and_world()[0] == 0:
        save_classifier(model, spec, out_dir)
    return model.eval(), spec, result


@torch.no_grad()
def predict_proba(
    model: ImageClassifier, pixels: torch.Tensor, spec: ImageSpec, bf16: bool, batch_size: int = 128
) -> np.ndarray:
    """Class probabilities of each (3, S, S) square's centre crop: (N, K) float64."""
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(pixels), batch_size):
        x = normalise(
            centre_crop(pixels[start : start + batch_size], spec.size), spec.mean, spec.std
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            parts.append(model(x.to(device)).float().softmax(-1).cpu())  # ImageClassifier
    return torch.cat(parts).double().numpy()
