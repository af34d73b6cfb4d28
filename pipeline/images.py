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
from pathlib import Path

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
                    "phash": str(imagehash.phash(image)),
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
