"""The image kind's CUDA paths on a GPU machine: bf16 autocast, the strategies, throughput.

``python bench/cuda_images.py DATA.npz`` with a Fashion-MNIST subset saved as ``x, y``
(training pool) and ``xt, yt`` (test) arrays. Trains ``head``, ``partial`` and ``full`` at
224 px with ``train.bf16: auto`` (bf16 on a GPU that supports it) and prints, per
strategy, the device, whether bf16 ran, wall seconds, images per second and test accuracy,
and the GPU's peak memory. Not part of the test suite (CI has no GPU).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import FASHION_MNIST_LABELS, ImageConfig, TrainConfig  # noqa: E402
from pipeline.image_models import square_pixels  # noqa: E402
from pipeline.image_training import ImageSplits, predict_proba, train_image_classifier  # noqa: E402


def main() -> None:
    raw = np.load(sys.argv[1])
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    x, y, xt, yt = raw["x"], raw["y"].astype(np.int64), raw["xt"], raw["yt"].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(len(x) * 0.85)
    pixels, test = square_pixels(list(x), size), square_pixels(list(xt), size)
    splits = ImageSplits(pixels[:cut], y[:cut], pixels[cut:], y[cut:])
    results = []
    for strategy in ("head", "partial", "full"):
        config = TrainConfig(
            base_model="packaged:mobilenet_v2",
            strategy=strategy,
            frozen_layers=10,
            learning_rate=1e-3,
            head_learning_rate=1e-2,
            weight_decay=1e-4,
            batch_size=64,
            epochs=2,
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model, spec, result = train_image_classifier(
            config, ImageConfig(size=size), FASHION_MNIST_LABELS, splits, Path(f"/tmp/{strategy}")
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        probs = predict_proba(model, test, spec, result.bf16)
        figures = {
            "strategy": strategy,
            "size": size,
            "device": result.device,
            "bf16": result.bf16,
            "wall_s": round(wall, 2),
            "train_images_per_s": round(len(splits.train_labels) * config.epochs / wall, 1),
            "test_accuracy": round(float((probs.argmax(1) == yt).mean()), 4),
            "best_epoch": result.best_epoch,
            "peak_gpu_mib": (
                round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else 0
            ),
        }
        print(json.dumps(figures), flush=True)
        results.append(figures)
    if torch.cuda.is_available():
        print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
