"""The real flow on the real packaged MiniLM, through Prefect, GX, DVC and MLflow.

Each test builds a fresh project (git + DVC + the committed data.dvc) in a temp dir and
runs the installed ``retune`` console script, as a user would.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT, run_retune

import mlflow
from mlflow import MlflowClient
from pipeline import tracking
from pipeline.versioning import recorded_datasets

pytestmark = pytest.mark.e2e

SUBSET = (
    "train.max_train_samples=1000",
    "evaluate.max_test_samples=400",
    "train.epochs=1",
    # 32 steps do not beat the frozen probe; this test is about reproducibility and the
    # aliases (the default job below is the quality check).
    "promotion.beat_probe=false",
)


def retune_run(api_url: str, project: Path, *overrides: str):
    args = ["run", "--project-dir", str(project)]
    for item in overrides:
        args += ["--set", item]
    result = run_retune(project, api_url, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow  # minutes: make test-slow (CI runs it too)
def test_two_runs_reproduce_metrics_and_register_champion_then_challenger(prefect_harness, project):
    committed = recorded_datasets(REPO_ROOT / "data.dvc")["rotten-tomatoes"].md5
    first = retune_run(prefect_harness, project, *SUBSET)
    retune_run(prefect_harness, project, *SUBSET)
    # The regenerated example matches the committed data.dvc, byte for byte.
    assert (project / "data.dvc").read_bytes() == (REPO_ROOT / "data.dvc").read_bytes()
    assert "mlflow UI:" in first.stdout and "prefect UI:" in first.stdout

    tracking.configure(project)
    client = MlflowClient()
    name = "retune-rotten-tomatoes"
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {
        "champion": "1",
        "challenger": "2",
    }
    runs = [client.get_run(client.get_model_version(name, v).run_id) for v in ("1", "2")]
    keys = [
        "test_accuracy",
        "test_macro_f1",
        "retention_lee_base",
        "retention_lee",
        "forgetting_mean_drop",
        "best_epoch",
    ]
    assert [runs[0].data.metrics[k] for k in keys] == [runs[1].data.metrics[k] for k in keys]
    for run in runs:
        assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {committed}
        assert run.data.tags["retune.data_md5"] == committed
        assert run.data.params["train.base_model"] == "packaged:all-MiniLM-L6-v2"
        assert 0.6 < run.data.metrics["test_accuracy"] <= 1.0
        # The base encoder's scores are properties of MiniLM (measured independently, DATA.md).
        base = {k: run.data.metrics[f"retention_{k}_base"] for k in ("lee", "men", "wordsim353")}
        assert base == pytest.approx({"lee": 0.508, "men": 0.764, "wordsim353": 0.729}, abs=0.005)
    v2 = client.get_model_version(name, "2")
    # The same model again is not better than the champion: the policy keeps it challenger.
    assert v2.tags["retune.promotion_verdict"].startswith("keep as challenger: ")
    for run in runs:  # both gates passed on the real model with the default mitigation
        assert run.data.tags["retune.verdict"] == "accepted"
        assert run.data.metrics["forgetting_mean_drop"] <= 0.02

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predictions = model.predict(pd.DataFrame({"text": ["A triumph.", "A dull, lifeless mess."]}))
    assert set(predictions["label"]) <= {"fresh", "rotten"}
    assert len(predictions) == 2


@pytest.mark.slow  # about 4 minutes: `make test-slow` and CI run it
def test_default_job_beats_the_frozen_probe_by_two_points(prefect_harness, project):
    """The README's main job, unchanged: full training split, default config."""
    (project / "retune.yaml").write_bytes((REPO_ROOT / "retune.yaml").read_bytes())
    result = retune_run(prefect_harness, project)
    tracking.configure(project)
    client = MlflowClient()
    version = client.get_model_version_by_alias("retune-rotten-tomatoes", "champion")
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["test_accuracy"] >= metrics["probe_test_accuracy"] + 0.02, metrics
    assert f"accuracy {metrics['test_accuracy']:.4f}" in result.stdout
