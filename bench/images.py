"""Time retune's image fine-tuning against the plain PyTorch transfer-learning loop.

Run from the project root: ``.venv/bin/python bench/images.py`` (see bench/README.md).
Both sides train ImageNet MobileNetV2 (``pipeline.image_models.load_mobilenet_v2``) with a
new 10-class head on Fashion-MNIST. retune is ``train_image_classifier`` (``head``: pooled
features of the frozen backbone computed once; ``partial``: the stem and first 10 blocks
frozen, their output cached); the baseline is the loop of torchvision's transfer-learning
tutorial (``requires_grad=False`` on the same stages, ``model.train()``, the full forward on
every batch, a validation phase per epoch). Each side of each case runs in its own fresh
Python process, so that peak memory (the RSS high-water mark) is its own. Exits 1 if a
target is missed, with ``--check``.
"""

from __future__ import annotations

import argparse
import copy
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

from pipeline.config import FASHION_MNIST_LABELS, RetuneConfig  # noqa: E402

SEED = 0
VAL_PER_CLASS = 50  # from the training file, after the training images of each class
TEST_PER_CLASS = 100  # from the test file
ACCURACY_TOLERANCE = 0.01  # "equal accuracy": retune at most 1 point below the baseline
SIDES = ("retune", "pytorch")
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true"}
# The image kind's training defaults (learning rates, weight decay, batch size, warmup,
# clipping), read once so both sides use the same numbers.
IMAGE_TRAIN = RetuneConfig.model_validate({"task": "image-classification"}).train


@dataclass(frozen=True)
class Case:
    """One comparison: what trains, and the speed-up asked for (baseline wall / retune wall)."""

    name: str
    strategy: str
    frozen_blocks: int  # partial: blocks frozen after the stem (retune's train.frozen_layers)
    target: float


CASES = {
    c.name: c
    for c in [
        Case("head", "head", 0, 3.0),
        Case("partial", "partial", IMAGE_TRAIN.frozen_layers, 1.5),
    ]
}


# --- shared by both sides (run inside the child processes) --------------------------------


def first_per_class(labels: np.ndarray, start: int, count: int) -> np.ndarray:
    """Row indices of the ``start``..``start + count`` th image of each class, in file order."""
    rows = [np.flatnonzero(labels == k)[start : start + count] for k in range(10)]
    return np.sort(np.concatenate(rows))


