"""Where the default job's time goes: every Prefect task, the training steps, the overhead.

Run from the project root: ``.venv/bin/python bench/overhead.py`` (see bench/README.md).
It runs ``retune run`` (this checkout's code) in a scratch clone of the project, or in
``--project-dir``, timing the process; then reads the run back: the MLflow run it started,
its Prefect flow run (tag ``retune.prefect_flow_run_id``) with each task run's start and end,
and the training steps' time (the metric ``train_seconds``). Overhead is everything but the
training steps, over the whole run: ``(whole - training steps) / whole``, printed for the
flow and for the process (which adds start-up: imports and the temporary Prefect API).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOW_RUN_TAG = "retune.prefect_flow_run_id"
TRAIN_TASK = "train_model"  # the task whose train_seconds are the training steps


@dataclass(frozen=True)
class StepTime:
    """One Prefect task run of the flow: its task's name and wall time."""

    name: str  # the task's name, without Prefect's run suffix ("train_model")
    start: datetime
    seconds: float


@dataclass(frozen=True)
class RunTimes:
    """The times of one ``retune run``; seconds throughout."""

    mlflow_run_id: str
    flow_run_id: str
    flow_seconds: float  # the flow run, start to end
    steps: list[StepTime]  # task runs in start order
    train_seconds: float  # the training steps alone (the train task's train_seconds)
    process_seconds: float | None = None  # the whole `retune run` process, if timed

    @property
    def outside_tasks(self) -> float:
        """Flow time spent between tasks: reports, MLflow logging, the card."""
        return self.flow_seconds - sum(s.seconds for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "outside_tasks": self.outside_tasks,
            "overhead_flow": overhead_ratio(self.flow_seconds, self.train_seconds),
            "overhead_process": (
                overhead_ratio(self.process_seconds, self.train_seconds)
                if self.process_seconds
                else None
            ),
        }


def overhead_ratio(whole_seconds: float, train_seconds: float) -> float:
    """``(whole - training steps) / whole``: the share of the run not spent training.

    Raises:
        ValueError: a whole that is not positive, or training longer than the whole.
    """
    if not whole_seconds > 0:
        raise ValueError(f"the whole run must take a positive time, got {whole_seconds} s")
    if not 0 <= train_seconds <= whole_seconds:
        raise ValueError(
            f"training steps of {train_seconds} s do not fit in a run of {whole_seconds} s"
        )
    return (whole_seconds - train_seconds) / whole_seconds


def task_name(task_run_name: str) -> str:
    """``train_model-2f8`` -> ``train_model`` (Prefect appends a short run suffix)."""
    stem, sep, suffix = task_run_name.rpartition("-")
    return stem if sep and suffix.isalnum() and len(suffix) <= 4 else task_run_name


