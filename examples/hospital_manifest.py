"""A hospital-style image set to try the import on: images with a CSV manifest.

No medical image set ships in any package reachable offline, so this builds the *shape*
of one from Fashion-MNIST (Debian's dataset-fashion-mnist): every "patient" has three to
five images of one class, every image a site (two wards with different scanners) and the
manifest lists them as a clinical export would::

    path,label,patient_id,site,scanner
    images/p0007-1.png,ankle-boot,p0007,north,scanner-a

The patients, sites and scanners are synthetic; the images and labels are Fashion-MNIST's.

    python examples/hospital_manifest.py scans/         # writes scans/manifest.csv
    retune data import scans/manifest.csv --task image-classification --name ward-scans \\
        --group-col patient_id --identity-col site
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import FASHION_MNIST_LABELS  # noqa: E402
from pipeline.images import FASHION_MNIST_DIR, read_idx_images, read_idx_labels  # noqa: E402


def build(folder: Path, classes: list[str], patients: int, seed: int = 0) -> Path:
    """``folder/images/*.png`` and ``folder/manifest.csv`` for ``patients`` patients."""
    rng = np.random.default_rng(seed)
    images = read_idx_images(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    ids = read_idx_labels(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    pools = {c: list(np.flatnonzero(ids == FASHION_MNIST_LABELS.index(c))) for c in classes}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(patients):
        label = classes[p % len(classes)]
        site = "north" if rng.random() < 0.6 else "south"
        for k in range(int(rng.integers(3, 6))):
            path = f"images/p{p:04d}-{k}.png"
            Image.fromarray(images[pools[label].pop()]).save(folder / path)
            scanner = "scanner-a" if site == "north" else "scanner-b"
            rows.append(
                {
                    "path": path,
                    "label": label,
                    "patient_id": f"p{p:04d}",
                    "site": site,
                    "scanner": scanner,
                }
            )
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--classes", default="sneaker,ankle-boot,sandal")
    parser.add_argument("--patients", type=int, default=300)
    args = parser.parse_args()
    manifest = build(args.folder, args.classes.split(","), args.patients)
    print(f"wrote {manifest} ({len(pd.read_csv(manifest))} images)")


if __name__ == "__main__":
    main()
