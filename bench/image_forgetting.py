"""What the image kind's mitigations keep of the base's ImageNet behaviour.

``.venv/bin/python bench/image_forgetting.py`` trains the example's default (``partial``,
10 of 17 blocks frozen, 3 epochs at 1e-3, 64 px) on the Fashion-MNIST example's 3,000
images (a seeded 70/15/15 split), once plain and once with learning without forgetting
(``--distill``), sweeps WiSE-FT blends of the backbone, and prints per blend the test
accuracy and every retention score (the digits and faces probes, the base's ImageNet head's
top-1/top-5 agreement on the photographs). Figures, not timings: run it on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import FASHION_MNIST_LABELS, RetuneConfig  # noqa: E402
from pipeline.image_models import load_backbone, square_pixels  # noqa: E402
from pipeline.image_retention import (  # noqa: E402
    image_suite,
    photo_logits,
    score_backbone,
    suite_images,
)
from pipeline.image_training import ImageSplits, predict_proba, train_image_classifier  # noqa: E402
from pipeline.images import read_image_source, read_images, write_fashion_mnist  # noqa: E402
from pipeline.mitigation import interpolate_encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distill", type=float, nargs="*", default=[0.0, 1.0])
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/image-forgetting.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="retune-image-forgetting-"))
    folder = write_fashion_mnist(work / "fashion-mnist", FASHION_MNIST_LABELS, 300)
    table, root = read_image_source(folder)
    table = table.iloc[np.random.default_rng(0).permutation(len(table))].reset_index(drop=True)
    index = {label: i for i, label in enumerate(FASHION_MNIST_LABELS)}
    y = table["label"].map(index).to_numpy()
    pixels = square_pixels(read_images(root, table["path"].tolist()), 64)
    train, val, test = slice(0, 2100), slice(2100, 2550), slice(2550, None)
    splits = ImageSplits(pixels[train], y[train], pixels[val], y[val])
    config = RetuneConfig(task="image-classification", image={"size": 64})
    tasks, _ = image_suite(True)
    base, head, _ = load_backbone(config.train.base_model, 64)
    base_logits = photo_logits(base, head, suite_images()[1])
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    rows = []
    for distill in args.distill:
        model, spec, result = train_image_classifier(
            config.train, config.image, FASHION_MNIST_LABELS, splits, work / "m", distill=distill
        )
        tuned = {n: t.clone() for n, t in model.backbone.state_dict().items()}
        for alpha in args.alphas:
            interpolate_encoder(model, base_state, tuned, alpha, lambda m: m.backbone)
            probs = predict_proba(model, pixels[test], spec, result.bf16)
            scores, _ = score_backbone(model, head, base_logits, tasks)
            row = {
                "distill": distill,
                "alpha": alpha,
                "test_accuracy": round(float((probs.argmax(1) == y[test]).mean()), 4),
            } | {name: round(out.score, 3) for name, out in scores.items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
