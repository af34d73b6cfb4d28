"""The image suite (validate_images), run for real on tiny PNGs described by describe_images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import validation
from pipeline.config import ValidationConfig
from pipeline.data import SPLITS
from pipeline.images import describe_images
from pipeline.validation import IMAGE_CHECKS, ValidationReport, validate_images

LABELS = ["boot", "coat"]
PER_LABEL = 5  # images per label and split: validation.min_rows_per_label's default


def smooth(seed: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A smooth random RGB image (H, W, 3) uint8 in 0..239 (+2 does not clip): an 8x8 grid
    of random colours, upscaled. Over 200 seeds, two images' pHashes lie 16+ bits apart and
    one inverted pixel moves a hash by at most 2 (on 32x32 images, by up to 22)."""
    grid = np.random.default_rng(seed).integers(0, 240, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize(size, Image.Resampling.BILINEAR))


def write(root: Path, relative: str, pixels: np.ndarray, mode: str | None = None) -> str:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)
    return relative


def clean_tables(root: Path) -> dict[str, pd.DataFrame]:
    """Five distinct images per label and split (30 in all), not yet described."""
    tables, seed = {}, 0
    for split in SPLITS:
        rows = []
        for label in LABELS:
            for i in range(PER_LABEL):
                seed += 1
                path = write(root, f"{split}/{label}/{i}.png", smooth(seed))
                rows.append({"path": path, "label": label, "group": f"item {seed}"})
        tables[split] = pd.DataFrame(rows)
    return tables


def add(table: pd.DataFrame, path: str, label: str = "boot") -> pd.DataFrame:
    row = pd.DataFrame([{"path": path, "label": label, "group": path}])
    return pd.concat([table, row], ignore_index=True)


def described(tables: dict[str, pd.DataFrame], root: Path) -> dict[str, pd.DataFrame]:
    return {split: describe_images(table, root) for split, table in tables.items()}


def only(report: ValidationReport, split: str, check: str):
    found = [o for o in report.outcomes if o.split == split and o.check == check]
    assert len(found) == 1, (split, check, found)
    return found[0]


def test_clean_images_pass_every_check_and_build_data_docs(tmp_path):
    frames = described(clean_tables(tmp_path / "images"), tmp_path / "images")
    report = validate_images(frames, ValidationConfig(), LABELS, docs_dir=tmp_path / "docs")
    assert report.success and report.failures == [], report.summary()
    status = {check: s["status"] for check, s in report.check_status().items()}
    for check in (*IMAGE_CHECKS, "schema", "label_set", "labels_in_every_split"):
        assert status[check] == "passed", check
    assert status["min_rows_per_label"] == status["class_imbalance"] == "passed"
    assert "null_text" not in status  # text checks are not part of the image suite
    # Per split: schema 4, label_set 2, labels_in_every_split, decodes, mode, size, aspect;
    # validation and test add the two leakage checks; all: the two duplicate checks.
    per_split = {s: sum(o.split == s for o in report.outcomes) for s in [*SPLITS, "all"]}
    assert per_split == {"train": 11, "validation": 13, "test": 13, "all": 4}
    assert only(report, "all", "image_near_duplicates").element_count == 30
    assert report.docs_index == tmp_path / "docs" / "index.html"
    assert report.docs_index.is_file()


