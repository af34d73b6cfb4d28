"""MLflow tracking: where runs live, and what each run records.

With no ``MLFLOW_TRACKING_URI`` set, runs and the registry live in a SQLite store
under ``mlflow/`` with artifacts beside it. Every call names its run id explicitly, so
logging works from whichever thread an orchestrator runs a step in.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import tags as tag

STORE_DIR = "mlflow"
# MLflow 3's UI opens an experiment on its GenAI traces view unless told it holds models.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
LOCAL_UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves the embedded store
KILLED = "KILLED"  # MLflow's status for a run that was stopped (SIGTERM, Ctrl-C)
# By name: importing Prefect or torch here would make tracking heavy.
SIGNAL_EXCEPTIONS = ("TerminationSignal", "TrainingInterrupted")


def embedded_uri(project_dir: Path) -> str:
    """The project's own SQLite store under ``mlflow/``."""
    return f"sqlite:///{(project_dir / STORE_DIR / 'mlflow.db').resolve()}"


def artifact_root(project_dir: Path, uri: str) -> str | None:
    """Artifact folder for new experiments in a local SQLite store; a server decides its own."""
    if not uri.startswith("sqlite:"):
        return None
    return (project_dir / STORE_DIR / "artifacts").resolve().as_uri()


def configure(project_dir: Path, uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at ``uri``, or the embedded store; returns the URI.

    The caller reads ``MLFLOW_TRACKING_URI`` (the CLI does); MLflow itself rewrites that
    variable, so it is not read here.
    """
    import mlflow

    uri = uri or embedded_uri(project_dir)
    if uri == embedded_uri(project_dir):
        (project_dir / STORE_DIR).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        create_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    return uri


def create_sqlite_store(db: Path) -> None:
    """Create (migrate) a SQLite tracking and registry store one process at a time.

    MLflow creates its tables when a process first opens the store; two ``retune run``s
    started together on a fresh project both did, and one failed with "table ... already
    exists". Under an exclusive lock beside the database the first creates it, the next
    finds it current.
    """
    import fcntl

    from mlflow import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            client = MlflowClient()
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start_run(project_dir: Path, experiment: str, run_name: str, tags: Mapping[str, str]) -> str:
    """Create the experiment if needed and a run in it; returns the run id (run stays open)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id
        if found is not None
        else client.create_experiment(
            experiment,
            artifact_location=artifact_root(project_dir, mlflow.get_tracking_uri()),
            tags=dict([EXPERIMENT_KIND]),
        )
    )
    if (
        found is not None and found.tags.get(EXPERIMENT_KIND[0]) is None
    ):  # made before retune set it
        client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id


def process_tags() -> dict[str, str]:
    """This process's host and pid, recorded at a run's start (see :func:`mark_orphans`)."""
    return {tag.HOST: socket.gethostname(), tag.PID: str(os.getpid())}


def end_status(err: BaseException) -> str:
    """The status a run ends with when ``err`` stops it: KILLED for a signal or Ctrl-C
    (Prefect raises TerminationSignal on SIGTERM; the training loop checkpoints and raises
    TrainingInterrupted), FAILED for anything else."""
    signal_like = isinstance(err, KeyboardInterrupt | SystemExit) or any(
        cls.__name__ in SIGNAL_EXCEPTIONS for cls in type(err).__mro__
    )
    return KILLED if signal_like else "FAILED"


@dataclass(frozen=True)
class Orphan:
    run_id: str
    pid: int
    tags: dict[str, str]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def mark_orphans(experiment: str) -> list[Orphan]:
    """End RUNNING runs of ``experiment`` whose process is gone (killed with SIGKILL, or
    its machine lost power) as FAILED, tagged ``retune.orphaned``. Only runs recorded on
    this host are judged: another machine's processes cannot be seen from here.

    Returns:
        The runs marked, with their tags (e.g. the Prefect flow run id).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host = socket.gethostname()
    running = client.search_runs(
        [found.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{tag.HOST}` = '{host}'",
        max_results=1000,
    )
    orphans = []
    for run in running:
        pid = int(run.data.tags.get(tag.PID, "0") or 0)
        if pid <= 0 or pid == os.getpid() or _process_alive(pid):
            continue
        client.set_tag(
            run.info.run_id,
            tag.ORPHANED,
            f"process {pid} on {host} was gone; marked FAILED by process {os.getpid()} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        )
        client.set_terminated(run.info.run_id, status="FAILED")
        orphans.append(Orphan(run.info.run_id, pid, dict(run.data.tags)))
    return orphans


def end_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


class MlflowLogger:
    """The training loop's ``MetricLogger`` that writes to one MLflow run."""

    def __init__(self, run_id: str):
        from mlflow import MlflowClient

        self._client = MlflowClient()
        self._run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(
            self._run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )


def log_params_and_metrics(
    run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    from mlflow.entities import Metric, Param

    from mlflow import MlflowClient

    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
    )


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_report(run_id: str, report: Mapping[str, Any], artifact_file: str) -> None:
    """A JSON report as a run artifact, e.g. ``reports/validation.json``."""
    from mlflow import MlflowClient

    MlflowClient().log_text(run_id, json.dumps(report, indent=2, default=str), artifact_file)


def log_dataset(
    run_id: str, frame: pd.DataFrame, name: str, source: str, digest: str, context: str
) -> None:
    """Record a dataset input whose digest is the DVC md5 of the versioned data."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    import mlflow

    with warnings.catch_warnings():
        # A local path matches two registered local source types; both mean the same.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_pandas(
            frame,
            source=source,
            name=name,
            digest=digest,
            targets="label" if "label" in frame else None,  # a generative table has none
        )
    mlflow.MlflowClient().log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]
            )
        ],
    )


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    artifact_uri: str


def get_run(run_id: str) -> RunRecord:
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    return RunRecord(
        run_id=run_id,
        status=run.info.status,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        artifact_uri=run.info.artifact_uri,
    )


def read_report(run_id: str, artifact_file: str) -> dict[str, Any]:
    """A JSON report logged with :func:`log_report`."""
    return json.loads(read_text(run_id, artifact_file))


def read_text(run_id: str, artifact_file: str) -> str:
    """A text artifact of a run, e.g. ``card/model_card.md``."""
    import mlflow

    return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_file}")


def log_folder(run_id: str, folder: Path, artifact_path: str) -> None:
    """Every file under ``folder`` as run artifacts under ``artifact_path``."""
    from mlflow import MlflowClient

    MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


def run_name(dataset: str, strategy: str, run_key: str) -> str:
    """What the UI lists a training run as: ``news-partial-7bbaf18d``."""
    return f"{dataset}-{strategy}-{run_key[:8]}"


def ui_links(tracking_uri: str, run_id: str, model: str, version: str | None) -> dict[str, str]:
    """Direct links into the MLflow UI: the run and, if registered, its model version.

    For a tracking server the links point at it; for the embedded store, at the UI that
    ``make mlflow-ui`` starts on 127.0.0.1:5000.
    """
    from mlflow import MlflowClient

    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http:", "https:")) else LOCAL_UI
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    links = {"run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}"}
    if version is not None:
        links["model version"] = f"{base}/#/models/{model}/versions/{version}"
    return links
