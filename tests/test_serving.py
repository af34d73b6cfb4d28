"""The served classifier through a real MLflow SQLite store: log, register, alias, load, predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import mlflow
from mlflow import MlflowClient
from pipeline import modelstore, serving, tracking
from pipeline.finetune import predict_proba, save_model
from pipeline.serving import ServingInputError, TextClassifier

NAME = "retune-serving-test"
CHAMPION_URI = f"models:/{NAME}@champion"
LABELS = ["fresh", "rotten"]
PROB_COLUMNS = ["prob_fresh", "prob_rotten"]
# Served and reference probabilities batch (and so pad) texts differently: fp32 sums differ
# in the fifth decimal, so they are compared to 1e-4.
# Lengths from 0 to ~900 characters, not sorted, so length-sorted batches reorder them.
TEXTS = [
    "An epic that never drags, " * 30,
    "Dull.",
    "",
    "A quiet, patient film about grief that earns every one of its tears.",
    "Loud, long and lifeless. " * 12,
    "Wonderful!",
]


@pytest.fixture(scope="module")
def classifier_dir(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with a head set so that both labels occur among TEXTS.

    A random encoder pools all texts to nearly the same vector, so a random head gives one
    label everywhere. This head scores the pooled vector along (pooled["Dull."] - mean):
    "Dull." is rotten and the texts on the other side of the mean are fresh.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_base_model,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    ).eval()
    with torch.no_grad():
        batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
        pooled = model.base_model(**batch).pooler_output  # (N, 32)
        centre = pooled.mean(dim=0)
        direction = pooled[TEXTS.index("Dull.")] - centre
        scale = 2.0 / ((pooled - centre) @ direction).abs().max()  # logit gaps up to 4
        model.classifier.weight.copy_(torch.stack([-direction, direction]) * scale)
        model.classifier.bias.copy_(
            torch.stack([centre @ direction, -(centre @ direction)]) * scale
        )
    return save_model(model, tokenizer, tmp_path_factory.mktemp("clf"))


@pytest.fixture(scope="module")
def reference(classifier_dir: Path) -> np.ndarray:
    """pipeline.finetune.predict_proba on the saved model: what evaluation reports."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    return predict_proba(model, tokenizer, TEXTS, batch_size=4, max_length=128)


