"""Reading a user's images (folder or CSV manifest) and describing every file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import images
from pipeline.data import DataError


def digit_folder(root: Path, n: int = 12) -> Path:
    """scikit-learn's 8x8 digits as PNGs under root/<label>/, upscaled to 32x32."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(n):
        label = root / f"digit{digits.target[i]}"
        label.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32)).save(label / f"img{i:03d}.png")
    return root


def test_a_label_folder_reads_as_one_row_per_image(tmp_path):
    root = digit_folder(tmp_path / "digits")
    (root / "digit0" / "notes.txt").write_text("not an image")
    table, found = images.read_image_source(root)
    assert found == root and len(table) == 12
    assert table["path"].str.endswith(".png").all()
    assert (table["label"] == table["path"].str.split("/").str[0]).all()


def test_a_manifest_keeps_its_metadata_and_names_a_missing_file_by_row(tmp_path):
    root = digit_folder(tmp_path / "digits", 4)
    paths = sorted(str(p.relative_to(tmp_path)) for p in root.glob("*/*.png"))
    manifest = pd.DataFrame(
        {"file": paths, "finding": ["a", "b", "a", "b"], "patient_id": ["p1", "p1", "p2", "p3"]}
    )
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    table, found = images.read_image_source(tmp_path / "manifest.csv", "file", "finding")
    assert found == tmp_path
    assert list(table.columns) == ["path", "label", "patient_id"]
    assert table["patient_id"].tolist() == ["p1", "p1", "p2", "p3"]
    with pytest.raises(
        DataError, match=r"column\(s\) \['path', 'label'\] missing; found: file, finding"
    ):
        images.read_image_source(tmp_path / "manifest.csv")
    manifest.loc[2, "file"] = "digits/gone.png"
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(DataError, match=r"manifest.csv row 4: image 'digits/gone.png' does not"):
        images.read_image_source(tmp_path / "manifest.csv", "file", "finding")


def test_describe_names_truncated_and_non_image_files_and_hashes_duplicates(tmp_path):
    root = digit_folder(tmp_path / "digits", 3)
    first = sorted(root.glob("*/*.png"))[0]
    (root / "digit0" / "copy.png").write_bytes(first.read_bytes())  # an exact duplicate
    raw = first.read_bytes()
    (root / "digit0" / "cut.png").write_bytes(raw[: len(raw) // 2])  # truncated
    (root / "digit0" / "text.png").write_text("this is not a picture")
    Image.fromarray(np.zeros((10, 50, 3), np.uint8)).save(root / "digit0" / "wide.jpg")
    table, _ = images.read_image_source(root)
    described = images.describe_images(table, root).set_index("path")
    good = str(first.relative_to(root))
    assert described.loc[good, "decodes"] and described.loc[good, "mode"] == "L"
    assert (described.loc[good, "width"], described.loc[good, "height"]) == (32, 32)
    assert described.loc["digit0/wide.jpg", "channels"] == 3
    assert described.loc["digit0/wide.jpg", "aspect"] == 5.0
    assert described.loc["digit0/copy.png", "sha256"] == described.loc[good, "sha256"]
    assert described.loc["digit0/copy.png", "phash"] == described.loc[good, "phash"]
    for broken in ("digit0/cut.png", "digit0/text.png"):
        assert not described.loc[broken, "decodes"] and described.loc[broken, "error"]
    message = images.undecodable(described.reset_index(), root)
    assert message.startswith(f"{root}: 2 file(s) do not decode as images, e.g. 'digit0/cut.png'")
    assert images.undecodable(described.loc[[good]].reset_index(), root) is None