def flow_times(flow_run_id: str) -> tuple[float, list[StepTime]]:
    """The flow run's wall time and its task runs, from the Prefect API in the environment.

    Raises:
        ValueError: the flow run has not ended, or a task run has no start or end.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    if flow_run.start_time is None or flow_run.end_time is None:
        raise ValueError(f"flow run {flow_run_id} ({flow_run.name}) has not ended")
    steps = []
    for run in runs:
        if run.start_time is None or run.end_time is None:
            raise ValueError(f"task run {run.name} of flow run {flow_run_id} has not ended")
        seconds = (run.end_time - run.start_time).total_seconds()
        steps.append(StepTime(task_name(run.name), run.start_time, seconds))
    steps.sort(key=lambda s: s.start)
    return (flow_run.end_time - flow_run.start_time).total_seconds(), steps


def latest_run(project_dir: Path, experiment: str, since: float | None = None) -> Any:
    """The newest MLflow run of ``experiment`` in the project's store (started after
    ``since``, a Unix time in seconds, if given).

    Raises:
        LookupError: no such run.
    """
    from mlflow import MlflowClient
    from pipeline import tracking

    tracking.configure(project_dir)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    query = f"attributes.start_time >= {int(since * 1000)}" if since is not None else ""
    runs = (
        client.search_runs(
            [found.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
        )
        if found
        else []
    )
    if not runs:
        started = f" started since {time.ctime(since)}" if since is not None else ""
        raise LookupError(
            f"no MLflow run of experiment '{experiment}'{started} in {project_dir}; "
            "did `retune run` fail before it started one?"
        )
    return runs[0]


def measure_run(
    project_dir: Path,
    experiment: str = "retune",
    since: float | None = None,
    process_seconds: float | None = None,
) -> RunTimes:
    """Read one finished ``retune run`` back from MLflow and Prefect.

    Raises:
        LookupError: no run, or a run without the flow-run tag or ``train_seconds``.
    """
    run = latest_run(project_dir, experiment, since)
    flow_run_id = run.data.tags.get(FLOW_RUN_TAG)
    if not flow_run_id:
        raise LookupError(f"MLflow run {run.info.run_id} has no tag {FLOW_RUN_TAG}")
    train_seconds = run.data.metrics.get("train_seconds")
    if train_seconds is None:
        raise LookupError(
            f"MLflow run {run.info.run_id} has no metric train_seconds: it ended before training"
        )
    flow_seconds, steps = flow_times(flow_run_id)
    return RunTimes(
        run.info.run_id, flow_run_id, flow_seconds, steps, float(train_seconds), process_seconds
    )


def format_table(times: RunTimes) -> str:
    """The per-step table and the two overhead ratios, as printed."""
    flow = times.flow_seconds
    lines = [f"{'step':<32}{'seconds':>9}{'of flow':>9}", "-" * 50]
    for step in times.steps:
        lines.append(f"{step.name:<32}{step.seconds:>9.1f}{step.seconds / flow:>9.1%}")
        if step.name == TRAIN_TASK:
            lines.append(f"{'  of which training steps':<32}{times.train_seconds:>9.1f}")
    lines.append(f"{'(in the flow, between tasks)':<32}{times.outside_tasks:>9.1f}")
    lines.append(f"{'flow':<32}{flow:>9.1f}")
    wholes = [("flow", flow)]
    if times.process_seconds:
        process = times.process_seconds
        lines.append(f"{'process':<32}{process:>9.1f}   (start-up and exit {process - flow:.1f} s)")
        wholes.append(("process", process))
    lines.append("")
    for name, whole in wholes:
        ratio = overhead_ratio(whole, times.train_seconds)
        lines.append(
            f"overhead ({name}): ({whole:.1f} - {times.train_seconds:.1f} training steps) "
            f"/ {whole:.1f} = {ratio:.1%}"
        )
    return "\n".join(lines)


def scratch_project(parent: Path) -> Path:
    """A clone of this checkout's last commit: as a fresh clone's ``make run`` sees it."""
    project = parent / "retune"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
    sources = ROOT / ".retune" / "sources"  # what `make setup` builds (git-ignored)
    if sources.is_dir():
        shutil.copytree(sources, project / ".retune" / "sources")
    return project


def run_job(project_dir: Path, overrides: list[str], log: Path) -> tuple[int, float, float]:
    """``retune run`` with this checkout's code in ``project_dir``, output to ``log``.

    Returns:
        (exit code, Unix start time, process wall seconds).
    """
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    # -P: not the working folder first on sys.path, so a clone of the project there does
    # not shadow this checkout's code (PYTHONPATH).
    command = [sys.executable, "-P", "-m", "flows.cli", "run", "--project-dir", str(project_dir)]
    for item in overrides:
        command += ["--set", item]
    started, clock = time.time(), time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=project_dir, env=env, stdout=out, stderr=out).returncode
    return code, started, time.perf_counter() - clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project-dir", type=Path, help="run here (default: a scratch clone)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--experiment", default="retune", help="registry.experiment of the job")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--log", type=Path, help="keep the run's own output in this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="retune-overhead-") as scratch:
        project = (args.project_dir or scratch_project(Path(scratch))).resolve()
        log = Path(scratch) / "retune-run.log"
        print(f"retune run in {project} (output: {log}) ...", flush=True)
        load = os.getloadavg()[0]
        code, started, seconds = run_job(project, args.overrides, log)
        if code not in (0, 3):  # 3: refused by a gate, still a whole run
            print(log.read_text()[-4000:], file=sys.stderr)
            print(f"retune run exited {code}", file=sys.stderr)
            return 1
        from flows.cli import RUNTIME_DEFAULTS  # offline and quiet, as the run had it

        for key, value in RUNTIME_DEFAULTS.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("PREFECT_HOME", str(project / ".prefect"))  # the run's history
        times = measure_run(project, args.experiment, started, seconds)
        if args.log:
            shutil.copyfile(log, args.log)
    print(f"exit code {code}; load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(format_table(times))
    if args.json:
        args.json.write_text(json.dumps(times.to_dict(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
