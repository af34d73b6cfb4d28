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


def full_config(base: Path, **overrides) -> TrainConfig:
    """Full fine-tuning of ``base``, one epoch unless overridden."""
    values = dict(
        base_model=str(base),
        strategy="full",
        epochs=1,
        patience=1,
        batch_size=16,
        learning_rate=1e-3,
        head_learning_rate=1e-3,
        bf16=False,
    )
    return TrainConfig(**values | overrides)


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
    config = full_config(
        tiny_base_model,
        epochs=2,
        patience=2,
        batch_size=8,
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
    config = full_config(base)
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
    # the logged loss is the whole batch's, summed over the ranks' shares
    assert r1.loss_curve == pytest.approx(r2.loss_curve, rel=1e-3)


def test_two_process_ddp_with_distillation_and_l2sp_matches_one_process(
    tmp_path: Path, tiny_base_model: Path
):
    """The default mitigations run under DDP: each rank distils its share of the batch,
    its teacher read from the cache the spec names (here filled by the ranks themselves)."""
    from pipeline.config import ForgettingConfig
    from pipeline.lineage import weights_sha256
    from pipeline.mitigation import TeacherCache

    base = base_without_dropout(tiny_base_model, tmp_path / "base")
    train_csv, val_csv = write_data(tmp_path / "data", 128)
    config = full_config(base)
    labels = ["pos", "neg"]
    keep = ForgettingConfig(distill=5.0, l2sp=10.0, distill_batch_size=8)
    specs = {
        "plain": (None, 1),
        "one": (keep, 1),
        "two": (keep, 2),
    }
    for name, (forgetting, procs) in specs.items():
        spec = write_spec(
            tmp_path / f"{name}.json",
            config,
            labels,
            train_csv,
            val_csv,
            tmp_path / name,
            forgetting=forgetting,
            teacher_cache=(
                TeacherCache(tmp_path / "cache", weights_sha256(str(base))) if procs == 2 else None
            ),
        )
        if procs == 1:
            assert worker(spec).wait(timeout=600) == 0
        else:
            launch(spec, nproc_per_node=2)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    plain, one, two = (weights(tmp_path / n) for n in specs)
    encoder = [k for k in one if k.startswith("bert.encoder.")]
    # the mitigations changed the encoder's training...
    assert max((one[k] - plain[k]).abs().max().item() for k in encoder) > 1e-3
    # ...in the same way on 2 processes as on 1
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_a_shared_folder_match_one_process(
    tmp_path: Path, tiny_base_model: Path, monkeypatch
):
    """Node 0 announces the job in the shared folder and hosts the rendezvous; a second
    "node" (`retune join`, its own torchrun) trains with it; the model matches one process."""
    from pipeline.worker import read_announcement, train_on_nodes

    base = base_without_dropout(tiny_base_model, tmp_path / "base")
    shared = tmp_path / "shared"
    train_csv, val_csv = write_data(shared / "job-1", 128)
    config = full_config(base, nnodes=2)
    labels = ["pos", "neg"]
    single = write_spec(tmp_path / "one.json", config, labels, train_csv, val_csv, tmp_path / "one")
    assert worker(single).wait(timeout=600) == 0

    no_job = subprocess.run(
        [
            str(Path(sys.executable).parent / "retune"),
            "join",
            "--shared",
            str(shared),
            "--once",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_job.returncode == 1  # nothing announced: it gives up after the timeout

    joiner = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "retune"),
            "join",
            "--shared",
            str(shared),
            "--once",
            "--timeout",
            "300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        monkeypatch.setenv("RETUNE_RDZV_ENDPOINT", f"127.0.0.1:{free_port()}")
        spec = write_spec(
            shared / "job-1" / "spec.json",
            config,
            labels,
            train_csv,
            val_csv,
            shared / "job-1" / "model",
        )
        train_on_nodes(shared, "job-1", spec, nproc_per_node=1, nnodes=2, timeout=120)
        assert joiner.wait(timeout=300) == 0, joiner.stderr.read()
    finally:
        joiner.kill()
    assert "joining job job-1 at 127.0.0.1:" in joiner.stderr.read()
    assert read_announcement(shared)["state"] == "finished"  # no late node joins it
    one, two = weights(tmp_path / "one"), weights(shared / "job-1" / "model")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