@pytest.fixture(scope="module")
def store(classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A store with the classifier logged, registered as version 1 and aliased champion."""
    root = tmp_path_factory.mktemp("mlflow-store")
    tracking.configure(root)
    run_id = tracking.start_run(root, "serving", "log", {})
    model_uri = serving.log_classifier(run_id, classifier_dir, TEXTS[:3])
    tracking.end_run(run_id)
    client = MlflowClient()
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, model_uri, run_id=run_id)
    client.set_registered_model_alias(NAME, "champion", version.version)
    return {"root": str(root), "model_uri": model_uri, "run_id": run_id}


@pytest.fixture
def champion(store: dict[str, str]):
    tracking.configure(Path(store["root"]))
    return mlflow.pyfunc.load_model(CHAMPION_URI)


def test_champion_predicts_like_predict_proba_in_input_order(champion, reference: np.ndarray):
    frame = pd.DataFrame({"text": TEXTS})
    out = champion.predict(frame)

    assert list(out.columns) == ["label", *PROB_COLUMNS]
    assert len(out) == len(TEXTS)
    probs = out[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, reference, atol=1e-4)
    assert out["label"].tolist() == [LABELS[i] for i in reference.argmax(axis=1)]
    assert set(out["label"]) == set(LABELS)  # the head is decisive enough to use both

    # Row i is text i: each text alone (no padding, no sorting) gives the same row, up to
    # the float noise of padding (rows differ from each other by more than 0.01).
    alone = pd.concat([champion.predict(pd.DataFrame({"text": [t]})) for t in TEXTS])
    np.testing.assert_allclose(alone[PROB_COLUMNS].to_numpy(), probs, atol=1e-4)
    assert np.diff(np.sort(probs[:, 0])).min() > 0.01
    # A smaller batch size (a signature param) changes nothing but the batching.
    small = champion.predict(frame, params={"batch_size": 2})
    np.testing.assert_allclose(small[PROB_COLUMNS].to_numpy(), probs, atol=1e-4)
    # A Series named like the input column passes MLflow's schema check too.
    series = champion.predict(pd.Series(TEXTS[:2], name="text"))
    np.testing.assert_allclose(series[PROB_COLUMNS].to_numpy(), probs[:2], atol=1e-4)


def test_text_classifier_takes_lists_and_series_and_keeps_the_index(
    classifier_dir: Path, reference: np.ndarray
):
    model = TextClassifier.load(classifier_dir, {})  # a plain predictor: no MLflow
    assert (model.max_length, model.batch_size, model.labels) == (128, 64, LABELS)

    from_list = model.predict(TEXTS)
    np.testing.assert_allclose(from_list[PROB_COLUMNS].to_numpy(), reference, atol=1e-4)
    series = pd.Series(TEXTS, index=[10 * i for i in range(len(TEXTS))])
    from_series = model.predict(series)
    assert from_series.index.tolist() == series.index.tolist()
    np.testing.assert_allclose(from_series[PROB_COLUMNS].to_numpy(), reference, atol=1e-4)
    assert model.predict([]).columns.tolist() == ["label", *PROB_COLUMNS]

    with pytest.raises(ServingInputError, match=r"no 'text' column; found: review, id"):
        model.predict(pd.DataFrame({"review": ["a"], "id": [1]}))
    with pytest.raises(ServingInputError, match=r"not at positions 1 \(NoneType\)"):
        model.predict(["fine", None])
    with pytest.raises(ServingInputError, match=r"got str"):
        model.predict("one text")


def test_logged_model_holds_safetensors_code_and_no_pickles(
    store: dict[str, str], classifier_dir: Path, tmp_path: Path
):
    tracking.configure(Path(store["root"]))
    local = Path(mlflow.artifacts.download_artifacts(store["model_uri"], dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}

    weights = f"artifacts/{classifier_dir.name}"
    assert {f"{weights}/model.safetensors", f"{weights}/config.json"} <= files
    assert {"retune_model.py", "code/pipeline/serving.py", "requirements.txt"} <= files
    entry = (local / "retune_model.py").read_text()
    assert "from pipeline.serving import TextClassifier" in entry
    assert "mlflow.models.set_model(ServedModel(TextClassifier))" in entry
    pickled = {".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt"}
    assert [f for f in files if Path(f).suffix in pickled] == []

    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor  # logged from code: no cloudpickled instance
    assert flavor["config"] == {"max_length": 128, "batch_size": 64}
    config = json.loads((local / weights / "config.json").read_text())
    assert config["id2label"] == {"0": "fresh", "1": "rotten"}

    requirements = (local / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in requirements] == ["torch", "transformers", "mlflow", "pandas"]
    assert not any("+" in r for r in requirements)

    info = mlflow.models.get_model_info(store["model_uri"])
    assert info.signature.inputs.input_names() == ["text"]
    assert info.signature.outputs.input_names() == ["label", *PROB_COLUMNS]


def test_load_version_is_the_served_model_and_leaves_no_download(
    store: dict[str, str], classifier_dir: Path, reference: np.ndarray, tmp_path: Path
):
    from pipeline.lineage import folder_sha256

    tracking.configure(Path(store["root"]))
    work = tmp_path / "work"
    loaded = modelstore.load_version(NAME, "1", work, digest=folder_sha256)

    assert loaded.uri == f"models:/{NAME}/1"
    assert loaded.output_columns == ["label", *PROB_COLUMNS]
    assert loaded.digest == folder_sha256(classifier_dir)  # the logged weights, unchanged
    assert list(work.iterdir()) == []  # the downloaded copy is gone, the weights in memory
    out = loaded.predict(pd.DataFrame({"text": TEXTS}), params={"batch_size": 2})
    np.testing.assert_allclose(out[PROB_COLUMNS].to_numpy(), reference, atol=1e-4)
    # The plain predictor inside is the text classifier, with its torch model and tokenizer.
    assert isinstance(loaded.predictor, TextClassifier)
    assert loaded.predictor.labels == LABELS and loaded.predictor.max_length == 128
    direct = loaded.predictor.predict(TEXTS)
    np.testing.assert_allclose(direct[PROB_COLUMNS].to_numpy(), reference, atol=1e-4)
    # The pyfunc enforces the signature, as when served.
    with pytest.raises(Exception, match="text"):
        loaded.predict(pd.DataFrame({"review": ["good"]}))


@pytest.mark.parametrize(
    ("source", "target"), [("csv", "csv"), ("jsonl", "jsonl"), ("csv", "jsonl")]
)
def test_predict_file_writes_rows_labels_and_probabilities(
    store: dict[str, str], reference: np.ndarray, tmp_path: Path, source: str, target: str
):
    tracking.configure(Path(store["root"]))
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(len(TEXTS))], "review": TEXTS})
    path, out = tmp_path / f"in.{source}", tmp_path / "out" / f"predicted.{target}"
    if source == "csv":
        rows.to_csv(path, index=False)
    else:
        rows.to_json(path, orient="records", lines=True)

    count = serving.predict_file(
        CHAMPION_URI, path, out, text_column="review", batch_size=4, progress=False
    )

    assert count == len(TEXTS)
    written = (
        pd.read_csv(out, keep_default_na=False)
        if target == "csv"
        else pd.read_json(out, lines=True, dtype=False)
    )
    assert list(written.columns) == ["id", "review", "label", *PROB_COLUMNS]
    assert written["id"].tolist() == rows["id"].tolist()
    assert written["review"].tolist() == TEXTS
    np.testing.assert_allclose(written[PROB_COLUMNS].to_numpy(float), reference, atol=1e-4)
    assert written["label"].tolist() == [LABELS[i] for i in reference.argmax(axis=1)]


def test_predict_file_on_a_header_only_csv_writes_the_columns(store: dict[str, str], tmp_path):
    tracking.configure(Path(store["root"]))
    (tmp_path / "empty.csv").write_text("id,text\n", encoding="utf-8")
    out = tmp_path / "empty.out.csv"
    assert serving.predict_file(CHAMPION_URI, tmp_path / "empty.csv", out, progress=False) == 0
    assert out.read_text().splitlines() == ["id,text,label,prob_fresh,prob_rotten"]


def test_predict_file_errors_name_the_file_and_the_fix(store: dict[str, str], tmp_path: Path):
    tracking.configure(Path(store["root"]))
    missing = tmp_path / "nothere.csv"
    with pytest.raises(ServingInputError, match=r"input file .*nothere\.csv does not exist"):
        serving.predict_file(CHAMPION_URI, missing, tmp_path / "o.csv", progress=False)

    wrong = tmp_path / "reviews.csv"
    wrong.write_text("id,review\n1,good\n", encoding="utf-8")
    with pytest.raises(
        ServingInputError, match=r"column 'text' missing in .*reviews\.csv; found: id, review\."
    ):
        serving.predict_file(CHAMPION_URI, wrong, tmp_path / "o.csv", progress=False)

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "good", "label": "fresh"}\n', encoding="utf-8")
    with pytest.raises(ServingInputError, match=r"already has column\(s\) label"):
        serving.predict_file(CHAMPION_URI, labelled, tmp_path / "o.jsonl", progress=False)
    with pytest.raises(ServingInputError, match=r"is the input file"):
        serving.predict_file(CHAMPION_URI, wrong, wrong, text_column="review", progress=False)
    with pytest.raises(ServingInputError, match=r"expected a \.csv or \.jsonl file"):
        serving.predict_file(CHAMPION_URI, wrong, tmp_path / "o.parquet", progress=False)
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "o.jsonl").exists()


def test_log_classifier_refuses_folders_without_safetensors(classifier_dir: Path, tmp_path: Path):
    with pytest.raises(ServingInputError, match=r"no model\.safetensors"):
        serving.check_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ServingInputError, match=r"pickled files \(pytorch_model\.bin\)"):
        serving.check_model_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ServingInputError, match=r"a PEFT adapter, not a full model"):
        serving.check_model_dir(tmp_path)
    assert serving.check_model_dir(classifier_dir) == LABELS


def test_importing_serving_loads_no_mlflow_torch_transformers_or_prefect():
    code = (
        "import sys, pipeline.serving; print(sorted(m for m in "
        "('mlflow', 'torch', 'transformers', 'prefect') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
