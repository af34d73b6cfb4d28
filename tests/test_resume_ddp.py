"""Training in its own process: SIGTERM and resume, and 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import TrainConfig
from pipeline.worker import launch, read_result, write_spec

pytestmark = pytest.mark.integration


def base_without_dropout(folder: Path, out: Path) -> Path:
    """A copy of the tiny base model with dropout off, so ranks and processes agree exactly."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(
        folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def write_data(folder: Path, n: int) -> tuple[Path, Path]:
    words = ["great", "fine", "lovely", "dull", "awful", "boring"]
    rows = [
        {
            "text": f"a {words[i % 6]} film, take {i} of {n} " + "really " * (i % 7),
            "label": "pos" if i % 6 < 3 else "neg",
        }
        for i in range(n)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(rows[:64]).to_csv(folder / "val.csv", index=False)
    return folder / "train.csv", folder / "val.csv"


def worker(spec: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.worker", str(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_sigterm_mid_epoch_then_resume_gives_the_same_weights(
    tmp_path: Path, tiny_base_model: Path
):
    train_csv, val_csv = write_data(tmp_path / "data", 2400)
    config = TrainConfig(
        base_model=str(tiny_base_model),
        strategy="full",
        epochs=2,
        patience=2,
        batch_size=8,
        learning_rate=1e-3,
        head_learning_rate=1e-3,
        bf16=False,
        checkpoint_every_steps=10,
        num_threads=1,
    )
    labels = ["pos", "neg"]
    straight = write_spec(
        tmp_path / "a.json", config, labels, train_csv, val_csv, tmp_path / "a", tmp_path / "a-ckpt"
    )
    assert worker(straight).wait(timeout=600) == 0

    spec = write_spec(
        tmp_path / "b.json", config, labels, train_csv, val_csv, tmp_path / "b", tmp_path / "b-ckpt"
    )
    process = worker(spec)
    checkpoint = tmp_path / "b-ckpt" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, process.stderr.read()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 1 and 0 < saved["batch"] < 300  # stopped inside the first epoch
    assert not (tmp_path / "b" / "model.safetensors").exists()

    assert worker(spec).wait(timeout=600) == 0  # the same command resumes
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(h.train_loss, h.val_loss) for h in read_result(tmp_path / x).history] for x in "ab"]
    assert losses[0] == losses[1]


def test_two_process_ddp_matches_one_process(tmp_path: Path, tiny_base_model: Path):
    base = base_without_dropout(tiny_base_model, tmp_path / "base")
    train_csv, val_csv = write_data(tmp_path / "data", 256)
    config = TrainConfig(
        base_model=str(base),
        strategy="full",
        epochs=1,
        patience=1,
        batch_size=16,
        learning_rate=1e-3,
        head_learning_rate=1e-3,
        bf16=False,
    )
    labels = ["pos", "neg"]
    single = write_spec(tmp_path / "one.json", config, labels, train_csv, val_csv, tmp_path / "one")
    assert worker(single).wait(timeout=600) == 0
    double = write_spec(tmp_path / "two.json", config, labels, train_csv, val_csv, tmp_path / "two")
    launch(double, nproc_per_node=2)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    moved = max(
        (one[k] - weights_init).abs().max().item()
        for k, weights_init in [("classifier.weight", torch.zeros_like(one["classifier.weight"]))]
    )
    assert moved > 0
    from pipeline.finetune import load_classifier

    initial, _ = load_classifier(str(base), labels, config.seed)
    assert (one["classifier.weight"] - initial.classifier.weight).abs().max() > 1e-3  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
    r1, r2 = read_result(tmp_path / "one"), read_result(tmp_path / "two")
    assert r1.history[0].val_loss == pytest.approx(r2.history[0].val_loss, rel=1e-3)
