"""Forgetting against accuracy: every strategy, with and without each mitigation, on MiniLM.

Run from the project root: ``.venv/bin/python bench/forgetting.py`` (see bench/README.md).
Each case fine-tunes the example task (Rotten Tomatoes, the default ``retune run`` training
config except what the case changes), then measures test accuracy and the retention suite
against the base model, with the paired bootstrap intervals and the gate's verdict.
Results are appended to a JSON-lines file as each case finishes, so an interrupted run
resumes where it stopped; the table is printed from that file.

Case syntax: ``STRATEGY[+l2sp=W][+distill=W][+wise]``, e.g. ``full+distill=5+wise``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import DataConfig, ForgettingConfig, TrainConfig  # noqa: E402

DEFAULT_CASES = [
    "head",
    "partial+wise",  # also the plain "partial" row
    "full+wise",
    "partial+l2sp=100",
    "partial+distill=1",
    "partial+distill=5",
    "full+distill=5+wise",
    "lora",
    "lp-ft",
]
RESULTS = ROOT / "bench" / "results" / "forgetting.jsonl"


def parse_case(spec: str) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """``full+distill=5+wise`` -> (train overrides, forgetting overrides, wise)."""
    strategy, *parts = spec.split("+")
    if strategy not in {"head", "partial", "full", "lora", "lp-ft"}:
        raise SystemExit(f"case {spec!r}: unknown strategy {strategy!r}")
    keep: dict[str, Any] = {}
    wise = False
    for part in parts:
        key, _, value = part.partition("=")
        if key == "wise" and not value:
            wise = True
        elif key in {"l2sp", "distill"} and value:
            keep[key] = float(value)
        else:
            raise SystemExit(f"case {spec!r}: expected +l2sp=W, +distill=W or +wise, got {part!r}")
    return {"strategy": strategy}, keep, wise


def label_ids(frame: Any, labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return frame["label"].map(index).to_numpy(dtype=np.int64)


def run_case(
    spec: str, frames: dict[str, Any], suite: Any, base: dict[str, Any], keep_cfg: ForgettingConfig
) -> list[dict[str, Any]]:
    """Train one case; with +wise, rows for the tuned model and for its chosen blend."""
    from pipeline import evaluate, finetune, forgetting, mitigation

    train_over, keep_over, wise = parse_case(spec)
    cfg = TrainConfig(**train_over)
    # No mitigation unless the case names one (the config's default distils).
    keep = keep_cfg.model_copy(update={"l2sp": 0.0, "distill": 0.0} | keep_over)
    labels = DataConfig().labels
    train, val, test = frames["train"], frames["validation"], frames["test"]
    model, tokenizer = finetune.load_classifier(cfg.base_model, labels, cfg.seed)
    base_state = mitigation.encoder_state(model) if wise else None
    regularizer = mitigation.build_regularizer(
        model, tokenizer, keep.l2sp, keep.distill, keep.distill_batch_size, cfg.seed
    )
    if cfg.strategy == "lora":
        model = finetune.apply_lora(model, cfg)
    tick = time.perf_counter()
    result = finetune.fine_tune(
        model,
        tokenizer,
        train["text"].tolist(),
        label_ids(train, labels),
        val["text"].tolist(),
        label_ids(val, labels),
        cfg,
        regularizer=regularizer,
    )
    train_seconds = time.perf_counter() - tick
    if cfg.strategy == "lora":
        model = finetune.finish_lora(model)

    def retain(m: Any) -> forgetting.Comparison:
        outputs = forgetting.score_encoder(
            m.base_model, tokenizer, suite.tasks, 128, keep.max_length
        )
        return forgetting.compare(base, outputs, suite.tasks, "base", keep.bootstrap, keep.seed)

    def accuracy(m: Any, frame: Any) -> float:
        probs = finetune.predict_proba(m, tokenizer, frame["text"].tolist(), 128, cfg.max_length)
        return float((probs.argmax(1) == label_ids(frame, labels)).mean())

    def macro_f1(m: Any) -> float:
        probs = finetune.predict_proba(m, tokenizer, val["text"].tolist(), 128, cfg.max_length)
        report = evaluate.classification_metrics(label_ids(val, labels), probs.argmax(1), labels)
        return report.macro_f1

    def row(case: str, choice: Any = None) -> dict[str, Any]:
        kept = retain(model)
        return {
            "case": case,
            "test_accuracy": accuracy(model, test),
            "mean_drop": kept.mean_drop,
            "mean_ci": [kept.mean_ci_low, kept.mean_ci_high],
            "worst_task": kept.worst_task,
            "worst_drop": kept.worst_drop,
            "drops": {r.task: r.drop for r in kept.tasks},
            "gate": "pass" if forgetting.forgetting_gate(kept, keep).passed else "refuse",
            "alpha": choice.alpha if choice else None,
            "alpha_curve": [vars(p) for p in choice.curve] if choice else None,
            "train_seconds": train_seconds,
            "best_epoch": result.best_epoch,
        }

    if not wise:
        return [row(spec)]
    # The tuned model as it is, then the WiSE-FT blend: one training for both rows.
    rows = [row(spec.removesuffix("+wise"))]
    assert base_state is not None
    choice = mitigation.wise_ft(
        model,
        base_state,
        keep.wise_ft_alphas,
        macro_f1,
        retain,
        lambda c: forgetting.forgetting_gate(c, keep).passed,
    )
    return [*rows, row(spec, choice)]


def print_table(rows: list[dict[str, Any]], tasks: list[str]) -> None:
    head = ["case", "test acc", "mean drop [95% CI]", "worst", *tasks, "alpha", "gate", "train s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            r["case"],
            f"{r['test_accuracy']:.3f}",
            f"{r['mean_drop']:+.3f} [{r['mean_ci'][0]:+.3f}, {r['mean_ci'][1]:+.3f}]",
            f"{r['worst_task']} {r['worst_drop']:+.3f}",
            *(f"{r['drops'][t]:+.3f}" for t in tasks),
            "-" if r["alpha"] is None else f"{r['alpha']:.2f}",
            r["gate"],
            f"{r['train_seconds']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="%(default)s")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines, appended")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results")
    parser.add_argument("--suite-only", action="store_true", help="only time the suite")
    args = parser.parse_args()

    from pipeline import finetune, forgetting, retention
    from pipeline.data import prepare_frames
    from pipeline.embeddings import embed_layers
    from pipeline.versioning import folder_md5

    keep_cfg = ForgettingConfig()
    scratch = Path(tempfile.mkdtemp(prefix="retune-bench-"))
    tick = time.perf_counter()
    warnings = retention.build_suite(scratch / "suite", keep_cfg, ROOT)
    tasks = retention.load_suite(scratch / "suite")
    suite = retention.Suite(tasks, folder_md5(scratch / "suite"), warnings, scratch / "suite")
    print(
        f"suite {suite.md5}: {', '.join(t.name for t in tasks)} built in "
        f"{time.perf_counter() - tick:.1f} s {warnings or ''}",
        flush=True,
    )

    encoder, tokenizer = finetune.load_encoder(TrainConfig().base_model)
    tick = time.perf_counter()
    base = forgetting.score_encoder(encoder, tokenizer, tasks, 128, keep_cfg.max_length)
    scored = time.perf_counter() - tick
    layers = embed_layers(encoder, tokenizer, forgetting.cka_texts(tasks, keep_cfg.cka_texts))
    whole = time.perf_counter() - tick
    cache = forgetting.cache_file(scratch / "cache", "bench", suite.md5)
    forgetting.save_cached(cache, base, layers)
    tick = time.perf_counter()
    forgetting.load_cached(cache, tasks)
    cached = time.perf_counter() - tick
    scores = ", ".join(f"{name} {out.score:.3f}" for name, out in base.items())
    print(f"base MiniLM: {scores}")
    print(
        f"suite on MiniLM: {scored:.1f} s scoring + {whole - scored:.1f} s CKA layers = "
        f"{whole:.1f} s cold; {cached * 1000:.0f} ms from the cache (ratio {whole / cached:.0f}x)",
        flush=True,
    )
    if args.suite_only:
        return 0 if whole < 30 else 1

    done: dict[str, dict[str, Any]] = {}
    if args.results.is_file() and not args.fresh:
        for line in args.results.read_text().splitlines():
            row = json.loads(line)
            done[row["case"]] = row
    args.results.parent.mkdir(parents=True, exist_ok=True)
    frames = prepare_frames(DataConfig(), scratch / "data")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for spec in cases:
        if spec in done:
            continue
        print(f"--- {spec}", flush=True)
        for row in run_case(spec, frames, suite, base, keep_cfg):
            done[row["case"]] = row
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print_table([row], [t.name for t in tasks])
    print()
    names = [n for c in cases for n in ([c.removesuffix("+wise"), c] if "+wise" in c else [c])]
    print_table([done[n] for n in dict.fromkeys(names) if n in done], [t.name for t in tasks])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
