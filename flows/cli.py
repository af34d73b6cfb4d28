"""``retune`` command line: runs the Prefect flows on the embedded default or real servers."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.config import ConfigError, describe_config, load_config

app = typer.Typer(
    help="retune: fine-tune pretrained transformers through an audited pipeline.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_CONFIG = "retune.yaml"


@app.callback()
def _root() -> None:
    """retune: fine-tune pretrained transformers through an audited pipeline."""


def set_runtime_defaults(project_dir: Path) -> None:
    """Offline, quiet, reproducible defaults; a value the user already set wins.

    Called before Prefect, MLflow or transformers are imported, so they read it.
    """
    defaults = {
        "HF_HUB_OFFLINE": "1",  # a hub id otherwise retries for ~46 s before failing
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # Ephemeral Prefect keeps its flow-run history with the project, for the UI.
        "PREFECT_HOME": str(project_dir / ".prefect"),
        "PREFECT_LOGGING_LOG_PRINTS": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def ui_commands(project_dir: Path, tracking_uri: str) -> dict[str, str]:
    """Exact shell commands that open the UIs on what a run stored."""
    venv_bin = Path(sys.executable).parent
    mlflow, prefect = venv_bin / "mlflow", venv_bin / "prefect"
    commands = {
        "mlflow": f"{mlflow} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000",
    }
    if not os.environ.get("PREFECT_API_URL"):
        home = os.environ["PREFECT_HOME"]
        commands["prefect"] = f"PREFECT_HOME={home} {prefect} server start --host 127.0.0.1"
    else:
        commands["prefect"] = f"open {os.environ['PREFECT_API_URL'].removesuffix('/api')}"
    return commands


def print_summary(summary: Any, project_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="retune run", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = summary.rows
    table.add_row("data md5", f"{summary.data_md5}  (data.dvc)")
    table.add_row(
        "rows",
        f"train {rows['train']} (used {rows['train_used']}), validation {rows['validation']}, "
        f"test {rows['test']} (used {rows['test_used']})",
    )
    table.add_row("validation", summary.validation)
    for g in summary.groups:
        if g["too_small"]:
            table.add_row(f"group {g['group']}", f"{g['rows']} rows: too small to judge")
            continue
        table.add_row(
            f"group {g['group']}",
            f"{g['rows']} rows ({g['share']:.1%}), positive rate {g['positive_rate']:.3f} vs rest "
            f"{g['rest_positive_rate']:.3f} (diff {g['rate_difference']:+.3f})",
        )
    test, probe = summary.test, summary.probe
    table.add_row(
        "test (tuned)", f"accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}"
    )
    table.add_row(
        "test (frozen probe)",
        f"accuracy {probe['accuracy']:.4f}, macro-F1 {probe['macro_f1']:.4f}  "
        f"(tuned - probe: {test['accuracy'] - probe['accuracy']:+.4f} accuracy)",
    )
    for c in test["per_class"]:
        table.add_row(
            f"  class {c['label']}",
            f"P {c['precision']:.3f} R {c['recall']:.3f} F1 {c['f1']:.3f} n={c['support']}",
        )
    f = summary.forgetting
    table.add_row(
        "forgetting (Lee)",
        f"Spearman base {f['base_score']:.4f} -> tuned {f['tuned_score']:.4f} "
        f"(drop {f['drop']:+.4f})",
    )
    table.add_row("training", f"{summary.train_seconds:.0f} s")
    table.add_row(
        "registered",
        f"{summary.model_name} version {summary.version}, aliases {summary.aliases or '-'} "
        f"({summary.alias_reason}); champion is version {summary.champion_version}",
    )
    table.add_row("mlflow run", summary.mlflow_run_id)
    table.add_row("reports", summary.report_dir)
    console.print(table)
    for name, command in ui_commands(project_dir, summary.tracking_uri).items():
        console.print(f"[bold]{name} UI:[/bold] {command}", soft_wrap=True)


@app.command(
    epilog="Config keys (set in the YAML file or with --set):\n\n"
    + describe_config().replace("\n", "\n\n")
)
def run(
    config: Annotated[
        Path | None, typer.Option(help=f"YAML config file (default: {DEFAULT_CONFIG} if present).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key, e.g. --set train.epochs=3.")
    ] = None,
    project_dir: Annotated[
        Path, typer.Option(help="Project root (data/, data.dvc, mlflow/).")
    ] = Path("."),
) -> None:
    """Run the retraining flow: prepare, validate, version, bias, fine-tune, evaluate, register."""
    project_dir = project_dir.resolve()
    set_runtime_defaults(project_dir)
    if config is None and (project_dir / DEFAULT_CONFIG).is_file():
        config = project_dir / DEFAULT_CONFIG
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as err:
        _fail(str(err))
    from flows.retrain import retrain  # imports Prefect: after the env defaults are set
    from pipeline.data import DataError
    from pipeline.validation import DataValidationError
    from pipeline.versioning import DataVersionError

    try:
        summary = retrain(cfg, str(project_dir), os.environ.get("MLFLOW_TRACKING_URI"))
    except (DataError, DataValidationError, DataVersionError, FileNotFoundError) as err:
        _fail(str(err))
    print_summary(summary, project_dir)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
