"""A causal LM trained by the worker: 2-process DDP and FSDP on CPU (gloo) against one
process, and an FSDP run stopped by SIGTERM resuming to the same weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ForgettingConfig, TrainConfig
from pipeline.worker import CAUSAL, launch, read_result, write_spec

pytestmark = pytest.mark.integration


def write_data(folder: Path, n: int) -> tuple[Path, Path]:
    words = ["Save", "Delete", "Close", "Open", "Cancel", "Help", "Print", "Search"]
    rows = []
    for i in range(n):
        turns = [
            {"role": "user", "content": f"Translate from English to German:\n{words[i % 8]} {i}"},
            {"role": "assistant", "content": f"Wort {i} " + "sehr " * (i % 5)},
        ]
        rows.append({"messages": json.dumps(turns, ensure_ascii=False)})
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(rows[:16]).to_csv(folder / "val.csv", index=False)
    return folder / "train.csv", folder / "val.csv"


def settings(**overrides) -> TrainConfig:
    values = dict(
        strategy="full",
        epochs=1,
        patience=1,
        batch_size=8,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_length=64,
        bf16=False,
        num_threads=1,
    )
    return TrainConfig(**values | overrides)


def spec(folder: Path, name: str, config: TrainConfig, base: Path, data, **kw) -> Path:
    train_csv, val_csv = data
    return write_spec(
        folder / f"{name}.json",
        config,
        [],
        train_csv,
        val_csv,
        folder / name,
        kw.get("checkpoints"),
        kw.get("forgetting"),
        kind=CAUSAL,
        base=str(base),
    )


def torchrun(spec_path: Path) -> list[str]:
    """The 2-process torchrun command of the worker, for a test that watches the process."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*run, "-m", "pipeline.worker", str(spec_path)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_training(one: Path, two: Path, base: Path) -> None:
    a, b, start = weights(one), weights(two), weights(base)
    assert a.keys() == b.keys() == start.keys()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=2e-5)
    r1, r2 = read_result(one), read_result(two)
    assert r1.history[0].val_loss == pytest.approx(r2.history[0].val_loss, rel=1e-4)
    assert r1.loss_curve == pytest.approx(r2.loss_curve, rel=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="ddp"),
        pytest.param(
            {"strategy": "lora", "lora_target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
            id="lora",
        ),
        pytest.param({"fsdp": True}, id="fsdp"),
        pytest.param({"fsdp": True, "strategy": "partial", "frozen_layers": 1}, id="fsdp-partial"),
    ],
)
def test_two_processes_train_the_same_weights_as_one(tmp_path, tiny_causal_lm, overrides):
    data = write_data(tmp_path / "data", 64)
    keep = ForgettingConfig(distill=1.0, distill_batch_size=4) if not overrides else None
    one = spec(
        tmp_path,
        "one",
        settings(**overrides | {"fsdp": False}),
        tiny_causal_lm,
        data,
        forgetting=keep,
    )
    launch(one, nproc_per_node=1)
    two = spec(tmp_path, "two", settings(**overrides), tiny_causal_lm, data, forgetting=keep)
    launch(two, nproc_per_node=2)
    assert_same_training(tmp_path / "one", tmp_path / "two", tiny_causal_lm)


def test_an_fsdp_run_stopped_by_sigterm_resumes_to_the_same_weights(tmp_path, tiny_causal_lm):
    data = write_data(tmp_path / "data", 256)
    config = settings(fsdp=True, epochs=2, patience=2, batch_size=4, checkpoint_every_steps=5)
    straight = spec(tmp_path, "a", config, tiny_causal_lm, data, checkpoints=tmp_path / "a-ckpt")
    launch(straight, nproc_per_node=2)

    stopped = spec(tmp_path, "b", config, tiny_causal_lm, data, checkpoints=tmp_path / "b-ckpt")
    command = torchrun(stopped)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "b-ckpt" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)  # past the first checkpoint's write
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    saved = torch.load(checkpoint, weights_only=True)
    # stopped part-way: 256 rows at batch 4 for 2 epochs is 128 steps, and no model written
    assert 0 < saved["step"] < 128, saved["step"]
    assert not (tmp_path / "b" / "model.safetensors").exists()
    # the full (gathered) weights were saved, not one rank's shard (and the tied head)
    shapes = {k: v.shape for k, v in saved["model"].items()}
    assert shapes.items() >= {k: v.shape for k, v in weights(tiny_causal_lm).items()}.items()
    launch(stopped, nproc_per_node=2)  # the same command resumes
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_result(tmp_path / "a").loss_curve == read_result(tmp_path / "b").loss_curve


def test_fsdp_restores_an_earlier_best_epoch_on_every_rank(tmp_path, tiny_causal_lm):
    """Validation answers the training never teaches: the loss rises after epoch 1, so the
    best weights (gathered on rank 0 only) come back through a collective every rank joins."""
    data = write_data(tmp_path / "data", 64)
    val = pd.read_csv(data[1])
    wrong = [{"role": "assistant", "content": "Nein nein Hilfe ja " * 3}]
    val["messages"] = [json.dumps(json.loads(m)[:1] + wrong) for m in val["messages"]]
    val.to_csv(data[1], index=False)
    config = settings(epochs=4, patience=4, learning_rate=1e-2)
    one = spec(tmp_path, "one", config, tiny_causal_lm, data)
    launch(one, nproc_per_node=1)
    two = spec(
        tmp_path,
        "two",
        settings(epochs=4, patience=4, learning_rate=1e-2, fsdp=True),
        tiny_causal_lm,
        data,
    )
    command = torchrun(two)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)  # no hang
    assert done.returncode == 0, done.stderr[-3000:]
    r1, r2 = read_result(tmp_path / "one"), read_result(tmp_path / "two")
    assert r1.best_epoch == r2.best_epoch == 1 and len(r2.history) == 4
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=2e-5)
