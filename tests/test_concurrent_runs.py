"""Two `retune run`s at once on one project, and runs stopped by SIGTERM or SIGKILL, on the
embedded Prefect a user has (no PREFECT_API_URL)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_flow import reviews, write_csv, write_tiny_config

from mlflow import MlflowClient
from pipeline import registry, tracking
from pipeline import tags as tag

pytestmark = pytest.mark.integration

NAME = "retune-reviews"
POLICY = "retune.promotion_verdict"


def start(project: Path, *args: str) -> subprocess.Popen[str]:
    """`retune ARGS` on the embedded Prefect (its own temporary server), in its own group.

    Output goes to a file, not a pipe: after a SIGKILL the temporary server would hold a
    pipe open."""
    env = os.environ | {"PREFECT_HOME": str(project / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    script = Path(sys.executable).parent / "retune"
    log = project.parent / f"retune-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(script), *args, "--project-dir", str(project)],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> str:
    """Wait for the process, clean up its group; its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    return proc.log.read_text()  # type: ignore[attr-defined]


def kill_group(proc: subprocess.Popen[str]) -> None:
    """Whatever the run left behind (its temporary Prefect server after a SIGKILL)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_running_run(project: Path, proc: subprocess.Popen[str], timeout: float = 600) -> str:
    """The id of the MLflow run the process opened, read from the SQLite store directly
    (opening it through MLflow could race the process's own schema creation)."""
    db = project / "mlflow" / "mlflow.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, finish(proc)
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                    rows = conn.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'")
                    found = [r[0] for r in rows.fetchall()]
            except sqlite3.Error:
                found = []
            if found:
                return found[0]
        time.sleep(0.5)
    raise AssertionError("no MLflow run appeared")


def wait_for_training(project: Path, proc: subprocess.Popen[str], timeout: float = 600) -> None:
    """Until the run's training loop has written its first checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, finish(proc)
        if list((project / "runs").glob("*/checkpoints/checkpoint.pt")):
            return
        time.sleep(0.2)
    raise AssertionError("training never wrote a checkpoint")


@pytest.mark.slow  # minutes of real flow runs: make test-slow (CI runs it too)
def test_two_runs_at_once_both_end_with_the_alias_they_earn(project, tiny_base_model):
    write_tiny_config(project, tiny_base_model)
    write_csv(project / "reviews.csv", reviews())
    procs = [start(project, "run") for _ in range(2)]
    outputs = [finish(p, timeout=900) for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
        assert "duplicate column name" not in out
        assert "Traceback" not in out, out[-4000:]
    tracking.configure(project)
    client = MlflowClient()
    versions = {v.version: v for v in registry.list_versions(NAME)}
    assert sorted(versions) == ["1", "2"]
    held = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    assert set(held) == {"champion", "challenger"} and held["champion"] != held["challenger"]
    for alias, outcome in (
        ("champion", "promote to champion"),
        ("challenger", "keep as challenger"),
    ):
        version = client.get_model_version(NAME, held[alias])
        assert version.tags[POLICY].startswith(outcome), version.tags[POLICY]
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags[POLICY] == version.tags[POLICY]
    entries = registry.read_audit(NAME)
    assert registry.audit_problems(entries) == []
    assert [e.alias for e in entries if e.status == "done"].count("champion") == 1


def test_sigterm_ends_the_run_killed_without_a_traceback(project, tiny_base_model):
    write_tiny_config(project, tiny_base_model)
    write_csv(project / "reviews.csv", reviews())
    # Long enough that the signal lands in the training loop (it checkpoints, then stops).
    proc = start(project, "run", "--set", "train.epochs=200", "--set", "train.patience=200")
    run_id = wait_for_running_run(project, proc)
    wait_for_training(project, proc)
    proc.send_signal(signal.SIGTERM)  # the main process only, as `kill PID` does
    out = finish(proc, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert "stopped by SIGTERM: the MLflow run is marked KILLED" in out
    assert "Traceback" not in out, out[-4000:]
    tracking.configure(project)
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    assert registry.list_versions(NAME) == []


def flow_run_state(project: Path, flow_run_id: str) -> str:
    """A flow run's state type, read from the project's Prefect database."""
    db = project / ".prefect" / "prefect.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        ids = (flow_run_id, flow_run_id.replace("-", ""))
        row = conn.execute("SELECT state_type FROM flow_run WHERE id IN (?, ?)", ids).fetchone()
    return row[0] if row else "missing"


@pytest.mark.slow  # minutes: make test-slow (CI runs it too)
def test_after_a_sigkill_the_next_commands_mark_the_orphan_failed(project, tiny_base_model):
    write_tiny_config(project, tiny_base_model)
    write_csv(project / "reviews.csv", reviews())
    proc = start(project, "run")
    run_id = wait_for_running_run(project, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    kill_group(proc)
    tracking.configure(project)
    client = MlflowClient()
    killed = client.get_run(run_id)
    assert killed.info.status == "RUNNING"  # nobody could end it
    flow_run_id = killed.data.tags["retune.prefect_flow_run_id"]
    assert flow_run_state(project, flow_run_id) == "RUNNING"

    after = start(project, "run")
    out = finish(after, timeout=600)
    assert after.returncode == 0, out[-4000:]
    assert f"MLflow run {run_id}: its process {proc.pid} is gone; marked FAILED" in out
    orphan = client.get_run(run_id)
    assert orphan.info.status == "FAILED"
    assert orphan.data.tags[tag.ORPHANED].startswith(f"process {proc.pid} on ")
    assert flow_run_state(project, flow_run_id) == "CRASHED"
    assert [v.version for v in registry.list_versions(NAME)] == ["1"]

    # `retune models` marks them too (an orphan recorded by a process that is gone).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = tracking.process_tags()[tag.HOST]
    tags = {tag.HOST: host, tag.PID: str(gone.pid)}
    left = tracking.start_run(project, "retune", "killed elsewhere", tags)
    listed = finish(start(project, "models"), timeout=300)
    assert f"MLflow run {left}: its process {gone.pid} is gone; marked FAILED" in listed
    assert "champion" in listed
    assert client.get_run(left).info.status == "FAILED"
