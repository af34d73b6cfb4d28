"""The served image classifier through a real MLflow SQLite store: log, load, predict."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mlflow
from flows.cli import app
from mlflow import MlflowClient
from pipeline import modelstore, tracking
from pipeline import tags as tag
from pipeline.image_models import build_classifier, load_classifier, save_classifier, square_pixels
from pipeline.image_serving import (
    ImageClassifierPredictor,
    example_frame,
    log_image_classifier,
    read_image_inputs,
)
from pipeline.image_training import predict_proba
from pipeline.images import read_rgb
from pipeline.serving import ServingInputError

NAME = "retune-image-serving-test"
LABELS = ["cat", "dog", "fish"]
PROB_COLUMNS = [f"prob_{label}" for label in LABELS]


def _write_images(folder: Path) -> list[Path]:
    """Six small images in modes a user's folder holds: RGB of two shapes, grey, RGBA,
    CMYK JPEG and 16-bit grey PNG."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)

    def rgb(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    images = {
        "wide.png": Image.fromarray(rgb(40, 60)),
        "tall.png": Image.fromarray(rgb(70, 36)),
        "grey.png": Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8), "L"),
        "alpha.png": Image.fromarray(rng.integers(0, 256, (50, 40, 4), dtype=np.uint8), "RGBA"),
        "cmyk.jpg": Image.fromarray(rgb(44, 52)).convert("CMYK"),
        "deep.png": Image.fromarray(rng.integers(0, 60_000, (38, 46), dtype=np.uint16)),
    }
    paths = []
    for name, image in images.items():
        image.save(folder / name)
        paths.append(folder / name)
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert Image.open(folder / "deep.png").mode.startswith("I;16")
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def classifier_dir(images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier on a tiny random ViT (32 px, hidden size 32), saved as the flow saves it.

    A random backbone pools all images to nearly the same vector, so a random head gives
    one label everywhere. This head scores the pooled vector along (pooled[i] - mean) of
    images 0, 2 and 4: each is most likely its own label.
    """
    from transformers import ViTConfig, ViTForImageClassification

    from pipeline.image_models import centre_crop, normalise

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1000,
    )
    base = tmp_path_factory.mktemp("tiny-vit")
    ViTForImageClassification(config).save_pretrained(base)
    model, imagenet, spec = build_classifier(str(base), LABELS, size=32)
    assert imagenet is not None and imagenet.out_features == 1000
    model.eval()
    with torch.no_grad():
        pixels = square_pixels([read_rgb(p) for p in images], spec.size)
        pooled = model.embed(normalise(centre_crop(pixels, spec.size), spec.mean, spec.std))
        centre = pooled.mean(dim=0)  # pooled: (6, 32)
        directions = pooled[[0, 2, 4]] - centre  # (3, 32)
        scale = 4.0 / (directions @ directions.T).diagonal().max()  # logit gaps up to ~4
        model.head.weight.copy_(directions * scale)
        model.head.bias.copy_(-(directions @ centre) * scale)
    return save_classifier(model, spec, tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="module")
def reference(classifier_dir: Path, images: list[Path]) -> np.ndarray:
    """predict_proba on the saved model: what evaluation reports, (6, 3)."""
    model, spec = load_classifier(classifier_dir)
    pixels = square_pixels([read_rgb(p) for p in images], spec.size)
    return predict_proba(model, pixels, spec, bf16=False, batch_size=4)


@pytest.fixture(scope="module")
def store(
    classifier_dir: Path, images: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The classifier logged, registered as version 1 (an image classifier's identity
    tags) and aliased champion."""
    root = tmp_path_factory.mktemp("mlflow-store")
    tracking.configure(root)
    run_id = tracking.start_run(root, "image-serving", "log", {})
    model_uri = log_image_classifier(run_id, classifier_dir, example_frame(images[:2]))
    tracking.end_run(run_id)
    client = MlflowClient()
    client.create_registered_model(NAME)
    identity = {
        tag.IDENTITY_TASK: "image-classification",
        tag.IDENTITY_LABELS: json.dumps(LABELS),
        tag.IDENTITY_INPUT: json.dumps({"image": "string"}),
    }
    version = client.create_model_version(NAME, model_uri, run_id=run_id, tags=identity)
    client.set_registered_model_alias(NAME, "champion", version.version)
    return {"root": str(root), "model_uri": model_uri}


@pytest.fixture(scope="module")
def served(store: dict[str, str]) -> modelstore.LoadedModel:
    tracking.configure(Path(store["root"]))
    return modelstore.load_version(NAME, "1")


def _base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_served_model_predicts_paths_and_base64_like_predict_proba(
    served: modelstore.LoadedModel, images: list[Path], reference: np.ndarray
):
    by_path = served.predict(pd.DataFrame({"image": [str(p) for p in images]}))

    assert list(by_path.columns) == ["label", *PROB_COLUMNS]
    probs = by_path[PROB_COLUMNS].to_numpy()
    assert np.allclose(probs, reference, atol=1e-6)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert by_path["label"].tolist() == [LABELS[i] for i in reference.argmax(axis=1)]
    assert len(set(by_path["label"])) > 1  # the head tells the images apart

    # The same bytes in base64, plain or as a data URI, give the same rows; batch size too.
    encoded = [_base64(p) for p in images]
    encoded[1] = f"data:image/png;base64,{encoded[1]}"
    by_bytes = served.predict(pd.DataFrame({"image": encoded}), params={"batch_size": 2})
    assert np.allclose(by_bytes[PROB_COLUMNS].to_numpy(), reference, atol=1e-6)
    assert by_bytes["label"].tolist() == by_path["label"].tolist()


def test_the_predictor_is_the_plain_classifier_and_names_bad_rows(
    served: modelstore.LoadedModel, images: list[Path], reference: np.ndarray, tmp_path: Path
):
    predictor = served.predictor
    assert isinstance(predictor, ImageClassifierPredictor)
    assert predictor.spec.labels == LABELS and predictor.spec.architecture == "transformers"
    assert type(predictor.model).__name__ == "ImageClassifier"
    series = pd.Series([str(p) for p in images[4:]], index=[7, 9])  # CMYK JPEG, 16-bit PNG
    out = predictor.predict(series)
    assert out.index.tolist() == [7, 9]
    assert np.allclose(out[PROB_COLUMNS].to_numpy(), reference[4:], atol=1e-6)
    assert predictor.predict([]).columns.tolist() == ["label", *PROB_COLUMNS]

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a png")
    good = str(images[0])
    cases = [
        (["missing/cat.png"], r"row 0: 'missing/cat.png' is neither an existing image file nor "),
        ([good, "abcd"], r"row 1: 'abcd' is not an existing file, and as base64 its 3 bytes do "),
        ([good, good, str(not_an_image)], r"row 2: .*notes.png: does not decode as an image"),
        ([good, None], r"row 1: no 'image' \(a missing value\)"),
        ([good, good, 3], r"row 2: 'image' must be a file path or base64 image bytes .*int"),
        (["data:image/png;base64,aGVsbG8="], r"row 0: the data URI's 5 bytes do not decode"),
    ]
    for values, message in cases:
        with pytest.raises(ServingInputError, match=message):
            predictor.predict(pd.DataFrame({"image": values}))
    # Through the pyfunc too, the error names the row.
    with pytest.raises(ServingInputError, match=r"row 1: 'abcd'"):
        served.predict(pd.DataFrame({"image": [good, "abcd"]}))
    with pytest.raises(ServingInputError, match=r"no 'image' column; found: path"):
        predictor.predict(pd.DataFrame({"path": [good]}))


def test_logged_model_holds_its_signature_pins_and_a_small_base64_example(
    store: dict[str, str], served: modelstore.LoadedModel, images: list[Path], tmp_path: Path
):
    tracking.configure(Path(store["root"]))
    local = Path(mlflow.artifacts.download_artifacts(store["model_uri"], dst_path=str(tmp_path)))
    requirements = (local / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in requirements] == [
        "torch",
        "pillow",
        "safetensors",
        "transformers",
        "mlflow",
        "pandas",
    ]
    entry = (local / "retune_model.py").read_text()
    assert "from pipeline.image_serving import ImageClassifierPredictor" in entry

    info = mlflow.models.get_model_info(store["model_uri"])
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["label", *PROB_COLUMNS]
    assert served.output_columns == ["label", *PROB_COLUMNS]
    example = served.input_example
    assert list(example.columns) == ["image"] and len(example) == 2
    stored = np.asarray(Image.open(io.BytesIO(base64.b64decode(example["image"][0]))))
    assert np.array_equal(stored, np.asarray(Image.open(images[0])))  # small: kept, lossless
    assert served.predict(example)["label"].isin(LABELS).all()


def test_example_frame_sends_large_images_as_small_rgb_pngs(tmp_path: Path):
    big = tmp_path / "scan.png"
    Image.fromarray(np.full((300, 600), 40_000, dtype=np.uint16)).save(big)  # 16-bit grey

    frame = example_frame([big])
    image = Image.open(io.BytesIO(base64.b64decode(frame["image"][0])))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 32))


