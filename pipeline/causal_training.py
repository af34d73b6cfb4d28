"""Supervised fine-tuning of a causal LM, on the classifier's engine.

:class:`CausalLoop` is a :class:`pipeline.finetune.TrainingLoop`: the same
:func:`pipeline.finetune.run_phase` drives it, so resume after SIGTERM, checkpoints, early
stopping with the best weights restored, length-bucketed batches, warmup and linear decay,
DDP under torchrun and bf16 autocast work as they do for classification.

What is its own: the loss is the next-token cross-entropy on the assistant's tokens
(:mod:`pipeline.sft`), averaged over the labelled tokens of the whole global batch, and the
vocabulary projection runs only on the positions that carry a label (the prompt's
positions need none). ``train.gradient_accumulation_steps`` splits each rank's share of
the batch into that many micro-batches whose gradients add up to the batch's.

Strategies: ``full``; ``partial`` (token embeddings and the bottom ``frozen_layers``
decoder blocks frozen); ``lora`` (PEFT adapters, :func:`pipeline.finetune.apply_lora` with
``CAUSAL_LM``, on ``lora_target_modules``, e.g. q_proj and v_proj for Llama).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import sft
from pipeline.config import ForgettingConfig, TrainConfig
from pipeline.finetune import (
    FineTuneResult,
    MetricLogger,
    Optimization,
    Regularizer,
    freeze_modules,
    logged_losses,
    micro_batches,
    run_phase,
    start_phase,
)

Turns = Sequence[dict[str, str]]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` in Llama-style models)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def freeze_decoder(model: nn.Module, strategy: str, frozen_layers: int) -> int:
    """Set ``requires_grad`` by strategy (full, partial); returns the trainable count.

    partial freezes the token embeddings (and so a tied output layer) and the first
    ``frozen_layers`` decoder blocks.
    """
    layers = decoder_layers(model)
    if strategy not in {"full", "partial"}:
        raise ValueError(f"train.strategy={strategy} does not apply to a causal LM")
    if strategy == "partial" and frozen_layers > len(layers):
        raise ValueError(
            f"train.frozen_layers={frozen_layers} but the model has only {len(layers)} blocks"
        )
    frozen = (
        [model.get_input_embeddings(), *layers[:frozen_layers]] if strategy == "partial" else []
    )
    return freeze_modules(model, frozen)


def shard(core: nn.Module) -> None:
    """FSDP2 over the processes of torch.distributed: each decoder block a unit, the rest
    (embeddings, a tied output layer, the final norm) with ``core``, the root, whose
    forward gathers them. In place; the parameters become DTensor shards."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(core.model):
        fully_shard(layer)
    # Resharded after every forward, the root too (its default keeps the gathered weights
    # after a forward), so that loading weights between forwards meets shards everywhere.
    fully_shard(core, reshard_after_forward=True)


class _AnswerLoss(nn.Module):
    """Summed next-token cross-entropy over the labelled positions of a batch; what DDP
    wraps, so the forward that computes the loss is the one that syncs gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over labelled tokens, correct next-token predictions among them)."""
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = inner.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state  # (B, T, H)
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        keep = targets != sft.IGNORE
        logits = inner.lm_head(hidden[:, :-1][keep]).float()  # (N, V): labelled positions only
        loss = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        return loss, (logits.argmax(-1) == targets[keep]).sum()


