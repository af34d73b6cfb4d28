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


def retune_run(api_url: str, project: Path, *overrides: str):
    args = ["run", "--project-dir", str(project)]
    for item in overrides:
        args += ["--set", item]
    result = run_retune(project, api_url, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow  # minutes (9 on a 2-core fp32 CPU): `make test-slow` and CI run it
def test_the_default_job_beats_the_frozen_probe_keeps_what_the_base_knew_and_serves(
    prefect_harness, project
):
    """The README's main job, unchanged: full training split, default config.

    One real-model run, because it is the slowest test: that the same run reproduces its
    metrics is checked through ``retune reproduce`` on the tiny model (test_lineage) and,
    bit for bit, for DDP and resumed training (test_resume_ddp)."""
    committed = recorded_datasets(REPO_ROOT / "data.dvc")["rotten-tomatoes"].md5
    (project / "retune.yaml").write_bytes((REPO_ROOT / "retune.yaml").read_bytes())
    result = retune_run(prefect_harness, project)
    # The regenerated example matches the committed data.dvc, byte for byte.
    assert (project / "data.dvc").read_bytes() == (REPO_ROOT / "data.dvc").read_bytes()
    assert "mlflow UI:" in result.stdout and "prefect UI:" in result.stdout

    tracking.configure(project)
    client = MlflowClient()
    name = "retune-rotten-tomatoes"
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {
        "champion": "1"
    }
    run = client.get_run(client.get_model_version(name, "1").run_id)
    metrics = run.data.metrics
    assert metrics["test_accuracy"] >= metrics["probe_test_accuracy"] + 0.02, metrics
    assert f"accuracy {metrics['test_accuracy']:.4f}" in result.stdout
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {committed}
    assert run.data.tags["retune.data_md5"] == committed
    assert run.data.params["train.base_model"] == "packaged:all-MiniLM-L6-v2"
    # The base encoder's scores are properties of MiniLM (measured independently, DATA.md).
    base = {k: metrics[f"retention_{k}_base"] for k in ("lee", "men", "wordsim353")}
    assert base == pytest.approx({"lee": 0.508, "men": 0.764, "wordsim353": 0.729}, abs=0.005)
    # Both gates pass on the real model with the default mitigation.
    assert run.data.tags["retune.verdict"] == "accepted"
    assert metrics["forgetting_mean_drop"] <= 0.02

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predictions = model.predict(pd.DataFrame({"text": ["A triumph.", "A dull, lifeless mess."]}))
    assert set(predictions["label"]) <= {"fresh", "rotten"}
    assert len(predictions) == 2
