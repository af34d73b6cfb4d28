"""retune's SFT engine against TRL's SFTTrainer: LoRA on SmolLM2-135M-Instruct, same data.

Both sides fine-tune the packaged SmolLM2-135M-Instruct (converted once from its GGUF by
``pipeline.causal_lm``) with LoRA (r 8, alpha 16, dropout 0.05, q_proj and v_proj) on
Django's English -> German interface strings rendered as chat turns, the loss on the
answers only, batch 8, max length 128, learning rate 5e-4 with linear warmup (0.06) and
decay, weight decay 0.01, seed 0, for one epoch, fp32 or bf16 autocast:

- retune: ``pipeline.causal_training.fine_tune_causal`` (length-bucketed batches, the
  vocabulary projection only on answer positions), validating once on 32 held-out
  conversations inside its time.
- TRL: ``SFTTrainer`` on a prompt-completion dataset (its completion-only loss), the usual
  recipe: ``SFTConfig(use_cpu=True, save_strategy="no", report_to=[])``, no evaluation.

Each side runs in a fresh process (the script calls itself); the parent measures the fp32
matmul peak in the same run and compares. Held-out loss is the mean cross-entropy per
answer token on test conversations the training never saw, computed by one function
(``pipeline.causal_training.answer_loss``) for both sides.

    .venv/bin/python bench/sft.py                     # 320 training conversations
    .venv/bin/python bench/sft.py --train-rows 160 --bf16 --check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "true",
    "HF_DATASETS_OFFLINE": "1",
}
INSTRUCTION = "Translate from English to German:"
BATCH, MAX_LENGTH, LR, WARMUP, DECAY, SEED = 8, 128, 5e-4, 0.06, 0.01, 0
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
TARGET_SPEEDUP = 1.5  # TRL time / retune time, with LoRA
LOSS_TOLERANCE = 0.01  # "equal held-out loss": within 1%


def load_data(train_rows: int) -> dict[str, list[list[dict[str, str]]]]:
    """Seeded, disjoint train / validation / test conversations of the Django pairs."""
    import numpy as np

    from pipeline import conversations as conv

    pairs = conv.load_translation_example("de")
    order = np.random.default_rng(SEED).permutation(len(pairs))
    turns = [conv.pair_conversation(pairs[i], INSTRUCTION) for i in order]
    if train_rows + 32 + 100 > len(turns):
        raise SystemExit(f"--train-rows at most {len(turns) - 132}")
    return {
        "train": turns[:train_rows],
        "validation": turns[train_rows : train_rows + 32],
        "test": turns[train_rows + 32 : train_rows + 132],
    }


def load_model() -> tuple[Any, Any]:
    from pipeline.causal_lm import load_causal_lm, resolve_causal_base

    base = resolve_causal_base("packaged:SmolLM2-135M-Instruct", ROOT / ".retune" / "cache")
    return load_causal_lm(base, SEED)


def held_out(model: Any, tokenizer: Any, test: list, bf16: bool) -> float:
    from pipeline import sft
    from pipeline.causal_training import _AnswerLoss, answer_loss

    items = sft.tokenize_all(tokenizer, test, MAX_LENGTH)
    return answer_loss(_AnswerLoss(model), items, tokenizer.pad_token_id, bf16)["val_loss"]


def token_counts(tokenizer: Any, train: list) -> tuple[int, int]:
    """Real (non-padding) tokens and answer tokens of one pass over ``train``."""
    from pipeline import sft

    items = sft.tokenize_all(tokenizer, train, MAX_LENGTH)
    return sum(len(x.input_ids) for x in items), sum(x.answer_tokens for x in items)


def run_retune(data: dict, bf16: bool) -> dict[str, Any]:
    from pipeline.causal_training import fine_tune_causal
    from pipeline.config import TrainConfig
    from pipeline.finetune import apply_lora

    model, tokenizer = load_model()
    config = TrainConfig(
        base_model="packaged:SmolLM2-135M-Instruct",
        strategy="lora",
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        lora_target_modules=LORA["targets"],
        epochs=1,
        patience=1,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        learning_rate=LR,
        warmup_ratio=WARMUP,
        weight_decay=DECAY,
        seed=SEED,
        bf16=bf16,
    )
    model = apply_lora(model, config, "CAUSAL_LM")
    start = time.perf_counter()
    result = fine_tune_causal(model, tokenizer, data["train"], data["validation"], config)
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "loop_s": result.train_seconds,
        "trainable": result.trainable_parameters,
        "held_out_loss": held_out(model, tokenizer, data["test"], bf16),
    }


def run_trl(data: dict, bf16: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from pipeline.cpu import set_cpu_threads

    set_cpu_threads(None)  # the thread count retune's side uses
    model, tokenizer = load_model()
    rows = [{"prompt": t[:-1], "completion": t[-1:]} for t in data["train"]]
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,  # a float below 1: the ratio of the steps
        weight_decay=DECAY,
        max_length=MAX_LENGTH,
        seed=SEED,
        data_seed=SEED,
        bf16=bf16,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=1_000_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"],
    )
    start = time.perf_counter()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    output = trainer.train()
    wall = time.perf_counter() - start
    tuned = trainer.model.eval()
    with torch.no_grad():
        loss = held_out(tuned, tokenizer, data["test"], bf16)
    return {
        "wall_s": wall,
        "loop_s": float(output.metrics["train_runtime"]),
        "trainable": sum(p.numel() for p in tuned.parameters() if p.requires_grad),
        "held_out_loss": loss,
    }


def run_side(side: str, train_rows: int, bf16: bool, out: Path) -> None:
    """One side, in this (child) process; writes its figures to ``out``."""
    data = load_data(train_rows)
    figures = (run_retune if side == "retune" else run_trl)(data, bf16)
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    out.write_text(json.dumps(figures))


# --- the parent: each side in its own process, then compare ---------------------------


def matmul_peak_gflops(bf16: bool, size: int = 2048, repeats: int = 5, rounds: int = 7) -> float:
    """Best GFLOP/s of ``size``-square matmuls (bf16 or fp32) over several rounds."""
    import torch

    from pipeline.cpu import set_cpu_threads

    set_cpu_threads(None)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def necessary_flops(model: Any, real_tokens: int, answer_tokens: int) -> float:
    """Training FLOPs a LoRA step needs on the real tokens: forward and the backward to
    the inputs through the decoder (4 x non-embedding parameters per token; the adapters'
    own weight gradients are negligible), plus the output projection (6 x hidden x
    vocabulary) on the answer tokens, the only positions with a loss."""
    embed = model.get_input_embeddings().weight
    decoder = sum(p.numel() for p in model.parameters()) - embed.numel()
    return 4.0 * decoder * real_tokens + 6.0 * embed.numel() * answer_tokens


def spawn_side(side: str, train_rows: int, bf16: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, __file__, "--side", side, "--out", str(out)]
        command += ["--train-rows", str(train_rows)] + (["--bf16"] if bf16 else [])
        done = subprocess.run(
            command, cwd=ROOT, env=os.environ | QUIET_ENV, capture_output=True, text=True
        )
        if done.returncode != 0 or not out.is_file():
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise RuntimeError(f"the {side} side failed ({done.returncode})")
        return json.loads(out.read_text())


def report(figures: dict[str, dict], peak: float, flops: float, args: argparse.Namespace) -> list:
    """Print the comparison; returns the targets missed."""
    precision = "bf16" if args.bf16 else "fp32"
    print(f"\n{'side':8} {'wall s':>8} {'loop s':>8} {'tok/s':>8} {'peak MiB':>9} {'loss':>8}")
    for side, f in figures.items():
        print(
            f"{side:8} {f['wall_s']:8.1f} {f['loop_s']:8.1f} {f['tokens_per_s']:8.0f} "
            f"{f['peak_rss_mib']:9.0f} {f['held_out_loss']:8.4f}"
        )
    ours, theirs = figures["retune"], figures["trl"]
    wall, loop = theirs["wall_s"] / ours["wall_s"], theirs["loop_s"] / ours["loop_s"]
    gap = (ours["held_out_loss"] - theirs["held_out_loss"]) / theirs["held_out_loss"]
    missed = []
    if wall < TARGET_SPEEDUP:
        missed.append(f"wall {wall:.2f}x < {TARGET_SPEEDUP}x")
    if gap > LOSS_TOLERANCE:
        missed.append(f"held-out loss {gap:+.1%} > {LOSS_TOLERANCE:.0%} above TRL's")
    print(
        f"\nratios (TRL / retune): wall {wall:.2f}x, loop {loop:.2f}x, tokens/s "
        f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x (target >= {TARGET_SPEEDUP}x "
        f"wall: {'met' if wall >= TARGET_SPEEDUP else 'MISSED'}); held-out loss retune "
        f"{gap:+.2%} vs TRL (equal within {LOSS_TOLERANCE:.0%}: "
        f"{'yes' if gap <= LOSS_TOLERANCE else 'NO'})"
    )
    for side, f in figures.items():
        share = flops / f["loop_s"] / 1e9 / peak
        print(
            f"{side}: {flops / 1e12:.2f} TFLOP needed on real tokens in {f['loop_s']:.1f} s of "
            f"training steps = {flops / f['loop_s'] / 1e9:.0f} GFLOP/s = {share:.0%} of the "
            f"{peak:.0f} GFLOP/s {precision} matmul peak"
        )
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=320, help="training conversations")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--side", choices=["retune", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args.side, args.train_rows, args.bf16, args.out)
        return 0

    load = os.getloadavg()[0]
    print(
        f"retune vs TRL {_version('trl')} SFTTrainer, LoRA r {LORA['r']} on "
        f"{'+'.join(LORA['targets'])}: SmolLM2-135M-Instruct, {args.train_rows} Django "
        f"en->de conversations, batch {BATCH}, max length {MAX_LENGTH}, one epoch, "
        f"{'bf16' if args.bf16 else 'fp32'}, {os.cpu_count()} CPUs; load average at start "
        f"{load:.2f}"
    )
    model, tokenizer = load_model()
    real, answers = token_counts(tokenizer, load_data(args.train_rows)["train"])
    flops = necessary_flops(model, real, answers)
    del model
    figures = {}
    for side in ("retune", "trl"):
        figures[side] = spawn_side(side, args.train_rows, args.bf16)
        figures[side]["tokens_per_s"] = real / figures[side]["loop_s"]
        print(f"  {side:7} {figures[side]['wall_s']:7.1f} s", flush=True)
    peak = matmul_peak_gflops(args.bf16)
    print(f"real tokens {real:,} (answer tokens {answers:,}); matmul peak {peak:.0f} GFLOP/s")
    missed = report(figures, peak, flops, args)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        summary = {"sides": figures, "peak_gflops": peak, "flops": flops, "real_tokens": real}
        args.json.write_text(json.dumps(summary | {"args": vars(args) | {"json": None}}, indent=2))
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 1 if missed and args.check else 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
