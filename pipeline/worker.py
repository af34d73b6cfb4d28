"""Training as a process of its own: ``python -m pipeline.worker SPEC.json``.

Used for data-parallel training (``torchrun --nproc_per_node=N -m pipeline.worker SPEC``,
gloo on CPU, NCCL on CUDA) and for resumable runs in a separate process. The spec names
the base model, labels, config, the train/validation CSVs, the output folder and an
optional checkpoint folder; rank 0 saves the trained model (safetensors + tokenizer) and
``result.json``. Exit code 143 means SIGTERM: a checkpoint was written; run it again to
resume.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import TrainConfig
from pipeline.finetune import (
    EpochRecord,
    FineTuneResult,
    TrainingInterrupted,
    apply_lora,
    fine_tune,
    finish_lora,
    load_classifier,
    save_model,
)


def write_spec(
    path: Path,
    config: TrainConfig,
    labels: list[str],
    train_csv: Path,
    val_csv: Path,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
) -> Path:
    """Write the JSON spec this worker reads."""
    spec = {
        "config": config.model_dump(),
        "labels": labels,
        "train_csv": str(train_csv),
        "val_csv": str(val_csv),
        "out_dir": str(out_dir),
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
    }
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return path


def run(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    config = TrainConfig.model_validate(spec["config"])
    labels: list[str] = spec["labels"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = int(os.environ.get("RANK", "0"))
    index = {label: i for i, label in enumerate(labels)}
    train = pd.read_csv(spec["train_csv"], dtype=str, keep_default_na=False)
    val = pd.read_csv(spec["val_csv"], dtype=str, keep_default_na=False)
    model, tokenizer = load_classifier(config.base_model, labels, config.seed)
    if config.strategy == "lora":
        model = apply_lora(model, config)
    checkpoint_dir = Path(spec["checkpoint_dir"]) if spec["checkpoint_dir"] else None
    try:
        result = fine_tune(
            model,
            tokenizer,
            train["text"].tolist(),
            train["label"].map(index).to_numpy(dtype=np.int64),
            val["text"].tolist(),
            val["label"].map(index).to_numpy(dtype=np.int64),
            config,
            checkpoint_dir=checkpoint_dir,
        )
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 143
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        out = Path(spec["out_dir"])
        if config.strategy == "lora":
            if not config.lora_merge:
                model.save_pretrained(out.parent / "adapter")
            model = finish_lora(model, merge=True)  # the served model is always merged
        save_model(model, tokenizer, out)
        (out / "result.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))


def launch(spec_path: Path, nproc_per_node: int, nnodes: int = 1) -> None:
    """Run this worker under torchrun (data-parallel) and wait for it.

    Raises:
        RuntimeError: torchrun failed; its exit code and the tail of its output.
    """
    import subprocess

    if nnodes == 1:
        topology = ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        # Every node runs this same launch; they meet at RETUNE_RDZV_ENDPOINT (host:port).
        endpoint = os.environ.get("RETUNE_RDZV_ENDPOINT")
        if not endpoint:
            raise RuntimeError(
                "train.nnodes > 1 needs RETUNE_RDZV_ENDPOINT=host:port on every node"
            )
        topology = [
            f"--nnodes={nnodes}",
            f"--nproc_per_node={nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
        ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *topology,
        "-m",
        "pipeline.worker",
        str(spec_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited with {done.returncode}: {done.stderr[-2000:]}")


def read_result(out_dir: Path) -> FineTuneResult:
    """The FineTuneResult that rank 0 wrote next to the model."""
    raw = json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
    raw["history"] = [EpochRecord(**h) for h in raw["history"]]
    return FineTuneResult(**raw)
