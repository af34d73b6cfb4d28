"""Image classification under torchrun (gloo on CPU): the worker's image kind, DDP.

The ``head`` strategy trains no BatchNorm, so two ranks must reach the weights of one
process; ``partial`` trains BatchNorm layers, whose batch statistics are per rank (as in
any DDP without SyncBatchNorm), so it is checked to train and to save one model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from pipeline.config import ImageConfig, TrainConfig
from pipeline.worker import IMAGES, launch, read_result, write_spec

pytestmark = pytest.mark.integration
LABELS = ["0", "1", "2"]


def digits_dataset(folder: Path, per_label: int = 40) -> tuple[Path, Path]:
    """Digits 0-2 as PNGs under ``folder/images`` with train and validation tables."""
    digits = load_digits()
    rows = []
    for label in LABELS:
        for i in np.flatnonzero(digits.target == int(label))[:per_label]:
            path = f"images/{label}/{i}.png"
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / path)
            rows.append({"path": path, "label": label})
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)
    cut = int(len(frame) * 0.75)
    frame.iloc[:cut].to_csv(folder / "train.csv", index=False)
    frame.iloc[cut:].to_csv(folder / "validation.csv", index=False)
    return folder / "train.csv", folder / "validation.csv"


def spec(tmp_path: Path, name: str, config: TrainConfig, data: Path) -> Path:
    return write_spec(
        tmp_path / f"{name}.json",
        config,
        LABELS,
        data / "train.csv",
        data / "validation.csv",
        tmp_path / name,
        kind=IMAGES,
        base=str(data),
        image=ImageConfig(size=32, augment=False, dropout=0.0),  # dropout masks are per rank
    )


def test_two_rank_head_matches_one_process_and_partial_trains(tmp_path: Path):
    data = tmp_path / "data"
    digits_dataset(data)
    head = TrainConfig(
        base_model="packaged:mobilenet_v2",
        strategy="head",
        head_init="random",
        epochs=2,
        batch_size=16,
        head_learning_rate=1e-2,
        bf16=False,
        num_threads=1,
    )
    launch(spec(tmp_path, "one", head, data), nproc_per_node=1)
    launch(spec(tmp_path, "two", head, data), nproc_per_node=2)
    one, two = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    from pipeline.image_models import build_classifier

    initial, _, _ = build_classifier("packaged:mobilenet_v2", LABELS, 32, head.seed)
    assert (one["head.weight"] - initial.head.weight).abs().max() > 1e-3  # it trained
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)
    r1, r2 = read_result(tmp_path / "one"), read_result(tmp_path / "two")
    assert r1.loss_curve == pytest.approx(r2.loss_curve, rel=1e-3)  # the whole batch's loss

    partial = head.model_copy(update={"strategy": "partial", "frozen_layers": 14, "epochs": 1})
    launch(spec(tmp_path, "partial", partial, data), nproc_per_node=2)
    tuned = load_file(tmp_path / "partial" / "model.safetensors")
    block = "backbone.features.16.conv.2.weight"  # a trained block (past the 14 frozen)
    assert (tuned[block] - initial.state_dict()[block]).abs().max() > 0
    frozen = "backbone.features.3.conv.0.0.weight"
    assert torch.equal(tuned[frozen], initial.state_dict()[frozen])
    assert len(read_result(tmp_path / "partial").history) == 1
