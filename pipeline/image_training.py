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
    model: ImageClassifier,
    pixels: torch.Tensor,
    spec: ImageSpec,
    k: int,
    bf16: bool,
    batch_size: int = 128,
) -> torch.Tensor:
    """The frozen part's output for each image's centre crop: pooled features (N, D) for
    :data:`POOLED`, else the first ``k`` stages' maps (N, C, h, w); float32 or bf16."""
    device = next(model.parameters()).device
    backbone, parts = model.backbone, []
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.k == POOLED:
            return model.head(model.dropout(x))
        if self.k is not None:
            backbone = model.backbone
            return model.head(model.dropout(backbone.pool(backbone.run(x, self.k))))
        return model(x)  # (B, K)


class ImageLoop:
    """One phase of image fine-tuning (see :class:`pipeline.finetune.TrainingLoop`)."""

    def __init__(
        self,
        model: ImageClassifier,
        spec: ImageSpec,
        splits: ImageSplits,
        config: TrainConfig,
        image: ImageConfig,
    ):
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
        self.labels = torch.as_tensor(s.train_labels, dtype=torch.long)

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
        """One optimizer step on the global batch ``idx``: (task loss, 0)."""
        shard, world = idx[self.rank :: self.world], self.world
        task = 0.0
        micro = micro_batches(shard, self.config.gradient_accumulation_steps)
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last or world == 1 else self.net.no_sync():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    logits = self.net(self.inputs(part, step))
                target = self.labels[part].to(self.device)
                # sum / global batch, times world: DDP's mean is then the global mean
                loss = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
                loss = loss * world / len(idx)
                task += loss.item() / world
                loss.backward()
        self.opt.finish_step(None)
        return logged_losses(task, None, world, self.device)

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
            return self.core(part.to(self.device)).float().cpu()


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
) -> FineTuneResult:
    """Train ``model`` in place by ``config.strategy``; the best weights by the
    early-stopping metric stay (see :func:`pipeline.finetune.run_phase`)."""
    if config.strategy != "lp-ft":
        loop = ImageLoop(model, spec, splits, config, image)
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
        ImageLoop(model, spec, splits, full, image),
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
) -> tuple[ImageClassifier, ImageSpec, FineTuneResult]:
    """The training sequence, once for the flow and every torchrun rank: build the
    classifier on the base, fine-tune, save to ``out_dir`` (rank 0 only)."""
    model, _, spec = build_classifier(config.base_model, labels, image.size, config.seed)
    result = fine_tune_images(model, spec, splits, config, image, logger, progress, checkpoint_dir)
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
            parts.append(model(x.to(device)).float().softmax(-1).cpu())
    return torch.cat(parts).double().numpy()