def test_broken_odd_copied_and_edited_images_are_named_by_path(tmp_path):
    root = tmp_path / "images"
    tables = clean_tables(root)
    train, first = tables["train"], root / tables["train"].loc[0, "path"]
    raw = first.read_bytes()
    (root / "train/boot/cut.png").write_bytes(raw[: len(raw) // 2])  # truncated
    (root / "train/boot/notes.png").write_text("not a picture")
    write(root, "train/boot/dot.png", np.full((1, 1, 3), 90, np.uint8))  # 1x1
    write(root, "train/boot/wide.png", smooth(101, (40, 8)))  # 40 wide, 8 high: aspect 5
    write(root, "train/boot/print.jpg", smooth(102), mode="CMYK")
    # Mode I;16 with values under 256: describe_images' pHash clips at 255 (read_rgb
    # rescales), so a bright 16-bit image would hash as flat as the 1x1 one.
    Image.fromarray(smooth(103)[..., 0].astype(np.uint16)).save(root / "train/boot/depth.png")
    for name in ("cut.png", "notes.png", "dot.png", "wide.png", "print.jpg", "depth.png"):
        train = add(train, f"train/boot/{name}")
    tables["train"] = train
    # test: an exact copy of train's first file and a copy with one pixel changed
    (root / "test/boot/copy.png").write_bytes(raw)
    pixels = np.asarray(Image.open(first)).copy()
    pixels[3, 3] = 255 - pixels[3, 3]  # one pixel inverted
    write(root, "test/boot/pixel.png", pixels)
    tables["test"] = add(add(tables["test"], "test/boot/copy.png"), "test/boot/pixel.png")
    # validation: no coat at all, and train's second image 2 levels brighter
    brighter = np.asarray(Image.open(root / train.loc[1, "path"])) + 2
    write(root, "validation/boot/brighter.png", brighter)
    boots = tables["validation"].loc[tables["validation"]["label"] == "boot"]
    tables["validation"] = add(boots, "validation/boot/brighter.png")
    frames = described(tables, root)
    assert frames["train"].set_index("path").loc["train/boot/depth.png", "mode"] == "I;16"
    assert frames["train"].set_index("path").loc["train/boot/print.jpg", "mode"] == "CMYK"

    report = validate_images(frames, ValidationConfig(), LABELS)

    failed = {(o.split, o.check) for o in report.failures}
    assert failed == {
        ("train", "image_decodes"),
        ("train", "image_size"),
        ("train", "image_mode"),
        ("train", "image_aspect"),
        ("test", "image_leakage"),
        ("test", "image_leakage_near"),
        ("validation", "image_leakage_near"),
        ("validation", "labels_in_every_split"),
        ("all", "min_rows_per_label"),  # validation/coat: 0 rows
        ("all", "class_imbalance"),  # ... so its ratio is infinite
        ("all", "image_duplicates"),  # the exact copy: 1 of 34 rows, over 2%
        ("all", "image_near_duplicates"),  # the two edited copies: 2 of 34 rows
    }
    assert not report.success

    decodes = only(report, "train", "image_decodes")
    assert (decodes.success, decodes.unexpected_count, decodes.severity) == (False, 2, "error")
    assert "'train/boot/cut.png: OSError: image file is truncated'" in decodes.detail
    assert "'train/boot/notes.png: UnidentifiedImageError: cannot identify image file'" in (
        decodes.detail
    )
    assert str(tmp_path) not in decodes.detail  # Pillow's absolute path is dropped
    assert decodes.fix.startswith("remove or replace these files")

    size = only(report, "train", "image_size")
    assert size.unexpected_count == 3  # the 1x1 and the two files that do not decode (0x0)
    assert "'train/boot/dot.png: 1x1'" in size.detail
    assert size.limit == "validation.min_image_side=8"
    assert size.fix.startswith("--set validation.min_image_side=1")

    mode = only(report, "train", "image_mode")
    assert (mode.unexpected_count, mode.severity) == (2, "warn")
    assert "'train/boot/print.jpg: CMYK'" in mode.detail
    assert "'train/boot/depth.png: I;16'" in mode.detail
    assert mode.fix.startswith("none needed: these are converted to RGB when loaded")

    aspect = only(report, "train", "image_aspect")
    assert "'train/boot/wide.png: 40x8'" in aspect.detail
    assert aspect.fix.startswith("--set validation.max_aspect_ratio=5.0")

    original = train.loc[0, "path"]
    leak = only(report, "test", "image_leakage")
    assert (leak.unexpected_count, leak.severity) == (1, "error")
    assert leak.detail == f"e.g. ['test/boot/copy.png = {original}']"
    near = only(report, "test", "image_leakage_near")
    assert (near.unexpected_count, near.severity) == (1, "warn")  # not the exact copy
    assert near.detail.startswith(f"e.g. ['test/boot/pixel.png ~ {original} (")
    assert only(report, "validation", "image_leakage").success
    brighter_near = only(report, "validation", "image_leakage_near")
    assert brighter_near.detail.startswith(
        f"e.g. ['validation/boot/brighter.png ~ {train.loc[1, 'path']} ("
    )
    assert only(report, "validation", "labels_in_every_split").severity == "error"

    duplicates = only(report, "all", "image_duplicates")
    assert (duplicates.unexpected_count, duplicates.element_count) == (1, 34)
    assert duplicates.detail == f"e.g. ['test/boot/copy.png = {original}']"
    assert duplicates.fix.startswith("--set validation.max_duplicate_rate=0.03")
    # The edited copies only: not the exact copy (image_duplicates), nor the files that do
    # not decode (no pHash) and the flat 1x1 image.
    near_all = only(report, "all", "image_near_duplicates")
    assert (near_all.unexpected_count, near_all.severity) == (2, "warn")
    assert "pixel.png ~ " in near_all.detail and "brighter.png ~ " in near_all.detail
    assert near_all.fix.startswith("--set validation.max_duplicate_rate=0.06")


def test_nearest_hashes_match_brute_force_across_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, 70, dtype=np.uint64) * np.uint64(2)  # the top bit too
    pool[40] = pool[7] ^ np.uint64(0b101)  # 2 bits from an earlier hash
    query = rng.integers(0, 2**63, 25, dtype=np.uint64)
    monkeypatch.setattr(validation, "HASH_PAIRS", 64)  # blocks of a few rows

    def bits(a: int, b: int) -> int:
        return bin(int(a) ^ int(b)).count("1")

    nearest, distance = validation._nearest_hashes(query, pool)
    for i, q in enumerate(query):
        every = [bits(q, p) for p in pool]
        assert distance[i] == min(every) and every[nearest[i]] == min(every)
    nearest, distance = validation._nearest_hashes(pool, pool, earlier=True)
    assert (nearest[0], distance[0]) == (-1, validation.NO_MATCH)  # nothing before row 0
    for i in range(1, len(pool)):
        earlier = [bits(pool[i], p) for p in pool[:i]]
        assert distance[i] == min(earlier) and earlier[nearest[i]] == min(earlier)
    assert (nearest[40], distance[40]) == (7, 2)


def test_undescribed_images_are_refused_with_how_to_fix():
    frames = {
        s: pd.DataFrame({"path": ["a.png"], "label": ["boot"], "group": ["a"]}) for s in SPLITS
    }
    with pytest.raises(ValueError, match=r"the train images lack column\(s\) \['decodes', "):
        validate_images(frames, ValidationConfig(), LABELS)