def test_log_refuses_a_folder_without_a_saved_classifier(tmp_path: Path):
    with pytest.raises(ServingInputError, match=r"holds no image_model.json; save it with"):
        log_image_classifier("run", tmp_path, pd.DataFrame({"image": ["x"]}))


def test_read_image_inputs_takes_a_folder_recursively_or_a_manifest(tmp_path: Path):
    root = tmp_path / "photos"
    _write_images(root / "cat")
    (root / "loose.png").write_bytes((root / "cat" / "wide.png").read_bytes())
    (root / "cat" / "notes.txt").write_text("not an image")

    table, found_root = read_image_inputs(root)
    assert found_root == root
    assert table["path"].tolist() == [
        "cat/alpha.png",
        "cat/cmyk.jpg",
        "cat/deep.png",
        "cat/grey.png",
        "cat/tall.png",
        "cat/wide.png",
        "loose.png",
    ]

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,site\nphotos/cat/wide.png,a\nphotos/loose.png,b\n")
    table, found_root = read_image_inputs(manifest, path_column="file")
    assert found_root == tmp_path
    assert table.to_dict("list") == {
        "file": ["photos/cat/wide.png", "photos/loose.png"],
        "site": ["a", "b"],
    }

    manifest.write_text("file\nphotos/loose.png\nphotos/gone.png\n")
    with pytest.raises(ServingInputError, match=r"manifest.csv row 3: image 'photos/gone.png'"):
        read_image_inputs(manifest, path_column="file")
    with pytest.raises(ServingInputError, match=r"column 'path' missing .*found: file"):
        read_image_inputs(manifest)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServingInputError, match=r"empty: no image files"):
        read_image_inputs(tmp_path / "empty")
    with pytest.raises(ServingInputError, match=r"does not exist"):
        read_image_inputs(tmp_path / "nowhere")