def load_data(per_class: int, size: int) -> dict[str, tuple[Any, np.ndarray]]:
    """Fashion-MNIST as (N, 3, S, S) uint8 squares (``square_pixels``) and label ids:
    train = the first ``per_class`` training images of each class, validation the next
    :data:`VAL_PER_CLASS`, test the first :data:`TEST_PER_CLASS` of the test file."""
    from pipeline.image_models import square_pixels
    from pipeline.images import FASHION_MNIST_DIR, read_idx_images, read_idx_labels

    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(
            f"Fashion-MNIST is not installed under {FASHION_MNIST_DIR}: "
            "sudo apt-get install dataset-fashion-mnist"
        )
    train_x = read_idx_images(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    train_y = read_idx_labels(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    test_x = read_idx_images(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx_labels(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    picks = {
        "train": (train_x, train_y, first_per_class(train_y, 0, per_class)),
        "validation": (train_x, train_y, first_per_class(train_y, per_class, VAL_PER_CLASS)),
        "test": (test_x, test_y, first_per_class(test_y, 0, TEST_PER_CLASS)),
    }
    return {
        split: (square_pixels(list(x[rows]), size), y[rows].astype(np.int64))
        for split, (x, y, rows) in picks.items()
    }


def test_accuracy(model: Any, pixels: Any, labels: np.ndarray, size: int, bf16: bool) -> float:
    """Share of argmax(probabilities) equal to the label, by retune's ``predict_proba``
    (the centre crop, ImageNet mean and std) for both sides."""
    from pipeline.image_models import ImageSpec
    from pipeline.image_training import predict_proba

    spec = ImageSpec("mobilenet_v2", FASHION_MNIST_LABELS, size)
    return float((predict_proba(model, pixels, spec, bf16).argmax(1) == labels).mean())


def run_retune(case: Case, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    from pipeline.config import ImageConfig
    from pipeline.image_training import ImageSplits, train_image_classifier

    config = IMAGE_TRAIN.model_copy(
        update={
            "strategy": case.strategy,
            "frozen_layers": case.frozen_blocks,
            "epochs": args.epochs,
            "patience": args.epochs,  # no early stop: every epoch runs, as on the baseline
            "bf16": args.bf16,
            "seed": SEED,
            "cache_frozen": True,
        }
    )
    (train_x, train_y), (val_x, val_y) = data["train"], data["validation"]
    splits = ImageSplits(train_x, train_y, val_x, val_y)
    with tempfile.TemporaryDirectory() as out_dir:
        start, cpu = time.perf_counter(), time.process_time()
        model, _, result = train_image_classifier(
            config, ImageConfig(size=args.size), FASHION_MNIST_LABELS, splits, Path(out_dir)
        )
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    import torch

    return {
        "wall_s": wall,
        "cpu_s": cpu,  # CPU seconds of all this process's threads over the same span
        "loop_s": result.train_seconds,  # training steps only: no cache, no validation
        "trainable": result.trainable_parameters,
        "bf16": result.bf16,
        "best_epoch": result.best_epoch,
        "threads": torch.get_num_threads(),
        "test_accuracy": test_accuracy(model, *data["test"], args.size, args.bf16),
    }


def linear_schedule(total: int, warmup_ratio: float):
    """retune's schedule (``Optimization.build``): linear warmup, then linear decay to 0."""
    warmup = max(1, int(warmup_ratio * total))
    return lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup + 1e-9)))


def run_pytorch(case: Case, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    """The transfer-learning tutorial's loop: freeze, ``model.train()``, the full forward on
    every batch of preprocessed images, a validation phase per epoch, keep the best weights
    by validation accuracy."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.finetune import pick_device
    from pipeline.image_models import centre_crop, load_mobilenet_v2, normalise

    cfg = IMAGE_TRAIN
    (train_x, train_y), (val_x, val_y) = data["train"], data["validation"]
    device = pick_device()  # retune's choice, so both sides run on the same device
    start, cpu = time.perf_counter(), time.process_time()
    model = load_mobilenet_v2()
    torch.manual_seed(SEED)  # the same seeded head as retune's build_classifier draws
    model.classifier[1] = nn.Linear(1280, len(FASHION_MNIST_LABELS))
    model.to(device)
    frozen = model.features if case.strategy == "head" else model.features[: case.frozen_blocks + 1]
    for p in frozen.parameters():
        p.requires_grad = False
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():  # as retune's ImageLoop._setup_optimizer
        if p.requires_grad:
            lr = cfg.head_learning_rate if name.startswith("classifier.") else cfg.learning_rate
            groups.setdefault((lr, 0.0 if p.ndim < 2 else cfg.weight_decay), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    )
    loaders = {
        "train": DataLoader(
            TensorDataset(train_x, torch.as_tensor(train_y)),
            batch_size=cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(SEED),
        ),
        "val": DataLoader(TensorDataset(val_x, torch.as_tensor(val_y)), batch_size=256),
    }
    total = len(loaders["train"]) * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(total, cfg.warmup_ratio)
    )
    trainables = [p for p in model.parameters() if p.requires_grad]
    criterion = nn.CrossEntropyLoss()
    best_acc, best_weights, best_epoch, loop_s = -1.0, None, 0, 0.0
    for epoch in range(1, args.epochs + 1):
        for phase in ("train", "val"):
            model.train(phase == "train")  # frozen BatchNorm layers too, as in the tutorial
            tick, correct = time.perf_counter(), 0
            for squares, labels in loaders[phase]:
                # the tutorial's transform, without augmentation: centre crop, mean/std
                inputs = normalise(centre_crop(squares, args.size)).to(device)  # (B, 3, S, S)
                labels = labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                        outputs = model(inputs)
                    loss = criterion(outputs.float(), labels)
                    if phase == "train":
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(trainables, cfg.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                correct += int((outputs.argmax(1) == labels).sum())
            if phase == "train":
                loop_s += time.perf_counter() - tick
            elif correct / len(val_y) > best_acc:
                best_acc, best_epoch = correct / len(val_y), epoch
                best_weights = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_weights)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "wall_s": wall,
        "cpu_s": cpu,  # CPU seconds of all this process's threads over the same span
        "loop_s": loop_s,
        "trainable": sum(p.numel() for p in trainables),
        "bf16": args.bf16,
        "best_epoch": best_epoch,
        "threads": torch.get_num_threads(),
        "test_accuracy": test_accuracy(model, *data["test"], args.size, args.bf16),
    }


def run_side(side: str, case: Case, args: argparse.Namespace, out: Path) -> None:
    """One side of one case, in this (child) process; writes its figures to ``out``."""
    data = load_data(args.per_class, args.size)
    figures = (run_retune if side == "retune" else run_pytorch)(case, args, data)
    figures |= {split: len(labels) for split, (_, labels) in data.items()}
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    out.write_text(json.dumps(figures))


# --- the parent: run every side in its own process, then compare --------------------------


def spawn_side(side: str, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, __file__, "--side", side, "--case", case.name]
        command += ["--epochs", str(args.epochs), "--per-class", str(args.per_class)]
        command += ["--size", str(args.size), "--side-out", str(out)]
        command += ["--bf16"] if args.bf16 else []
        done = subprocess.run(
            command, cwd=ROOT, env=os.environ | QUIET_ENV, capture_output=True, text=True
        )
        if done.returncode != 0 or not out.is_file():
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise RuntimeError(f"{side} side of case {case.name} failed ({done.returncode})")
        return json.loads(out.read_text())


def compare(names: list[str], results: dict[str, dict[str, dict]]) -> tuple[dict, list[str]]:
    """Per case: baseline / retune wall and loop time, the accuracy gap, the verdicts."""
    ratios, missed = {}, []
    for name in names:
        case, ours, theirs = CASES[name], results[name]["retune"], results[name]["pytorch"]
        ratio = theirs["wall_s"] / ours["wall_s"]
        gap = ours["test_accuracy"] - theirs["test_accuracy"]
        speed_met, accuracy_met = ratio >= case.target, gap >= -ACCURACY_TOLERANCE
        if not speed_met:
            missed.append(f"{name}: {ratio:.2f}x < {case.target:g}x")
        if not accuracy_met:
            missed.append(f"{name}: accuracy {gap * 100:+.1f} points")
        ratios[name] = {
            "wall": ratio,
            "loop": theirs["loop_s"] / max(ours["loop_s"], 1e-9),
            "accuracy_points": gap * 100,
            "target": case.target,
            "speed_met": speed_met,
            "accuracy_met": accuracy_met,
        }
    return ratios, missed


def print_report(args: argparse.Namespace, results: dict, ratios: dict, missed: list[str]):
    first = next(iter(next(iter(results.values())).values()))
    print(
        f"\ntrain {first['train']:,} images ({args.per_class} per class), validation "
        f"{first['validation']:,} (both sides validate every epoch, inside their wall time), "
        f"test {first['test']:,}; size {args.size}, {args.epochs} epochs"
    )
    header = (
        f"{'case':<9}{'side':<9}{'trainable':>11}{'wall s':>9}{'cpu s':>8}{'loop s':>9}"
        f"{'img/s':>9}{'peak MiB':>10}{'best ep':>8}{'test acc':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, sides in results.items():
        for side, f in sides.items():
            print(
                f"{name:<9}{side:<9}{f['trainable']:>11,}{f['wall_s']:>9.1f}{f['cpu_s']:>8.1f}"
                f"{f['loop_s']:>9.1f}{f['images_per_s']:>9.1f}{f['peak_rss_mib']:>10.0f}"
                f"{f['best_epoch']:>8}{f['test_accuracy']:>10.4f}"
            )
    print(
        "wall s: the whole training call (retune: train_image_classifier: load, frozen-output "
        "cache, head probe fit, per-epoch\n  validation, save; pytorch: load, freeze, the "
        "epochs with their validation phases); cpu s: the CPU\n  seconds of all the "
        "process's threads over wall s; loop s: the training steps alone;\n"
        "  img/s: train images x epochs / wall s; peak MiB: the process's RSS high-water "
        "mark; best ep: the epoch whose weights\n  are kept (retune by validation loss, 0 = "
        "its fitted head before any step; pytorch by validation accuracy, as the tutorial)."
    )
    print(
        "note: the pytorch side calls model.train() as the tutorial does, so the BatchNorm "
        "layers of its frozen stages\n  normalise by batch statistics and update their "
        "running statistics; retune keeps frozen stages in eval mode."
    )
    print("\nratios (pytorch / retune)")
    for name, r in ratios.items():
        verdict = (
            f"target >= {r['target']:g}x {'met' if r['speed_met'] else 'MISSED'}, "
            f"accuracy {'equal' if r['accuracy_met'] else 'LOWER'}"
        )
        print(
            f"  {name:<9}wall {r['wall']:6.2f}x   loop {r['loop']:6.2f}x   "
            f"accuracy {r['accuracy_points']:+5.1f} points   {verdict}"
        )
    if missed:
        print("targets missed: " + "; ".join(missed))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: %(default)s")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--size", type=int, default=64, help="pixels per side the model sees")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/images.json")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 1 or args.per_class < 1 or args.size < 16:
        parser.error("--epochs and --per-class must be at least 1, --size at least 16")
    if args.side:  # a child process: one side of one case
        run_side(args.side, CASES[args.case], args, args.side_out)
        return 0

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown or not names:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    load_start = os.getloadavg()[0]
    print(
        f"retune vs the PyTorch transfer-learning loop on Fashion-MNIST, MobileNetV2: "
        f"{args.per_class} per class, size {args.size}, {args.epochs} epochs, batch "
        f"{IMAGE_TRAIN.batch_size}, LR head {IMAGE_TRAIN.head_learning_rate:g} / backbone "
        f"{IMAGE_TRAIN.learning_rate:g}, weight decay {IMAGE_TRAIN.weight_decay:g}, warmup "
        f"{IMAGE_TRAIN.warmup_ratio}, seed {SEED}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"{os.cpu_count()} CPUs; load average at start {load_start:.2f}"
    )
    results: dict[str, dict[str, dict]] = {}
    for name in names:
        for side in SIDES:
            figures = spawn_side(side, CASES[name], args)
            figures["images_per_s"] = figures["train"] * args.epochs / figures["wall_s"]
            results.setdefault(name, {})[side] = figures
            print(
                f"  {name:<9}{side:<8} {figures['wall_s']:7.1f} s  "
                f"test accuracy {figures['test_accuracy']:.4f}",
                flush=True,
            )
    load_end = os.getloadavg()[0]
    print(f"load average at end {load_end:.2f} (other processes share the CPU)")
    ratios, missed = compare(names, results)
    print_report(args, results, ratios, missed)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "cases": results,
            "ratios": ratios,
            "missed": missed,
            "load_average": [load_start, load_end],
            "cpus": os.cpu_count(),
            "args": {k: v for k, v in vars(args).items() if k not in {"side", "case", "side_out"}}
            | {"out": str(args.out)},
        }
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"figures in {args.out}")
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
