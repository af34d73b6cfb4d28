"""The real SmolLM2-135M-Instruct (packaged GGUF) through the whole flow as a translator."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT, run_retune

from mlflow import MlflowClient
from pipeline import tracking

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_smollm2_tuned_on_a_few_dozen_django_strings_beats_its_base(prefect_harness, project):
    config = REPO_ROOT / "examples" / "translation.yaml"
    args = ["run", "--config", str(config), "--project-dir", str(project)]
    for item in (
        "train.max_train_samples=64",
        "evaluate.max_test_samples=24",
        "generation.max_new_tokens=24",
    ):
        args += ["--set", item]
    result = run_retune(project, prefect_harness, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tracking.configure(project)
    client = MlflowClient()
    version = client.get_model_version("retune-django-de", "1")
    metrics = client.get_run(version.run_id).data.metrics
    # 16 LoRA steps on 64 pairs already lower the held-out answers' loss below the base's.
    assert metrics["test_answer_loss"] < metrics["probe_test_answer_loss"]
    assert 0.0 <= metrics["test_chrf"] <= 100.0
    said = run_retune(project, prefect_harness, "generate", "retune-django-de@champion", "Save")
    assert said.returncode == 0 and said.stdout.strip(), said.stderr[-2000:]
