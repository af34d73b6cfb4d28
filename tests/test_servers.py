"""Scheduled retraining on real servers, all on 127.0.0.1: PostgreSQL, an MLflow tracking
server backed by it (local artifact root), a Prefect server on PostgreSQL, a process work
pool and a worker. `retune deploy` creates the deployment, the worker runs it, and the
registry is checked in PostgreSQL through MLflow. Every server started here is stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_retune
from test_flow import reviews, write_csv, write_tiny_config

pytestmark = pytest.mark.integration

# The newest PostgreSQL installed from Debian packages (.ci/run installs one if missing).
PG_BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin"),
    default=Path("/missing"),
    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
)
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def as_postgres(*args: str) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


# The tracking server without its background job consumers (MLflow's GenAI jobs, unused
# here): it starts in about 5 s and 0.5 GiB instead of 14 s and 2.8 GiB (../shared/ENV.md).
LEAN_MLFLOW = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_command(port: int, pg: str, artifacts: Path) -> list[str]:
    """An MLflow tracking server on 127.0.0.1:port, its store in PostgreSQL at ``pg``."""
    return [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"postgresql+psycopg2://postgres@{pg}/mlflow",
        "--artifacts-destination",
        str(artifacts),
        "--serve-artifacts",
    ]


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway cluster on 127.0.0.1; yields host:port; removed afterwards.

    Its data dir is a fresh folder in /tmp (pytest's own temp dirs are closed to the
    postgres user).
    """
    if not (PG_BIN / "initdb").is_file():
        pytest.fail("PostgreSQL is not installed (/usr/lib/postgresql/*/bin); .ci/run installs it")
    root = Path(tempfile.mkdtemp(prefix="retune-pg-"))
    data, port = root / "pgdata", free_port()
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    subprocess.run(
        as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {data}"
    subprocess.run(
        as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "start",
            "-l",
            str(data / "log"),
        ),
        check=True,
        capture_output=True,
    )
    try:
        for db in ("mlflow", "prefect"):
            subprocess.run(
                [
                    "psql",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "-c",
                    f"CREATE DATABASE {db}",
                ],
                check=True,
                capture_output=True,
            )
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(
            as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def server(args: list[str], env: dict[str, str], health: str, log: Path) -> Iterator[None]:
    with log.open("w") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_http(health, 120, process)
            yield
        except BaseException:
            print(log.read_text()[-3000:])
            raise
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def final_state(api_url: str) -> str:
    """The state (and message) of the latest flow run on the server, once it is final."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    os.environ["PREFECT_API_URL"] = api_url
    started = FlowRunFilter(  # not the runs the cron schedule queued for later
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED, StateType.PENDING])
        )
    )
    with get_client(sync_client=True) as client:
        for _ in range(120):
            runs = client.read_flow_runs(
                flow_run_filter=started, sort=FlowRunSort.START_TIME_DESC, limit=1
            )
            if runs and runs[0].state and runs[0].state.is_final():
                state = runs[0].state
                return state.name if state.is_completed() else f"{state.name}: {state.message}"
            time.sleep(2)
    return "not final after 240 s"


@pytest.mark.slow  # minutes: make test-slow (CI runs it too)
def test_scheduled_retraining_on_postgres_mlflow_and_prefect_servers(
    tmp_path, project, tiny_base_model
):
    with postgres() as pg:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        mlflow_port, prefect_port = free_port(), free_port()
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        api_url = f"http://127.0.0.1:{prefect_port}/api"
        mlflow_cmd = mlflow_server_command(mlflow_port, pg, tmp_path / "artifacts")
        prefect_env = env | {
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@{pg}/prefect",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        prefect_cmd = [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(prefect_port),
        ]
        with (
            server(mlflow_cmd, env | LEAN_MLFLOW, f"{mlflow_uri}/health", tmp_path / "mlflow.log"),
            server(prefect_cmd, prefect_env, f"{api_url}/health", tmp_path / "prefect.log"),
        ):
            client_env = env | {
                "MLFLOW_TRACKING_URI": mlflow_uri,
                "PREFECT_API_URL": api_url,
                "PREFECT_HOME": str(tmp_path / "client-home"),
            }
            write_csv(project / "reviews.csv", reviews())
            write_tiny_config(project, tiny_base_model)

            def cli(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    args,
                    env=client_env,
                    cwd=project,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )

            pool = "retune-process"
            made = cli(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process")
            assert made.returncode == 0, made.stdout + made.stderr
            os.environ.update({"MLFLOW_TRACKING_URI": mlflow_uri, "PREFECT_API_URL": api_url})
            deployed = run_retune(
                project, api_url, "deploy", "--cron", "0 3 * * 1", "--project-dir", str(project)
            )
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            started = cli(
                str(BIN / "prefect"), "deployment", "run", "scheduled-retrain/retune-scheduled"
            )
            assert started.returncode == 0, started.stdout + started.stderr
            worker = cli(str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once")
            assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
            state = final_state(api_url)
            assert state == "Completed", state + worker.stdout[-4000:] + worker.stderr[-4000:]

            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
            for _ in range(60):  # the worker returns once the run is submitted and done
                versions = client.search_model_versions("name = 'retune-reviews'")
                if versions:
                    break
                time.sleep(2)
            assert [str(v.version) for v in versions] == ["1"]
            version = client.get_model_version("retune-reviews", "1")
            assert version.tags["retune.data_md5"]
            assert version.tags["retune.verdict"] == "accepted"
            assert version.tags["retune.promotion_verdict"].startswith("promote to champion")
            champion = client.get_model_version_by_alias("retune-reviews", "champion")
            assert str(champion.version) == "1"
            # The registry really lives in PostgreSQL.
            rows = subprocess.run(
                [
                    "psql",
                    "-h",
                    pg.split(":")[0],
                    "-p",
                    pg.split(":")[1],
                    "-U",
                    "postgres",
                    "-d",
                    "mlflow",
                    "-tAc",
                    "SELECT alias, version FROM registered_model_aliases",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            assert "champion|1" in rows


@pytest.mark.slow  # about 2 minutes: `make test-slow` and CI run it
def test_mlflow_server_away_briefly_is_survived_and_longer_fails_cleanly(
    prefect_harness, project, tiny_base_model, tmp_path
):
    """Stop and restart the real MLflow server during real runs."""
    from mlflow import MlflowClient

    write_csv(project / "reviews.csv", reviews())
    write_tiny_config(project, tiny_base_model)
    with postgres() as pg:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        command = mlflow_server_command(port, pg, tmp_path / "artifacts")
        log = (tmp_path / "mlflow.log").open("a")

        def start() -> subprocess.Popen:
            process = subprocess.Popen(
                command, env=env | LEAN_MLFLOW, stdout=log, stderr=subprocess.STDOUT
            )
            wait_http(f"{uri}/health", 120, process)
            return process

        def stop(process: subprocess.Popen) -> None:
            process.terminate()
            process.wait(30)

        run_env = env | {
            "MLFLOW_TRACKING_URI": uri,
            "PREFECT_API_URL": prefect_harness,
            "PREFECT_HOME": str(project / ".prefect"),
        }
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)

        def start_run(**extra_env: str) -> subprocess.Popen:
            return subprocess.Popen(
                [str(BIN / "retune"), "run", "--project-dir", str(project)],
                env=run_env | extra_env,
                cwd=project,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )

        def wait_for_runs(count: int) -> None:
            for _ in range(300):
                experiment = client.get_experiment_by_name("retune")
                if experiment and len(client.search_runs([experiment.experiment_id])) >= count:
                    return
                time.sleep(1)
            raise TimeoutError(f"no MLflow run number {count}")

        server_process = start()
        try:
            # Away for a few seconds: the run's requests are retried with backoff.
            first = start_run()
            wait_for_runs(1)
            stop(server_process)
            time.sleep(8)
            server_process = start()
            out, _ = first.communicate(timeout=900)
            assert first.returncode == 0, out[-4000:]
            versions = client.search_model_versions("name = 'retune-reviews'")
            assert [str(v.version) for v in versions] == ["1"]

            # Away for good: the run fails (non-zero) and registers nothing. Two retries per
            # request instead of the default six (about a minute each) keep the test short;
            # the outcome is the same.
            second = start_run(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2")
            wait_for_runs(2)
            stop(server_process)
            out, _ = second.communicate(timeout=900)
            assert second.returncode != 0, out[-4000:]
            server_process = start()
            versions = client.search_model_versions("name = 'retune-reviews'")
            assert [str(v.version) for v in versions] == ["1"]
            champion = client.get_model_version_by_alias("retune-reviews", "champion")
            assert str(champion.version) == "1"
        finally:
            if server_process.poll() is None:
                stop(server_process)
            log.close()