class CausalLoop:
    """One SFT phase's parts (see :class:`pipeline.finetune.TrainingLoop`)."""

    fitted_head = False

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        train: list[sft.Tokenized],
        val: list[sft.Tokenized],
        config: TrainConfig,
    ):
        self.model, self.config, self.train, self.val = model, config, train, val
        self.rank, self.world, self.device, self.bf16 = start_phase(model, config)
        if config.strategy == "lora":  # PEFT already set which parameters train
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            self.trainable = freeze_decoder(model, config.strategy, config.frozen_layers)
        self.total = sum(p.numel() for p in model.parameters())
        self.pad_id = tokenizer.pad_token_id
        self.core = _AnswerLoss(model)
        self.net: nn.Module = self.core
        self.sharded = self.world > 1 and config.fsdp
        if self.sharded:  # the core is the FSDP root: its forward gathers the shards
            shard(self.core)
        elif self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.core)
        self._setup_optimizer()

    def _setup_optimizer(self) -> None:
        config = self.config
        trainables = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainables if p.ndim >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in trainables if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        self.total_steps = math.ceil(len(self.train) / config.batch_size) * config.epochs
        self.opt = Optimization.build(
            self.model, groups, config, self.total_steps, self.device, self.sharded
        )

    def lengths(self) -> list[int]:
        return [len(x.input_ids) for x in self.train]

    def step(
        self, idx: list[int], step: int, regularizer: Regularizer | None
    ) -> tuple[float, float]:
        """One optimizer step on the global batch ``idx``: (task loss, regulariser loss)."""
        shard = idx[self.rank :: self.world]
        # The mean over the global batch's labelled tokens: every rank knows all of idx.
        tokens = max(1, sum(self.train[i].answer_tokens for i in idx))
        reg = None
        micro = micro_batches(shard, self.config.gradient_accumulation_steps)
        task = 0.0
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            # DDP (FSDP) reduces gradients on the last micro-batch's backward, which carries
            # the regulariser too, so every gradient is reduced once.
            with self._gradient_sync(last):
                batch = sft.pad_batch([self.train[j] for j in part], self.pad_id, self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    summed, _ = self.net(batch)
                # times world: DDP's gradient mean then equals the gradient of the mean
                loss = summed * self.world / tokens
                task += loss.item() / self.world
                if last and regularizer is not None:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        reg = regularizer.loss(self.model, step)
                (loss + reg if reg is not None else loss).backward()
        self.opt.finish_step(regularizer)
        return logged_losses(task, reg, self.world, self.device)

    def _gradient_sync(self, last: bool) -> Any:
        if self.sharded:
            self.core.set_requires_gradient_sync(last)  # type: ignore[operator]
            return contextlib.nullcontext()
        if last or self.world == 1:
            return contextlib.nullcontext()
        return self.net.no_sync()  # type: ignore[operator]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss and next-token accuracy over the validation split's answer tokens."""
        return answer_loss(self.core, self.val, self.pad_id, self.bf16)


@torch.no_grad()
def answer_loss(
    core: nn.Module, items: Sequence[sft.Tokenized], pad_id: int, bf16: bool, batch_size: int = 16
) -> dict[str, float]:
    """val_loss (mean per answer token), val_accuracy (next-token) and val_perplexity."""
    device = next(core.parameters()).device
    core.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    total = correct = tokens = 0.0
    for start in range(0, len(order), batch_size):
        part = [items[i] for i in order[start : start + batch_size]]
        batch = sft.pad_batch(part, pad_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            summed, hits = core(batch)
        total += summed.item()
        correct += hits.item()
        tokens += sum(x.answer_tokens for x in part)
    loss = total / max(tokens, 1)
    return {
        "val_loss": loss,
        "val_accuracy": correct / max(tokens, 1),
        "val_perplexity": math.exp(min(loss, 50.0)),
    }


def fine_tune_causal(
    model: nn.Module,
    tokenizer: Any,
    train: Sequence[Turns],
    val: Sequence[Turns],
    config: TrainConfig,
    logger: MetricLogger | None = None,
    progress: Callable[[int], Any] | None = None,
    checkpoint_dir: Path | None = None,
    regularizer: Regularizer | None = None,
) -> FineTuneResult:
    """Fine-tune ``model`` in place on ``train`` conversations; the best weights by
    validation loss stay. With ``lora`` the model is still PEFT-wrapped afterwards.

    Raises:
        TrainingInterrupted: SIGTERM during training; the checkpoint resumes it.
    """
    items = [sft.tokenize_all(tokenizer, split, config.max_length) for split in (train, val)]
    loop = CausalLoop(model, tokenizer, items[0], items[1], config)
    return run_phase(loop, logger, progress, checkpoint_dir, "", regularizer)


def train_causal(
    config: TrainConfig,
    forgetting: ForgettingConfig | None,
    base: str,
    train: Sequence[Turns],
    val: Sequence[Turns],
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    logger: MetricLogger | None = None,
    progress: Callable[[int], Any] | None = None,
) -> tuple[Any, Any, FineTuneResult]:
    """The training sequence of a causal LM, once for the flow and every torchrun rank:
    load ``base`` (a local folder), build the regulariser from its pretrained weights, wrap
    LoRA, fine-tune, merge, save to ``out_dir`` (rank 0 only under torch.distributed).

    Returns:
        The tuned model (merged, eval mode), its tokenizer and the result.

    Raises:
        TrainingInterrupted: SIGTERM during training; the checkpoint resumes it.
    """
    from pipeline.causal_lm import load_causal_lm
    from pipeline.finetune import apply_lora, finish_lora, rank_and_world, save_model
    from pipeline.mitigation import build_lm_regularizer

    model, tokenizer = load_causal_lm(base, config.seed)
    regularizer = None
    if forgetting is not None:
        regularizer = build_lm_regularizer(
            model,
            tokenizer,
            forgetting.l2sp,
            forgetting.distill,
            forgetting.distill_batch_size,
            min(config.max_length, forgetting.max_length),
            config.seed,
            shared_base=config.strategy == "lora",
        )
    if config.strategy == "lora":
        model = apply_lora(model, config, "CAUSAL_LM")
    result = fine_tune_causal(
        model, tokenizer, train, val, config, logger, progress, checkpoint_dir, regularizer
    )
    if config.strategy == "lora":
        model = finish_lora(model)
    if config.fsdp and rank_and_world()[1] > 1:
        model = gather_shards(model, base, config.seed)
    if rank_and_world()[0] == 0:
        save_model(model, tokenizer, out_dir)
    return model.eval(), tokenizer, result


def gather_shards(model: nn.Module, base: str, seed: int) -> nn.Module:
    """A plain copy of an FSDP-sharded model on rank 0: its full weights (gathered from
    every rank, a collective) in a fresh model built from ``base``. The other ranks keep
    their shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from pipeline.causal_lm import load_causal_lm
    from pipeline.finetune import full_state, rank_and_world

    weights = get_model_state_dict(model, options=full_state())
    if rank_and_world()[0] != 0:
        return model
    plain, _ = load_causal_lm(base, seed)
    plain.load_state_dict(weights)
    return plain
