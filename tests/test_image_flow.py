"""The real flow for image classification on the packaged MobileNetV2 at 32 pixels.

Prefect, GX, DVC and MLflow are real; the images are scikit-learn's 8x8 digits written as
PNGs inside the project, 60 per label.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_retune
from PIL import Image

from mlflow import MlflowClient
from pipeline import modelstore, tracking
from pipeline import tags as tag
from pipeline.versioning import recorded_datasets

pytestmark = pytest.mark.integration

LABELS = ["zero", "one", "two"]
NAME = "digits_folder"  # the dataset data.source=digits_folder is imported as
MODEL = f"retune-{NAME}"


def digit(index: int) -> np.ndarray:
    """scikit-learn's digit ``index`` as 8x8 uint8 (its 0..16 values times 16)."""
    from sklearn.datasets import load_digits

    return (load_digits().images[index] * 16).clip(0, 255).astype(np.uint8)


def digits_folder(folder: Path, labels: list[str] = LABELS, per_class: int = 60) -> Path:
    """``folder/<label>/<index>.png``: the first ``per_class`` digits of each label, where
    label k is the digit k."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for k, label in enumerate(labels):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(digits.target == k)[:per_class]:
            Image.fromarray(digit(index)).save(folder / label / f"{index:04d}.png")
    return folder


def tiny_image_run(*extra: str, source: str = "digits_folder", labels=LABELS) -> list[str]:
    return [
        "task=image-classification",
        f"data.source={source}",
        f"data.labels=[{', '.join(labels)}]",
        "train.base_model=packaged:mobilenet_v2",
        "image.size=32",
        "train.epochs=3",
        "train.batch_size=16",
        "train.bf16=false",
        "train.num_threads=1",  # two cores, shared: no oversubscribed OpenMP spinning
        *extra,
    ]


def run(api_url: str, project: Path, *overrides: str):
    args = ["run", "--project-dir", str(project)]
    for item in overrides:
        args += ["--set", item]
    return run_retune(project, api_url, *args)


@pytest.mark.e2e
@pytest.mark.slow  # the real MobileNetV2 through every step: 45 s quiet, minutes under load
def test_an_image_folder_runs_the_whole_flow_and_registers_an_image_model(prefect_harness, project):
    folder = digits_folder(project / "digits_folder")
    # Two files in modes a user's folder holds, converted on reading (a warning, no crash):
    # a CMYK JPEG of digit 2 and a 16-bit PNG of digit 1 (other digits than the 60 above).
    big = np.kron(digit(2), np.ones((4, 4), np.uint8))  # 32x32: JPEG keeps its strokes
    Image.fromarray(np.stack([big] * 3, axis=-1)).convert("CMYK").save(folder / "two" / "cmyk.jpg")
    deep = digit(1).astype(np.uint16) * 257  # 0..65535, read back scaled by its range
    Image.fromarray(deep).save(folder / "one" / "deep.png")
    assert Image.open(folder / "two" / "cmyk.jpg").mode == "CMYK"
    assert Image.open(folder / "one" / "deep.png").mode.startswith("I;16")

    # promotion.beat_probe=false: the logistic probe on the frozen base's features already
    # scores 1.0 on these digits, which no candidate can beat.
    result = run(prefect_harness, project, *tiny_image_run("promotion.beat_probe=false"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Traceback" not in result.stderr
    for converted in (r"one/deep\.png: I;16", r"two/cmyk\.jpg: CMYK"):
        warned = rf"validation warning: \w+: image_mode .*{converted}"
        assert re.search(warned, output), output[-3000:]

    # data.dvc records the dataset; its images are copied under data/<name>/images,
    # byte for byte, and the split tables point at them.
    record = recorded_datasets(project / "data.dvc")[NAME]
    assert record.source == "digits_folder"
    assert record.labels == sorted(LABELS)  # data.dvc lists the labels found, sorted
    assert sum(record.rows.values()) == 182
    dataset = project / "data" / NAME
    copies = sorted(p.relative_to(dataset / "images") for p in (dataset / "images").rglob("*.*"))
    originals = sorted(p.relative_to(folder) for p in folder.rglob("*.*"))
    assert copies == originals and len(copies) == 182
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert all(sha(dataset / "images" / p) == sha(folder / p) for p in copies)
    splits = {s: pd.read_csv(dataset / f"{s}.csv") for s in ("train", "validation", "test")}
    assert sum(len(f) for f in splits.values()) == 182
    for frame in splits.values():
        assert frame["path"].str.startswith("images/").all()
        assert all((dataset / p).is_file() for p in frame["path"])
    assert set(splits["train"]["label"]) == set(LABELS)

    # A registered version with the image identity; its metrics were logged.
    tracking.configure(project)
    client = MlflowClient()
    assert {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()} == {
        "champion": "1"
    }
    version = client.get_model_version(MODEL, "1")
    assert version.tags[tag.IDENTITY_TASK] == "image-classification"
    assert json.loads(version.tags[tag.IDENTITY_LABELS]) == LABELS
    assert json.loads(version.tags[tag.IDENTITY_INPUT]) == {"image": "string"}
    metrics = client.get_run(version.run_id).data.metrics
    for key in ("test_accuracy", "test_macro_f1", "probe_test_macro_f1", "retention_digits"):
        assert key in metrics, key

    # The registered model reads base64 images: probabilities per label summing to 1, and
    # on the test split the accuracy the flow logged.
    loaded = modelstore.load_version(MODEL, "1", project / "tmp")
    test = splits["test"]
    encoded = [base64.b64encode((dataset / p).read_bytes()).decode() for p in test["path"]]
    out = loaded.predict(pd.DataFrame({"image": encoded}))
    probs = out[[f"prob_{label}" for label in LABELS]].to_numpy()
    assert list(out.columns) == ["label", *(f"prob_{label}" for label in LABELS)]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert set(out["label"]) <= set(LABELS)
    assert (out["label"] == np.array(LABELS)[probs.argmax(axis=1)]).all()
    accuracy = float((out["label"].to_numpy() == test["label"].to_numpy()).mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-9)


def _spoil(folder: Path) -> None:
    """A truncated PNG, a text file named .png and an image of 1x1 pixels."""
    raw = (folder / "zero" / "0000.png").read_bytes()
    (folder / "zero" / "cut.png").write_bytes(raw[: len(raw) // 2])
    (folder / "zero" / "notes.png").write_text("not a picture, a note\n")
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(folder / "zero" / "dot.png")


def assert_nothing_changed(project: Path, dvc_before: bytes) -> None:
    assert (project / "data.dvc").read_bytes() == dvc_before
    assert not (project / "data").exists()
    assert not (project / "mlflow" / "mlflow.db").exists()


def test_broken_images_and_a_missing_label_stop_the_flow_before_training(prefect_harness, project):
    """The checks that fail in validation, in one run: each file is named by its path."""
    # one label folder where data.labels has two, holding three files that are no images
    # (or too small to be one)
    _spoil(digits_folder(project / "digits_folder", labels=["zero"]))
    dvc_before = (project / "data.dvc").read_bytes()
    result = run(prefect_harness, project, *tiny_image_run(labels=["zero", "one"]))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "data from digits_folder failed validation" in result.stderr, output[-3000:]
    for expected in (
        r"image_decodes .*'images/zero/cut\.png: OSError: image file is truncated'",
        r"image_decodes .*images/zero/notes\.png: UnidentifiedImageError",
        r"image_size .*'images/zero/dot\.png: 1x1'",
        r"labels_in_every_split .* missing \['one'\]",
    ):
        assert re.search(expected, result.stderr), (expected, result.stderr[-4000:])
    assert "Traceback" not in result.stderr and "fine-tune" not in output
    assert_nothing_changed(project, dvc_before)


def test_a_manifest_naming_a_missing_image_is_refused_by_data_import(prefect_harness, project):
    """``retune data import --task image-classification``: the validation-only path (no
    Prefect flow, no MLflow), the same reading and checks as ``retune run``."""
    folder = digits_folder(project / "digits_folder", per_class=10)
    rows = [
        {"path": str(p.relative_to(project)), "label": p.parent.name}
        for p in sorted(folder.glob("*/*.png"))
    ]
    rows[5]["path"] = "digits_folder/zero/gone.png"
    pd.DataFrame(rows).to_csv(project / "manifest.csv", index=False)
    dvc_before = (project / "data.dvc").read_bytes()
    args = ["data", "import", "manifest.csv", "--name", "scans", "--task", "image-classification"]
    result = run_retune(project, prefect_harness, *args, "--project-dir", str(project))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    expected = r"manifest\.csv row 7: image 'digits_folder/zero/gone\.png' does not exist"
    assert re.search(expected, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert_nothing_changed(project, dvc_before)
