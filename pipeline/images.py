"""A user's images as a table: an image folder or a CSV manifest, and what each file is.

- :func:`read_image_source` reads ``root/<label>/*.png|jpg|...`` or a CSV manifest
  (``path,label`` plus any metadata columns: patient id, sex, age, site or scanner), the way
  clinical datasets arrive, into one row per image with its path relative to the source.
- :func:`describe_images` opens every file with Pillow and derives the columns the image
  checks read: whether it decodes (and why not), mode, channels, width, height, aspect
  ratio, the SHA-256 of its bytes (exact duplicates) and a perceptual hash (``imagehash``'s
  pHash, for near-duplicates).

Pure reading: nothing is copied or changed here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DERIVED = ("decodes", "error", "mode", "channels", "width", "height", "aspect", "sha256")


def read_image_source(
    source: Path, path_column: str = "path", label_column: str = "label"
) -> tuple[pd.DataFrame, Path]:
    """The images of ``source`` (a folder of label folders, or a CSV manifest) as a table
    with ``path`` (relative to the returned root), ``label`` and the manifest's other
    columns, in path order.

    Raises:
        DataError: no images, a manifest without its path or label column, a path that
            does not exist (named with its row).
    """
    if not source.exists():
        raise DataError(f"{source} does not exist: give an image folder or a CSV manifest")
    if source.is_dir():
        rows = [
            {"path": str(f.relative_to(source)), "label": f.parent.name}
            for f in sorted(source.glob("*/*"))
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not rows:
            raise DataError(
                f"{source}: no images in label folders ({source}/<label>/*.png|jpg|...); "
                "give a folder per label, or a CSV manifest with path and label columns"
            )
        return pd.DataFrame(rows), source
    if source.suffix.lower() != ".csv":
        raise DataError(f"{source}: give an image folder or a CSV manifest (path,label,...)")
    manifest = pd.read_csv(source, dtype=str, keep_default_na=False)
    missing = [c for c in (path_column, label_column) if c not in manifest.columns]
    if missing:
        raise DataError(
            f"{source}: column(s) {missing} missing; found: {', '.join(manifest.columns)}. "
            "Set the path and label columns of the manifest."
        )
    if manifest.empty:
        raise DataError(f"{source}: the manifest lists no images")
    root = source.parent
    table = manifest.rename(columns={path_column: "path", label_column: "label"})
    absent = [(i, p) for i, p in enumerate(table["path"]) if not (root / p).is_file()]
    if absent:
        row, path = absent[0]
        raise DataError(
            f"{source} row {row + 2}: image {path!r} does not exist under {root} "
            f"({len(absent)} missing in all)"
        )
    return table.sort_values("path", kind="stable").reset_index(drop=True), root


def describe_images(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """``table`` plus the derived columns (:data:`DERIVED` and ``phash``) of each image.

    A file that does not decode (truncated, not an image) keeps ``decodes`` False and the
    reason in ``error``; its size columns are 0 and its hashes of what could be read.
    """
    import imagehash
    from PIL import Image

    derived = []
    for relative in table["path"]:
        path = root / relative
        raw = path.read_bytes()
        row: dict[str, object] = {
            "decodes": False,
            "error": "",
            "mode": "",
            "channels": 0,
            "width": 0,
            "height": 0,
            "aspect": 0.0,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "phash": "",
        }
        try:
            with Image.open(path) as image:
                image.load()  # decode every pixel: a truncated file fails here
                width, height = image.size
                row |= {
                    "decodes": True,
                    "mode": image.mode,
                    "channels": len(image.getbands()),
                    "width": width,
                    "height": height,
                    "aspect": max(width, height) / max(1, min(width, height)),
                    # of the pixels the model reads: imagehash's own conversion to grey
                    # clips 16-bit values, so every bright 16-bit scan would hash alike
                    "phash": str(imagehash.phash(Image.fromarray(_to_rgb(image)))),
                }
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            row["error"] = f"{type(err).__name__}: {err}"
        derived.append(row)
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(derived)], axis=1)


def undecodable(described: pd.DataFrame, source: Path) -> str | None:
    """The message naming the files that do not decode, or None when all do."""
    bad = described.loc[~described["decodes"]]
    if bad.empty:
        return None
    first = bad.iloc[0]
    return (
        f"{source}: {len(bad)} file(s) do not decode as images, e.g. {first['path']!r} "
        f"({first['error']}); remove or replace them"
    )


def read_rgb(path: Path) -> np.ndarray:
    """The image at ``path`` as (H, W, 3) uint8 RGB, whatever its mode: 16-bit and float
    greys are scaled to 8 bits by their range (not clipped), CMYK and palette images
    converted, an alpha channel composited onto white.

    Raises:
        DataError: the file does not decode as an image (named).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path}: does not decode as an image ({type(err).__name__}: {err})"
        ) from err


def _to_rgb(image: Any) -> np.ndarray:
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        grey = scaled.round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def read_images(root: Path, paths: Sequence[str]) -> list[np.ndarray]:
    """:func:`read_rgb` of each ``root / path``, in order."""
    return [read_rgb(root / p) for p in paths]


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"  # Debian; `retune examples` installs it


def read_idx_images(path: Path) -> np.ndarray:
    """An IDX3 file (gzip): (N, 28, 28) uint8."""
    import gzip

    raw = gzip.decompress(path.read_bytes())
    n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: Path) -> np.ndarray:
    """An IDX1 file (gzip): (N,) uint8."""
    import gzip

    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=8)


def write_fashion_mnist(
    folder: Path, labels: Sequence[str], per_class: int, source: Path = FASHION_MNIST_DIR
) -> Path:
    """The first ``per_class`` training images of each Fashion-MNIST class as
    ``folder/<label>/<index>.png`` (index: the image's row in the training file), written
    once: the same PNG bytes on every machine.

    Raises:
        DataError: Fashion-MNIST is not installed (says how to install it).
    """
    from PIL import Image

    images_file = source / "train-images-idx3-ubyte.gz"
    if not images_file.is_file():
        raise DataError(
            f"Fashion-MNIST is not installed ({images_file} missing): run `retune examples` "
            f"or `sudo apt-get install {FASHION_MNIST_PACKAGE}`"
        )
    if (folder / ".complete").is_file():
        return folder
    images = read_idx_images(images_file)
    ids = read_idx_labels(source / "train-labels-idx1-ubyte.gz")
    staged = folder.with_name(f".{folder.name}.partial")
    for k, label in enumerate(labels):
        (staged / label).mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(ids == k)[:per_class]:
            Image.fromarray(images[index]).save(staged / label / f"{index:05d}.png", optimize=False)
    (staged / ".complete").write_text("")
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    staged.rename(folder)
    return folder
