"""Scheduled retraining through a real Prefect API, a process work pool and a worker:
`retune deploy` creates the deployment; the first run retrains and registers; the second
finds the data unchanged and skips, recorded with its reason."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_retune
from test_flow import reviews, write_csv, write_tiny_config

from mlflow import MlflowClient
from pipeline import tracking

pytestmark = pytest.mark.integration


def prefect_cli(api_url: str, project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PREFECT_API_URL": api_url, "PREFECT_HOME": str(project / ".prefect")}
    # As run_retune: the worker's flow runs use the project's embedded store, never a
    # tracking URI another test's module fixture left in this process's environment.
    env.pop("MLFLOW_TRACKING_URI", None)
    prefect = Path(sys.executable).parent / "prefect"
    return subprocess.run(
        [str(prefect), *args], env=env, capture_output=True, text=True, timeout=300, cwd=project
    )


def run_deployment_and_wait(api_url: str, project: Path, deployment: str, pool: str) -> str:
    """Trigger a run, let one worker pass execute it, return the final state's name."""
    started = prefect_cli(api_url, project, "deployment", "run", deployment)
    assert started.returncode == 0, started.stdout + started.stderr
    worker = prefect_cli(api_url, project, "worker", "start", "--pool", pool, "--run-once")
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    os.environ["PREFECT_API_URL"] = api_url
    with get_client(sync_client=True) as client:
        for _ in range(60):
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[deployment.split("/")[1]])
                ),
                sort=FlowRunSort.START_TIME_DESC,
                limit=1,
            )
            if runs and runs[0].state and runs[0].state.is_final():
                return runs[0].state.name
            time.sleep(2)
    raise AssertionError("the deployment's run did not finish")


@pytest.mark.slow  # minutes: make test-slow (CI runs it too)
def test_deploy_run_through_a_worker_then_skip_unchanged_data(
    prefect_harness, project, tiny_base_model
):
    write_csv(project / "reviews.csv", reviews())
    write_tiny_config(project, tiny_base_model)
    pool = "retune-test-pool"
    created = prefect_cli(
        prefect_harness, project, "work-pool", "create", pool, "--type", "process"
    )
    assert created.returncode == 0, created.stdout + created.stderr

    deployed = run_retune(
        project,
        prefect_harness,
        "deploy",
        "--cron",
        "0 3 * * 1",
        "--name",
        "nightly",
        "--pool",
        pool,
        "--project-dir",
        str(project),
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "deployment scheduled-retrain/nightly" in deployed.stdout
    bad = run_retune(project, prefect_harness, "deploy", "--project-dir", str(project))
    assert bad.returncode == 1 and "give exactly one schedule" in bad.stderr

    assert (
        run_deployment_and_wait(prefect_harness, project, "scheduled-retrain/nightly", pool)
        == "Completed"
    )
    tracking.configure(project)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("retune-reviews", "champion").version) == "1"

    assert (
        run_deployment_and_wait(prefect_harness, project, "scheduled-retrain/nightly", pool)
        == "Completed"
    )
    experiment = client.get_experiment_by_name("retune")
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    assert runs[0].data.tags["retune.verdict"] == "skipped"
    assert runs[0].data.tags["retune.skip_reason"].startswith("data unchanged since the champion")
    versions = client.search_model_versions("name = 'retune-reviews'")
    assert len(versions) == 1  # nothing new registered


def test_deploy_to_a_kubernetes_pool_asks_for_the_configured_gpus(
    prefect_harness, project, tiny_base_model
):
    """On a Kubernetes pool (infra's job template) a run's job asks for nproc_per_node GPUs,
    and finds the project and the code where the image has them, not where deploy ran."""
    import yaml
    from prefect.client.orchestration import get_client

    write_tiny_config(project, tiny_base_model)
    config = yaml.safe_load((project / "retune.yaml").read_text())
    config["train"]["nproc_per_node"] = 4
    (project / "retune.yaml").write_text(yaml.safe_dump(config))
    template = Path(__file__).parents[1] / "infra" / "k8s" / "base-job-template.json"
    pool = "retune-k8s-test"
    created = prefect_cli(
        prefect_harness,
        project,
        "work-pool",
        "create",
        pool,
        "--type",
        "kubernetes",
        "--base-job-template",
        str(template),
    )
    assert created.returncode == 0, created.stdout + created.stderr
    missing = run_retune(
        project,
        prefect_harness,
        "deploy",
        "--cron",
        "0 3 * * 1",
        "--pool",
        "no-such-pool",
        "--project-dir",
        str(project),
    )
    assert missing.returncode == 1 and "work pool 'no-such-pool' not found" in missing.stderr
    deployed = run_retune(
        project,
        prefect_harness,
        "deploy",
        "--cron",
        "0 3 * * 1",
        "--name",
        "k8s",
        "--pool",
        pool,
        "--project-dir",
        str(project),
        "--worker-project-dir",
        "/project",
        "--worker-code-dir",
        "/opt/retune",
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    os.environ["PREFECT_API_URL"] = prefect_harness
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("scheduled-retrain/k8s")
    assert deployment.job_variables == {"gpus": 4}
    assert deployment.parameters["project_dir"] == "/project"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/retune"}}
    ]
    # updating the pull steps kept the deployment's one-run-at-a-time limit
    assert deployment.global_concurrency_limit.limit == 1