def test_cli_predict_labels_an_image_folder_and_a_manifest(
    store: dict[str, str], images: list[Path], reference: np.ndarray, tmp_path: Path
):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    args = ["predict", f"{NAME}@champion", "--project-dir", store["root"], "--batch-size", "4"]

    result = CliRunner().invoke(app, [*args[:2], str(folder), *args[2:]])
    assert result.exit_code == 0, result.output
    out = tmp_path / "photos.predictions.csv"
    assert f"labelled 6 rows of {folder} -> {out}" in result.output
    written = pd.read_csv(out).set_index("path")
    order = [images.index(next(p for p in images if p.name == n)) for n in written.index]
    assert np.allclose(written[PROB_COLUMNS].to_numpy(), reference[order], atol=1e-6)

    (folder / "broken.png").write_text("not a png")
    broken = CliRunner().invoke(app, [*args[:2], str(folder), *args[2:]])
    assert broken.exit_code == 1
    assert f"error: {folder}: image 'broken.png': " in broken.output
    assert "broken.png: does not decode as an image" in broken.output
    (folder / "broken.png").unlink()

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\nphotos/wide.png,cat\n")
    refused = CliRunner().invoke(app, [*args[:2], str(manifest), *args[2:]])
    assert refused.exit_code == 1
    assert "already has column(s) label" in refused.output
    manifest.write_text("path,site\nphotos/wide.png,a\nphotos/deep.png,b\n")
    result = CliRunner().invoke(
        app, [*args[:2], str(manifest), *args[2:], "--out", str(tmp_path / "o.jsonl")]
    )
    assert result.exit_code == 0, result.output
    rows = pd.read_json(tmp_path / "o.jsonl", lines=True)
    assert rows.columns.tolist() == ["path", "site", "label", *PROB_COLUMNS]
    assert np.allclose(rows[PROB_COLUMNS].to_numpy(), reference[[0, 5]], atol=1e-6)
