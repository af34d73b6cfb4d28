"""Time retune's fine-tuning engine against a plain transformers Trainer on Rotten Tomatoes.

Run from the project root: ``.venv/bin/python bench/finetune.py`` (see bench/README.md).
Each side of each case runs in its own fresh Python process, so that peak memory (the
process's RSS high-water mark) is its own. Exits 1 if a target is missed, with ``--check``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import DataConfig, TrainConfig  # noqa: E402

BASE_MODEL = "packaged:all-MiniLM-L6-v2"
MAX_LENGTH = 64
BATCH_SIZE = 32
SEED = 0
WARMUP_RATIO = 0.06
WEIGHT_DECAY = 0.01
ACCURACY_TOLERANCE = 0.01  # "equal accuracy": retune at most 1 point below the Trainer
MFU_TARGET = 0.50
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
}


@dataclass(frozen=True)
class Case:
    """One comparison: what trains, for how long, at which LR, and the speed-up asked for."""

    name: str
    strategy: str
    epochs: int
    learning_rate: float  # every trainable parameter, on both sides
    frozen_layers: int = 0
    bf16: bool = False
    target: float | None = None  # Trainer wall time / retune wall time
    equal_accuracy: bool = False
    trainer: bool = True  # full-bf16 runs retune only, next to full


CASES = {
    c.name: c
    for c in [
        # head: only the head trains, so its one LR is the library's head default.
        Case(
            "head", "head", 10, TrainConfig().head_learning_rate, target=10.0, equal_accuracy=True
        ),
        Case("partial", "partial", 3, 5e-5, frozen_layers=4, target=1.5),
        Case("full", "full", 3, 5e-5, target=1.3, equal_accuracy=True),
        Case("full-bf16", "full", 3, 5e-5, bf16=True, trainer=False),
    ]
}


# --- shared by both sides (run inside the child processes) --------------------------------


def load_data(train_rows: int | None) -> dict[str, tuple[list[str], np.ndarray]]:
    """Texts and label indices per split; train optionally a seeded subset of its rows."""
    from pipeline.data import prepare_frames

    config = DataConfig()
    frames = prepare_frames(config, ROOT)
    if train_rows is not None and train_rows < len(frames["train"]):
        frames["train"] = frames["train"].sample(n=train_rows, random_state=SEED)
    index = {label: i for i, label in enumerate(config.labels)}
    return {
        split: (frame["text"].tolist(), frame["label"].map(index).to_numpy(dtype=np.int64))
        for split, frame in frames.items()
    }


def argmax_accuracy(
    model: Any, tokenizer: Any, texts: list[str], labels: np.ndarray, bf16: bool
) -> float:
    """Share of argmax(logits) equal to the label (retune's batched, length-sorted predict)."""
    from pipeline.finetune import predict_proba

    pred = predict_proba(model, tokenizer, texts, 128, MAX_LENGTH, bf16).argmax(1)
    return float((pred == labels).mean())


def training_flops(model: Any, lengths: list[int], epochs: int) -> float:
    """Training FLOPs over real tokens: per token 6 x non-embedding parameters (forward +
    backward of every matmul), plus attention's 12 x hidden x sequence length per layer."""
    embedding = sum(p.numel() for p in model.base_model.embeddings.parameters())
    dense = sum(p.numel() for p in model.parameters()) - embedding
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    per_epoch = sum(n * (6 * dense + 12 * layers * hidden * n) for n in lengths)
    return float(per_epoch * epochs)


def run_retune(case: Case, epochs: int, data: dict) -> dict[str, Any]:
    from pipeline.finetune import fine_tune, load_classifier, tokenize_all

    model, tokenizer = load_classifier(BASE_MODEL, DataConfig().labels, SEED)
    config = TrainConfig(
        base_model=BASE_MODEL,
        strategy=case.strategy,
        frozen_layers=case.frozen_layers,
        learning_rate=case.learning_rate,
        head_learning_rate=case.learning_rate,  # one LR for all, as the Trainer has
        epochs=epochs,
        patience=epochs,  # no early stop: every epoch runs, as on the Trainer side
        batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        bf16=case.bf16,
        seed=SEED,
        warmup_ratio=WARMUP_RATIO,
        weight_decay=WEIGHT_DECAY,
        cache_frozen=True,
    )
    (train_x, train_y), (val_x, val_y) = data["train"], data["validation"]
    start = time.perf_counter()
    result = fine_tune(model, tokenizer, train_x, train_y, val_x, val_y, config)
    wall = time.perf_counter() - start
    lengths = [len(ids) for ids in tokenize_all(tokenizer, train_x, MAX_LENGTH)]
    return {
        "wall_s": wall,
        "loop_s": result.train_seconds,  # training steps only: no tokenising, cache, validation
        "trainable": result.trainable_parameters,
        "bf16": result.bf16,
        "best_epoch": result.best_epoch,
        "flops": training_flops(model, lengths, epochs),
        "tokens": sum(lengths) * epochs,
        "test_accuracy": argmax_accuracy(model, tokenizer, *data["test"], bf16=case.bf16),
    }


def run_trainer(case: Case, epochs: int, data: dict) -> dict[str, Any]:
    """The usual Trainer recipe: tokenise with truncation, pad per batch, freeze, train."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from pipeline.finetune import load_classifier

    model, tokenizer = load_classifier(BASE_MODEL, DataConfig().labels, SEED)  # same init
    if case.strategy == "head":
        frozen = [model.bert]
    elif case.strategy == "partial":
        frozen = [model.bert.embeddings, *model.bert.encoder.layer[: case.frozen_layers]]
    else:
        frozen = []
    for module in frozen:
        for p in module.parameters():
            p.requires_grad = False
    (train_x, train_y) = data["train"]
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=BATCH_SIZE,
            num_train_epochs=epochs,
            learning_rate=case.learning_rate,
            weight_decay=WEIGHT_DECAY,
            warmup_steps=WARMUP_RATIO,  # a float below 1 is a ratio of the total steps
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            seed=SEED,
            bf16=case.bf16,
            use_cpu=True,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        start = time.perf_counter()
        encoded = tokenizer(train_x, truncation=True, max_length=MAX_LENGTH)
        train_set = [
            {**{k: v[i] for k, v in encoded.items()}, "labels": int(y)}
            for i, y in enumerate(train_y)
        ]
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        output = trainer.train()
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "loop_s": output.metrics["train_runtime"],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "bf16": case.bf16,
        "test_accuracy": argmax_accuracy(model, tokenizer, *data["test"], bf16=case.bf16),
    }


def run_side(side: str, case: Case, epochs: int, train_rows: int | None, out: Path) -> None:
    """One side of one case, in this (child) process; writes its figures to ``out``."""
    data = load_data(train_rows)
    figures = (run_retune if side == "retune" else run_trainer)(case, epochs, data)
    figures["rows"] = len(data["train"][0])
    figures["val_rows"] = len(data["validation"][0])
    figures["test_rows"] = len(data["test"][0])
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    out.write_text(json.dumps(figures))


# --- the parent: run every side in its own process, then compare --------------------------


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, rounds: int = 7) -> float:
    """Best fp32 GFLOP/s of ``size``-square matmuls over several rounds (2 n^3 FLOPs each)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def spawn_side(side: str, case: Case, epochs: int, train_rows: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, __file__, "--side", side, "--case", case.name]
        command += ["--epochs", str(epochs), "--out", str(out)]
        if train_rows is not None:
            command += ["--train-rows", str(train_rows)]
        done = subprocess.run(
            command, cwd=ROOT, env=os.environ | QUIET_ENV, capture_output=True, text=True
        )
        if done.returncode != 0 or not out.is_file():
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise RuntimeError(f"{side} side of case {case.name} failed ({done.returncode})")
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: %(default)s")
    parser.add_argument("--train-rows", type=int, default=None, help="seeded subset (default all)")
    parser.add_argument(
        "--epochs-scale", type=float, default=1.0, help="multiply every case's epochs (min 1)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--side", choices=["retune", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child process: one side of one case
        run_side(args.side, CASES[args.case], args.epochs, args.train_rows, args.out)
        return 0

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    print(
        f"retune vs transformers Trainer on Rotten Tomatoes: train rows "
        f"{args.train_rows or 'all'}, max length {MAX_LENGTH}, batch {BATCH_SIZE}, "
        f"warmup {WARMUP_RATIO}, weight decay {WEIGHT_DECAY}, seed {SEED}, "
        f"{os.cpu_count()} CPUs, torch threads default; load average at start "
        f"{os.getloadavg()[0]:.2f}"
    )
    results: dict[tuple[str, str], dict[str, Any]] = {}
    peak = None
    for name in names:
        case = CASES[name]
        epochs = max(1, round(case.epochs * args.epochs_scale))
        if case.strategy == "full" and peak is None:
            peak = matmul_peak_gflops()
            print(f"fp32 matmul peak (2048^2, best of 7 rounds): {peak:.0f} GFLOP/s")
        sides = ["retune", "trainer"] if case.trainer else ["retune"]
        for side in sides:
            figures = spawn_side(side, case, epochs, args.train_rows)
            figures["epochs"] = epochs
            figures["seq_s"] = figures["rows"] * epochs / figures["wall_s"]
            results[name, side] = figures
            print(
                f"  {name:<10}{side:<8} {figures['wall_s']:7.1f} s  "
                f"test accuracy {figures['test_accuracy']:.4f}",
                flush=True,
            )

    print(f"load average at end {os.getloadavg()[0]:.2f} (other processes share the CPU)")
    rows = next(iter(results.values()))
    print(
        f"\ntrain rows {rows['rows']:,}, validation {rows['val_rows']:,} (retune validates "
        f"every epoch, inside its wall time; the Trainer side does not evaluate), "
        f"test {rows['test_rows']:,}"
    )
    header = (
        f"{'case':<10}{'side':<9}{'epochs':>6}{'trainable':>11}{'wall s':>9}{'loop s':>9}"
        f"{'seq/s':>8}{'peak MiB':>10}{'test acc':>10}"
    )
    print(header)
    print("-" * len(header))
    for (name, side), f in results.items():
        print(
            f"{name:<10}{side:<9}{f['epochs']:>6}{f['trainable']:>11,}{f['wall_s']:>9.1f}"
            f"{f['loop_s']:>9.1f}{f['seq_s']:>8.1f}{f['peak_rss_mib']:>10.0f}"
            f"{f['test_accuracy']:>10.4f}"
        )
    print(
        "wall s: the whole training call (retune: fine_tune with tokenising, frozen-layer "
        "cache and per-epoch validation;\n  Trainer: tokenising, Trainer() and train()); "
        "loop s: the training steps alone (retune's train_seconds, Trainer's train_runtime);\n"
        "  seq/s: train rows x epochs / wall s; peak MiB: the process's RSS high-water mark; "
        "retune keeps its best epoch by validation loss."
    )

    missed = []
    print("\nratios (Trainer / retune)")
    for name in names:
        case = CASES[name]
        if not case.trainer:
            continue
        ours, theirs = results[name, "retune"], results[name, "trainer"]
        ratio = theirs["wall_s"] / ours["wall_s"]
        loop_ratio = theirs["loop_s"] / ours["loop_s"]
        gap = ours["test_accuracy"] - theirs["test_accuracy"]
        verdict = []
        if case.target is not None:
            met = ratio >= case.target
            verdict.append(f"target >= {case.target:g}x {'met' if met else 'MISSED'}")
            if not met:
                missed.append(f"{name}: {ratio:.2f}x < {case.target:g}x")
        if case.equal_accuracy:
            met = gap >= -ACCURACY_TOLERANCE
            verdict.append(f"accuracy {'equal' if met else 'LOWER'}")
            if not met:
                missed.append(f"{name}: accuracy {gap * 100:+.1f} points")
        print(
            f"  {name:<10}wall {ratio:6.2f}x   loop {loop_ratio:6.2f}x   "
            f"accuracy {gap * 100:+5.1f} points   {', '.join(verdict)}"
        )

    if ("full", "retune") in results and peak is not None:
        f = results["full", "retune"]
        achieved = f["flops"] / f["loop_s"] / 1e9
        fraction = achieved / peak
        print(
            f"\nfull, retune: {f['flops'] / 1e12:.1f} TFLOP over {f['tokens']:,} real tokens "
            f"(6 x non-embedding params + attention) in {f['loop_s']:.1f} s of training steps "
            f"= {achieved:.0f} GFLOP/s = {fraction:.0%} of the {peak:.0f} GFLOP/s fp32 peak "
            f"(target >= {MFU_TARGET:.0%}: {'met' if fraction >= MFU_TARGET else 'MISSED'}); "
            f"over the whole wall time {f['flops'] / f['wall_s'] / 1e9 / peak:.0%}"
        )
        if fraction < MFU_TARGET:
            missed.append(f"full: {fraction:.0%} of the fp32 matmul peak < {MFU_TARGET:.0%}")
    if ("full-bf16", "retune") in results and peak is not None:
        # Informational: bf16 autocast is the default where the CPU supports it.
        f = results["full-bf16", "retune"]
        achieved = f["flops"] / f["loop_s"] / 1e9
        print(
            f"full-bf16, retune: {achieved:.0f} GFLOP/s in training steps = "
            f"{achieved / peak:.0%} of the fp32 peak (the target above is judged on fp32)"
        )
    if ("full", "retune") in results and ("full-bf16", "retune") in results:
        fp32, bf16 = results["full", "retune"], results["full-bf16", "retune"]
        print(
            f"full, retune, fp32 vs bf16 autocast: wall {fp32['wall_s']:.1f} s vs "
            f"{bf16['wall_s']:.1f} s ({fp32['wall_s'] / bf16['wall_s']:.2f}x), "
            f"test accuracy {fp32['test_accuracy']:.4f} vs {bf16['test_accuracy']:.4f}"
        )
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
