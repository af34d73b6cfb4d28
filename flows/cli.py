"""``retune`` command line: runs the Prefect flows on the embedded default or real servers."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline import tags as tag
from pipeline.config import ConfigError, describe_config, load_config
from pipeline.cpu import WAIT_POLICY_ENV

app = typer.Typer(
    help="retune: fine-tune pretrained transformers through an audited pipeline.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_CONFIG = "retune.yaml"
REFUSED_EXIT = 3  # a gate or the promotion policy refused the model: nothing moved


DEBUG = {"on": False}  # --debug: tracebacks for expected errors too


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for bad input and refusals too.")
    ] = False,
) -> None:
    """retune: fine-tune pretrained transformers through an audited pipeline."""
    DEBUG["on"] = debug


class ExpectedErrorFilter(logging.Filter):
    """Keeps Prefect's console quiet about an expected error (bad input, a refused gate).

    Prefect logs a failed task and flow run with the traceback, then the final state; for
    these errors the CLI prints one ``error:`` or ``refused:`` line instead. Records on other
    loggers, and every record about any other exception (a bug), pass unchanged. The Prefect
    API still receives the records: only the console handler carries this filter.
    """

    def __init__(self, expected: tuple[type[BaseException], ...]):
        super().__init__()
        self.expected = expected
        self.names = tuple(cls.__name__ for cls in expected)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            return not isinstance(record.exc_info[1], self.expected)
        text = record.getMessage()
        return not any(f"{name}(" in text or f"{name}:" in text for name in self.names)


@contextmanager
def quiet_expected_errors(expected: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Filter Prefect's console handlers for the duration of a flow call (not with --debug)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    quiet = ExpectedErrorFilter(expected)
    if not DEBUG["on"]:
        for handler in handlers:
            handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


# Offline, quiet, reproducible runs; read by Prefect, MLflow and transformers at import.
RUNTIME_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",  # a hub id otherwise retries for ~46 s before failing
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # A tracking server away for up to about a minute is waited for: every MLflow request
    # is retried 6 times with exponential backoff (0, 2, 4, 8, 16, 32 s); longer, the run fails.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    # OpenMP threads sleep rather than spin while waiting: read once, when torch loads.
    **WAIT_POLICY_ENV,
}


def set_runtime_defaults(project_dir: Path) -> None:
    """Set RUNTIME_DEFAULTS and the project's PREFECT_HOME; a value the user set wins.

    Called before Prefect, MLflow or transformers are imported, so they read it.
    """
    # Ephemeral Prefect keeps its flow-run history with the project, for the UI.
    for key, value in (RUNTIME_DEFAULTS | {"PREFECT_HOME": str(project_dir / ".prefect")}).items():
        os.environ.setdefault(key, value)


PREFECT_START_LOCK = "server-start.lock"


def start_embedded_prefect() -> None:
    """Start this process's temporary Prefect API now, one process at a time per PREFECT_HOME.

    Without PREFECT_API_URL every ``retune run`` starts its own temporary server on the
    project's database (PREFECT_HOME/prefect.db), and each server migrates the database as
    it starts: two runs started together both ran the migrations and one failed with
    "duplicate column name". Under an exclusive file lock in PREFECT_HOME the first server
    migrates; the next one finds the schema current. The flow reuses this server.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api.server import SubprocessASGIServer

    from pipeline.registry import file_lock

    with file_lock(Path(os.environ["PREFECT_HOME"]) / PREFECT_START_LOCK):
        SubprocessASGIServer().start()


class Stopped(BaseException):
    """SIGTERM reached ``retune run`` (raised by the handler :func:`stop_on_sigterm` sets)."""

    def __init__(self, signal_number: int):
        super().__init__(f"signal {signal_number}")
        self.signal = signal_number


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Stopped`, so that the CLI ends with a message and its
    cleanup (the temporary Prefect server) runs. Inside the flow Prefect's own handler
    raises TerminationSignal, the flow ends its MLflow run KILLED, and Prefect sends the
    signal again to the handler it found: this one (Python's default would kill the
    process without cleanup)."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, handler)


def stopped_by_signal(err: BaseException) -> None:
    """A run stopped by SIGTERM or Ctrl-C: one line, exit 128 + the signal (no traceback).
    Its MLflow run was ended KILLED and nothing half-registered stays in the registry."""
    import signal

    default = signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal.SIGTERM
    number = int(getattr(err, "signal", default))
    typer.echo(
        f"stopped by {signal.Signals(number).name}: the MLflow run is marked KILLED and the "
        "registry is unchanged unless the run had already registered its version",
        err=True,
    )
    raise typer.Exit(code=128 + number)


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


def print_validation_table(rows: list[tuple[str, str, str, str]]) -> None:
    """The validation suite as a short table: check, severity, status, flagged rows."""
    from rich.table import Table

    from pipeline.validation import TABLE_HEADER

    table = Table(*TABLE_HEADER, title="data validation", title_justify="left")
    for check, severity, status, flagged in rows:
        style = {"failed": "red" if severity == "error" else "yellow", "warned": "yellow"}.get(
            status, ""
        )
        table.add_row(check, severity, f"[{style}]{status}[/{style}]" if style else status, flagged)
    _console().print(table)


def print_forgetting_table(rows: list[tuple[str, ...]], report: dict[str, Any]) -> None:
    """Retention per task against the base model (and the champion), and the gate."""
    from rich.table import Table

    from pipeline.forgetting import TABLE_HEADER

    table = Table(*TABLE_HEADER, title="forgetting (retention suite)", title_justify="left")
    for row in rows:
        table.add_row(*row)
    console = _console()
    console.print(table)
    for warning in report.get("warnings", []):
        console.print(f"[yellow]retention suite: {warning}[/yellow]", soft_wrap=True)
    if report.get("cka"):
        cka = ", ".join(f"{v:.3f}" for v in report["cka"])
        console.print(f"CKA base vs tuned per layer (embeddings first): {cka}", soft_wrap=True)
    console.print(f"forgetting gate: {report['gate']['summary']}", soft_wrap=True)


def print_bias_tables(
    rows: list[tuple[str, ...]], groups: list[tuple[str, ...]], report: dict[str, Any]
) -> None:
    """Model bias on the test split: headline measures, per group, and the gate."""
    from rich.table import Table

    from pipeline import lm_bias
    from pipeline.fairness import GROUP_TABLE_HEADER, OVERALL, TABLE_HEADER

    console = _console()
    generative = "shifts" in report  # a causal LM's CrowS-Pairs report
    if not generative and all(row[0] == OVERALL for row in groups):
        console.print(
            "model bias: no groups to compare - the data has no identity column "
            "(set data.identity_column, e.g. site, sex or age band, to measure per-group "
            "figures and gate on them)",
            soft_wrap=True,
        )
        rows, groups = [], []
    header = lm_bias.TABLE_HEADER if generative else TABLE_HEADER
    title = "model bias (CrowS-Pairs)" if generative else "model bias (test split)"
    if rows:
        table = Table(*header, title=title, title_justify="left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if not generative and groups:
        per_group = Table(*GROUP_TABLE_HEADER, title="per group", title_justify="left")
        empty = [row[0] for row in groups if row[1] == "0"]
        for row in groups:
            if row[1] != "0":
                per_group.add_row(*row)
        console.print(per_group)
        if empty:
            console.print(f"groups with no test rows: {', '.join(empty)}", soft_wrap=True)
    for check in report["gate"]["checks"]:
        console.print(
            f"bias check {check['check']} ({check['severity']}): {check['status']}"
            f" - {check['detail']}",
            soft_wrap=True,
        )
    console.print(f"bias gate: {report['gate']['status']}", soft_wrap=True)


def _scores(report: dict[str, Any]) -> str:
    """Accuracy and macro-F1; ROC-AUC and calibration error where the report has them."""
    text = f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}"
    if "ece" in report:
        auc = report["roc_auc"]
        text += f", ROC-AUC {auc:.4f}" if auc is not None else ", ROC-AUC n/a"
        text += f", ECE {report['ece']:.4f}"
    return text


def _class_figures(c: dict[str, Any]) -> str:
    text = f"P {c['precision']:.3f} R {c['recall']:.3f} F1 {c['f1']:.3f} n={c['support']}"
    if "specificity" in c:
        spec, auc = c["specificity"], c["roc_auc"]
        text += f" spec {spec:.3f}" if spec is not None else " spec n/a"
        text += f" AUC {auc:.3f}" if auc is not None else " AUC n/a"
    return text


def _classification_rows(test: dict[str, Any], probe: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("test (tuned)", _scores(test)),
        (
            "test (frozen probe)",
            f"{_scores(probe)}  "
            f"(tuned - probe: {test['accuracy'] - probe['accuracy']:+.4f} accuracy)",
        ),
    ]
    return rows + [(f"  class {c['label']}", _class_figures(c)) for c in test["per_class"]]


def _generation_figures(report: dict[str, Any]) -> str:
    text = (
        f"answer loss {report['answer_loss']:.4f} (perplexity {report['perplexity']:.2f}), "
        f"token accuracy {report['token_accuracy']:.4f}"
    )
    if "chrf" in report:
        text += f", chrF {report['chrf']:.1f}, BLEU {report['bleu']:.1f}"
    return text


def _generation_rows(test: dict[str, Any], base: dict[str, Any]) -> list[tuple[str, str]]:
    """A generative task's figures, tuned and base, and a few answers side by side."""
    rows = [
        ("test (tuned)", _generation_figures(test)),
        ("test (base model)", _generation_figures(base)),
    ]
    if "chrf" in test:
        rows.append(("chrF tuned - base", f"{test['chrf'] - base['chrf']:+.1f}"))
    for i, (mine, theirs) in enumerate(zip(test["examples"], base["examples"], strict=False)):
        rows.append((f"example {i + 1}", mine["prompt"]))
        rows.append(("  reference", mine["reference"]))
        rows.append(("  base", theirs["answer"]))
        rows.append(("  tuned", mine["answer"]))
    return rows


def _rate_name(group: dict[str, Any]) -> str:
    """The group's rate by name: the positive rate, or (more than two labels) its label's."""
    return f"'{group['label']}' rate" if group.get("per_label") else "positive rate"


def print_summary(summary: Any, project_dir: Path) -> None:
    from rich.table import Table

    console = _console()
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
    small = [f"{g['group']} ({g['rows']})" for g in summary.groups if g["too_small"]]
    if small:
        table.add_row("groups too small", ", ".join(small) + " rows: too small to judge")
    labelled = "accuracy" in summary.test  # a classifier; a generative report has no labels
    for g in summary.groups:
        if g["too_small"]:
            continue
        rates = (
            f", {_rate_name(g)} {g['positive_rate']:.3f} vs rest {g['rest_positive_rate']:.3f} "
            f"(diff {g['rate_difference']:+.3f})"
            if labelled
            else ""
        )
        table.add_row(f"group {g['group']}", f"{g['rows']} rows ({g['share']:.1%}){rates}")
    rows_of = _classification_rows if labelled else _generation_rows
    for what, value in rows_of(summary.test, summary.probe):
        table.add_row(what, value)
    f = summary.forgetting
    base = f["base"]
    table.add_row(
        "forgetting",
        f"mean drop {base['mean_drop']:+.3f} (95% CI up to {base['mean_ci_high']:+.3f}), "
        f"worst {base['worst_task']} {base['worst_drop']:+.3f}; gate {f['gate']['summary']}",
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
    print_validation_table(summary.validation_table)
    print_forgetting_table(summary.forgetting_table, summary.forgetting)
    print_bias_tables(summary.bias_table, summary.bias_groups, summary.bias)
    judged = {g["group"] for g in summary.groups if not g["too_small"]}
    for flag in summary.data_bias_flags:  # too-small groups are listed in the table above
        if flag.split(":")[0] in judged:
            console.print(f"[yellow]data bias: {flag}[/yellow]", soft_wrap=True)
    print_links(summary.links, project_dir, summary.tracking_uri)


def print_links(links: dict[str, str], project_dir: Path, tracking_uri: str) -> None:
    """Where to look: the UI commands, then direct links to the run and the model version."""
    console = _console()
    for name, command in ui_commands(project_dir, tracking_uri).items():
        console.print(f"[bold]{name} UI:[/bold] {command}", soft_wrap=True)
    for what, url in links.items():
        console.print(f"[bold]{what}:[/bold] {url}", soft_wrap=True)


ProjectDir = Annotated[Path, typer.Option(help="Project root (data/, data.dvc, mlflow/).")]
ConfigFile = Annotated[
    Path | None, typer.Option(help=f"YAML config file (default: {DEFAULT_CONFIG} if present).")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a key, e.g. --set train.epochs=3 (keys: retune run --help)."
    ),
]


@app.command(
    epilog="Config keys (set in the YAML file or with --set):\n\n"
    + describe_config().replace("\n", "\n\n")
)
def run(
    config: ConfigFile = None,
    set_: Overrides = None,
    project_dir: ProjectDir = Path("."),
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for bad input and refusals too.")
    ] = False,
) -> None:
    """Run the retraining flow: prepare, validate, version, bias, fine-tune, evaluate, register."""
    DEBUG["on"] = DEBUG["on"] or debug
    project_dir = project_dir.resolve()
    cfg = _load(project_dir, config, set_ or [])
    from prefect.exceptions import TerminationSignal

    from flows.retrain import (
        ModelRefused,
        retrain,  # imports Prefect: after the env defaults are set
    )
    from pipeline.causal_lm import NotACausalLM
    from pipeline.data import DataError
    from pipeline.finetune import TrainingInterrupted
    from pipeline.registry import StaleChampionError
    from pipeline.validation import DataValidationError
    from pipeline.versioning import DataVersionError

    bad_input = (DataError, DataValidationError, DataVersionError, FileNotFoundError, NotACausalLM)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    stop_on_sigterm()
    try:
        start_embedded_prefect()
        expected = (*bad_input, ModelRefused, StaleChampionError, TrainingInterrupted)
        with quiet_expected_errors(expected):  # a SIGTERM in training is no bug either
            summary = retrain(cfg, str(project_dir), uri)
    except bad_input as err:
        _fail(str(err))
    except (Stopped, TerminationSignal, TrainingInterrupted, KeyboardInterrupt) as err:
        stopped_by_signal(err)
    except StaleChampionError as err:  # the champion kept changing while this run promoted
        _fail(str(err))
    except ModelRefused as refused:
        _debug_traceback()
        kept, bias = refused.forgetting, refused.bias
        if kept is not None:
            print_forgetting_table(kept.table_rows(), kept.to_dict())
        if bias is not None:
            print_bias_tables(bias.table_rows(), bias.group_rows(), bias.to_dict())
        from pipeline import tracking

        store = tracking.configure(project_dir, uri)
        print_links(tracking.ui_links(store, refused.run_id, "", None), project_dir, store)
        typer.echo(f"refused: {refused}", err=True)
        raise typer.Exit(code=REFUSED_EXIT) from None
    print_summary(summary, project_dir)


data_app = typer.Typer(
    help="Import, list and trace the versioned datasets under data/.", no_args_is_help=True
)
app.add_typer(data_app, name="data")


def _load(project_dir: Path, config: Path | None, overrides: list[str]) -> Any:
    """Resolve the project, set runtime defaults and load the config (or exit 1)."""
    set_runtime_defaults(project_dir)
    if config is None and (project_dir / DEFAULT_CONFIG).is_file():
        config = project_dir / DEFAULT_CONFIG
    try:
        return load_config(config, overrides)
    except ConfigError as err:
        _fail(str(err))


# How `retune data import` names the data settings in its messages: its own flags.
IMPORT_FLAGS = {
    "source": "the FILE argument",
    "encoding": "--encoding",
    "max_text_bytes": "--max-text-bytes",
    "text_column": "--text-col",
    "label_column": "--label-col",
    "group_column": "--group-col",
    "split_column": "--split-col",
    "confidence_column": "--confidence-col",
    "identity_column": "--identity-col",
}

# Settings `retune data import` has flags for, named so in its validation fixes.
IMPORT_SETTINGS = {"data.labels": "--labels"}


@data_app.command("import")
def data_import(
    path: Annotated[
        Path,
        typer.Argument(
            help="CSV, JSONL or Parquet file, anywhere (relative to --project-dir); with "
            "--task image-classification an image folder (FOLDER/<label>/*.png) or a CSV "
            "manifest (path,label,...)."
        ),
    ],
    name: Annotated[str, typer.Option(help="Dataset name: the folder under data/.")],
    text_col: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_col: Annotated[str, typer.Option(help="Column holding the label.")] = "label",
    group_col: Annotated[
        str | None, typer.Option(help="Rows sharing it stay in one split (e.g. author, movie).")
    ] = None,
    split_col: Annotated[
        str | None, typer.Option(help="Column with train/validation/test, if already split.")
    ] = None,
    confidence_col: Annotated[str | None, typer.Option(help="Annotator confidence (0..1).")] = None,
    identity_col: Annotated[
        str | None, typer.Option(help="Identity group per row (e.g. gender), for bias checks.")
    ] = None,
    encoding: Annotated[str, typer.Option(help="Text encoding of the file.")] = "utf-8",
    max_text_bytes: Annotated[
        int | None,
        typer.Option(help="Safety limit: refuse a text longer than this (default 1,000,000)."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            help="The allowed labels, comma-separated (e.g. business,sport,tech); default: "
            "those of --config/--set data.labels, else the labels found."
        ),
    ] = None,
    allow_invalid: Annotated[
        bool,
        typer.Option(help="Version the data even if error-level checks fail (recorded)."),
    ] = False,
    task: Annotated[
        str | None,
        typer.Option(help="The kind of task the data is for (default: the config's task)."),
    ] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Validate a CSV/JSONL/Parquet file, then import it as a new version of dataset NAME.

    Reads, splits, tokenises and validates it, and only then writes data/NAME/, versions it
    with DVC (data.dvc) and pushes it. An error-level failure changes nothing (exit 1) unless
    --allow-invalid. Every dropped row is counted with its reason.
    """
    project_dir = project_dir.resolve()
    overrides = [*(set_ or []), *([f"task={task}"] if task else [])]
    cfg = _load(project_dir, config, overrides)
    columns = {
        "text_column": text_col,
        "label_column": label_col,
        "group_column": group_col,
        "split_column": split_col,
        "confidence_column": confidence_col,
        "identity_column": identity_col,
    }
    data_cfg = _import_data_config(cfg.data, path, name, columns, encoding, max_text_bytes)
    if cfg.task == "image-classification":
        _import_images(
            cfg.model_copy(update={"data": data_cfg}), labels, allow_invalid, project_dir
        )
        return
    _import_table(cfg, data_cfg, path, name, labels, config, set_ or [], allow_invalid, project_dir)


def _import_table(
    cfg: Any,
    data_cfg: Any,
    path: Path,
    name: str,
    labels: str | None,
    config: Path | None,
    overrides: list[str],
    allow_invalid: bool,
    project_dir: Path,
) -> None:
    """``retune data import`` of a CSV/JSONL/Parquet file of texts."""
    from pipeline.data import DataError, dataset_name, prepare_dataset, source_path
    from pipeline.datasets import count_tokens, forced_meta, import_dataset
    from pipeline.versioning import DataVersionError

    try:
        dataset_name(data_cfg)
        prepared = prepare_dataset(data_cfg, project_dir, IMPORT_FLAGS)
        allowed = _import_labels(labels, cfg, config, overrides, name, prepared.frames)
        tokens = count_tokens(prepared.frames, cfg.train.base_model, cfg.train.max_length)
    except (DataError, FileNotFoundError) as err:
        _fail(str(err))
    source = source_path(str(path), project_dir)
    _print_dropped(prepared)
    page = project_dir / "reports" / "import" / name / "validation.html"
    report = _validate_import(prepared.frames, cfg.validation, allowed, tokens, source, page)
    if not report.success and not allow_invalid:
        _refuse_import(source, len(report.errors))
    extra = forced_meta(report) if not report.success else {}
    try:
        version = import_dataset(
            prepared.frames, data_cfg, project_dir, dropped=prepared.dropped, extra=extra
        )
    except (DataError, DataVersionError) as err:
        _fail(str(err))
    _print_imported(source, version, forced=bool(extra))


def _import_images(cfg: Any, labels: str | None, allow_invalid: bool, project_dir: Path) -> None:
    """``retune data import`` of an image folder or manifest: read and describe every
    image, split by --group-col, validate, then copy the images and the tables under
    data/NAME/ and version them (nothing is written when an error-level check fails)."""
    from pipeline import tasks
    from pipeline.data import DataError, source_path
    from pipeline.datasets import forced_meta, import_dataset
    from pipeline.reports import render_validation_page
    from pipeline.versioning import DataVersionError

    kind = tasks.get(cfg.task)
    try:
        prepared = kind.prepare(cfg, project_dir)
    except (DataError, FileNotFoundError) as err:
        _fail(str(err))
    found = sorted({str(x) for f in prepared.frames.values() for x in f["label"]})
    allowed = [x.strip() for x in labels.split(",") if x.strip()] if labels else found
    if len(allowed) < 2:
        _fail(
            f"{cfg.data.source}: one label ({', '.join(allowed)}); a classifier needs two or more"
        )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": allowed})})
    source = source_path(cfg.data.source, project_dir)
    typer.echo(f"read {prepared.rows_read} images")
    report = kind.validate(cfg, prepared.frames, None, project_dir)
    print_validation_table(report.table_rows())
    page = project_dir / "reports" / "import" / cfg.data.name / "validation.html"
    typer.echo(f"validation (labels {', '.join(allowed)}): {report.summary()}")
    typer.echo(f"validation report: {render_validation_page(report, page, str(source))}")
    if not report.success and not allow_invalid:
        _refuse_import(source, len(report.errors))
    extra = forced_meta(report) if not report.success else {}
    try:
        version = import_dataset(
            prepared.frames,
            cfg.data,
            project_dir,
            extra=extra,
            source=prepared.source,
            files=prepared.files,
        )
    except (DataError, DataVersionError) as err:
        _fail(str(err))
    _print_imported(source, version, bool(extra), f"--set task={cfg.task} ")


def _refuse_import(source: Path, errors: int) -> None:
    _fail(
        f"{source} was not imported: {errors} error-level check{'s' * (errors != 1)} failed "
        f"(listed above); nothing was written. Fix the data, change the limits named above, "
        f"or pass --allow-invalid to version it anyway (recorded in data.dvc)"
    )


def _import_data_config(
    data: Any,
    path: Path,
    name: str,
    columns: dict[str, str | None],
    encoding: str,
    max_text_bytes: int | None,
) -> Any:
    """The config's data section for this import: its file, name, columns and encoding."""
    update: dict[str, Any] = {"source": str(path), "name": name, "encoding": encoding, **columns}
    if max_text_bytes is not None:
        update["max_text_bytes"] = max_text_bytes
    return data.model_copy(update=update)


def _validate_import(
    frames: dict[str, Any], config: Any, labels: list[str], tokens: Any, source: Path, page: Path
) -> Any:
    """Run the suite on the prepared splits; print its table and write its page (offline)."""
    from pipeline.reports import render_validation_page
    from pipeline.validation import validate_dataset

    report = validate_dataset(frames, config, labels, tokens=tokens, flags=IMPORT_SETTINGS)
    print_validation_table(report.table_rows())
    typer.echo(f"validation (labels {', '.join(labels)}): {report.summary()}")
    typer.echo(f"validation report: {render_validation_page(report, page, str(source))}")
    return report


def _import_labels(
    given: str | None,
    cfg: Any,
    config: Path | None,
    overrides: list[str],
    name: str,
    frames: dict[str, Any],
) -> list[str]:
    """The labels an import is checked against: --labels, else the config's when the user
    gave them for this data (--config, --set data.labels or a config whose source is this
    dataset; the project's example config does not count), else the labels found."""
    if given is not None:
        return [x.strip() for x in given.split(",") if x.strip()]
    mine = config is not None or any(o.startswith("data.labels=") for o in overrides)
    mine = mine or cfg.data.source == f"dataset:{name}" or cfg.data.name == name
    if mine and "labels" in cfg.data.model_fields_set:
        return list(cfg.data.labels)
    return sorted({str(x) for f in frames.values() for x in f["label"] if isinstance(x, str)})


def _print_dropped(prepared: Any) -> None:
    total = sum(prepared.dropped.values())
    if not total:
        typer.echo(f"read {prepared.rows_read} rows; none dropped")
        return
    typer.echo(f"read {prepared.rows_read} rows; dropped {total}:")
    for line in prepared.dropped_lines():
        typer.echo(f"  - {line}")


def _print_imported(source: Path, version: Any, forced: bool, task: str = "") -> None:
    """What was imported, and the command that trains on it (``task``: its ``--set``)."""
    record = version.dataset
    rows = ", ".join(f"{k} {v}" for k, v in record.rows.items())
    typer.echo(f"imported {source} as dataset '{record.name}' ({rows})")
    typer.echo(f"labels: {', '.join(record.labels)}")
    typer.echo(f"md5: {version.md5}   (data/ as a whole: {version.data_md5}, in data.dvc)")
    if version.pushed:
        typer.echo(f"pushed to the DVC remote {version.remote_url}")
    if forced:
        typer.echo(
            "warning: versioned despite failed error-level checks (--allow-invalid); "
            "data.dvc records them under allow_invalid/failed_checks",
            err=True,
        )
        return
    typer.echo(
        f"train on it: retune run {task}--set data.source=dataset:{record.name} "
        f'--set "data.labels=[{", ".join(record.labels)}]"; commit data.dvc to keep it'
    )


@data_app.command("list")
def data_list(project_dir: ProjectDir = Path(".")) -> None:
    """The datasets recorded in data.dvc, their md5s and whether data/ still matches."""
    from rich.table import Table

    from pipeline.datasets import list_datasets

    project_dir = project_dir.resolve()
    set_runtime_defaults(project_dir)
    statuses = list_datasets(project_dir)
    if not statuses:
        typer.echo("no datasets recorded in data.dvc yet: run `retune run` or `retune data import`")
        return
    table = Table("dataset", "md5", "rows (train/validation/test)", "labels", "in data/", "source")
    for s in statuses:
        r = s.record
        rows = "/".join(str(r.rows.get(k, "?")) for k in ("train", "validation", "test"))
        table.add_row(r.name, r.md5, rows, ", ".join(r.labels), s.state, r.source)
    _console().print(table)


@data_app.command("history")
def data_history(project_dir: ProjectDir = Path(".")) -> None:
    """Earlier versions of data.dvc in git, newest first, with their md5s."""
    from rich.table import Table

    from pipeline.versioning import DataVersionError, history

    project_dir = project_dir.resolve()
    try:
        entries = history(project_dir)
    except DataVersionError as err:
        _fail(str(err))
    table = Table("commit", "date", "data/ md5", "datasets", "subject")
    for e in entries:
        datasets = "\n".join(f"{n}: {m}" for n, m in e.datasets.items()) or "-"
        table.add_row(e.commit[:12], e.date, e.data_md5 or "-", datasets, e.subject)
    _console().print(table)


@app.command()
def lineage(
    ref: Annotated[
        str | None, typer.Argument(help="NAME@alias or NAME/VERSION of a registered model.")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="List the versions trained on this data md5.")
    ] = None,
    flag: Annotated[
        str | None, typer.Option(help="With --data: tag those versions retune.flagged=REASON.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Trace a model version to its data, code, config and reports.

    With --data MD5: list the versions trained on that data version (and --flag them).
    """
    import json
    from dataclasses import asdict

    project_dir = project_dir.resolve()
    set_runtime_defaults(project_dir)
    from pipeline import lineage as lin
    from pipeline import tracking
    from pipeline.registry import ModelRefError

    tracking.configure(project_dir, os.environ.get("MLFLOW_TRACKING_URI"))
    if (ref is None) == (data is None):
        _fail("give either a model (NAME@alias or NAME/VERSION) or --data MD5")
    if flag is not None and data is None:
        _fail("--flag goes with --data MD5")
    if data is not None:
        try:
            versions = (
                lin.flag_versions(data, flag) if flag is not None else lin.versions_trained_on(data)
            )
        except ValueError as err:
            _fail(str(err))
        if as_json:
            typer.echo(json.dumps([asdict(v) for v in versions], indent=2))
            return
        if not versions:
            typer.echo(f"no registered version was trained on {data}")
        for v in versions:
            note = f"  flagged: {v.tags[tag.FLAGGED]}" if tag.FLAGGED in v.tags else ""
            aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
            typer.echo(f"{v.name}/{v.version}{aliases}  run {v.run_id}{note}")
        return
    try:
        trace = lin.trace(ref)  # type: ignore[arg-type]
    except ModelRefError as err:
        _fail(str(err))
    if as_json:
        typer.echo(json.dumps(asdict(trace), indent=2, default=str))
        return
    _print_lineage(trace)


def _print_lineage(trace: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{trace.model}/{trace.version}", show_header=False, title_justify="left")
    aliases = ", ".join(trace.aliases) or "-"
    rows = [
        ("aliases", aliases),
        ("flagged", trace.flagged or "-"),
        ("run", f"{trace.run_id} ({trace.run_status})"),
        ("dataset", f"{trace.dataset}  md5 {trace.data_md5}"),
        ("data/ version", f"{trace.data_dvc_md5}  (DVC remote {trace.dvc_remote})"),
        (
            "code",
            f"git {trace.git_commit}"
            + (f"  (dirty tree: {trace.git_dirty_files})" if trace.git_dirty == "true" else ""),
        ),
        ("config", f"hash {trace.config_hash}"),
        ("base model", f"{trace.base_model}  sha256 {trace.base_model_sha256[:16]}..."),
        ("validation", trace.validation),
    ]
    rows += [(f"report {name}", uri) for name, uri in trace.reports.items()]
    rows += [
        (k, f"{trace.metrics[k]:.4f}")
        for k in ("test_accuracy", "test_macro_f1", "forgetting_mean_drop", "forgetting_worst_drop")
        if k in trace.metrics
    ]
    for key, value in rows:
        table.add_row(key, value)
    _console().print(table)


@app.command()
def reproduce(
    ref: Annotated[str, typer.Argument(help="NAME/VERSION (or NAME@alias) to reproduce.")],
    project_dir: ProjectDir = Path("."),
) -> None:
    """Retrain a version from its exact data and config; check the metrics match.

    The data comes back from the DVC cache or remote even after data/ has moved on.
    """
    project_dir = project_dir.resolve()
    set_runtime_defaults(project_dir)
    from flows.reproduce import reproduce as reproduce_flow
    from pipeline.registry import ModelRefError
    from pipeline.versioning import DataVersionError

    try:
        with quiet_expected_errors((ModelRefError, DataVersionError)):
            result = reproduce_flow(ref, str(project_dir), os.environ.get("MLFLOW_TRACKING_URI"))
    except (ModelRefError, DataVersionError) as err:
        _fail(str(err))
    typer.echo(
        f"{result.model}/{result.version}: dataset {result.dataset}, data/ {result.data_dvc_md5}"
    )
    if result.code_commit_then != result.code_commit_now:
        then, now = result.code_commit_then, result.code_commit_now
        typer.echo(f"note: trained at commit {then}, reproducing at {now}")
    for key in result.reproduced:
        recorded, reproduced = result.recorded.get(key), result.reproduced.get(key)
        verdict = "same" if recorded == reproduced else "DIFFERENT"
        typer.echo(f"  {key:24s} recorded {recorded!r:22s} reproduced {reproduced!r:22s} {verdict}")
    if not result.matches:
        _fail("the reproduced metrics differ from the recorded ones")
    typer.echo("reproduced exactly")


@app.command()
def predict(
    ref: Annotated[str, typer.Argument(help="NAME@alias or NAME/VERSION of a registered model.")],
    path: Annotated[
        Path,
        typer.Argument(
            help="CSV or JSONL file with a text column (a chat model also reads a JSONL "
            "messages column; an image classifier reads an image folder or a CSV manifest "
            "with a path column)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            help="CSV or JSONL to write (default: FILE.predictions.<suffix> beside FILE; "
            "for an image folder, FOLDER.predictions.csv beside it)."
        ),
    ] = None,
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    path_column: Annotated[
        str, typer.Option(help="Manifest column holding the image paths.")
    ] = "path",
    batch_size: Annotated[int, typer.Option(min=1, help="Texts or images per forward pass.")] = 64,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Label every row of FILE with a registered model: its rows plus label and prob_* columns
    (a chat or translation model: plus its answer; an image classifier: every image of a
    folder, or of a manifest's path column)."""
    project_dir = project_dir.resolve()
    set_runtime_defaults(project_dir)
    from pipeline import chat_serving, image_serving, registry, tracking
    from pipeline.config import GENERATIVE_TASKS, IMAGE_CLASSIFICATION
    from pipeline.serving import ServingInputError, predict_file

    tracking.configure(project_dir, os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        version = registry.resolve_version(ref)
        uri = f"models:/{version.name}/{version.version}"
        task = _task(version)
        if task == IMAGE_CLASSIFICATION:
            out = out or _predictions_file(path, ".csv")
            rows = image_serving.predict_images(uri, path, out, path_column, batch_size)
            done = "labelled"
        elif task in GENERATIVE_TASKS:
            out = out or _predictions_file(path, path.suffix)
            rows = chat_serving.answer_file(uri, path, out, text_column, batch_size)
            done = "answered"
        else:
            out = out or _predictions_file(path, path.suffix)
            rows = predict_file(uri, path, out, text_column, batch_size)
            done = "labelled"
    except (registry.ModelRefError, ServingInputError) as err:
        _fail(str(err))
    typer.echo(f"{version.name}/{version.version}: {done} {rows} rows of {path} -> {out}")


def _predictions_file(path: Path, suffix: str) -> Path:
    """FILE.predictions.<suffix> beside FILE (a folder: FOLDER.predictions.<suffix>)."""
    if path.is_dir():
        folder = path.resolve()  # "." has no name
        return folder.parent / f"{folder.name}.predictions{suffix}"
    return path.with_name(f"{path.stem}.predictions{suffix}")


def _task(version: Any) -> str | None:
    """The task of a registered version (its identity), None when it has none recorded."""
    from pipeline import registry

    found = registry.version_identity(version)
    return found.task if found is not None else None


def _generative(version: Any) -> bool:
    """Whether a registered version answers conversations (a chat or translation model)."""
    from pipeline.config import GENERATIVE_TASKS

    return _task(version) in GENERATIVE_TASKS


@app.command()
def generate(
    ref: Annotated[str, typer.Argument(help="NAME@alias or NAME/VERSION of a chat model.")],
    prompt: Annotated[str, typer.Argument(help="What to ask (a translator: the text).")],
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="New tokens at most (default: as logged).")
    ] = None,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Print a registered chat or translation model's greedy answer to PROMPT."""
    project_dir = project_dir.resolve()
    set_runtime_defaults(project_dir)
    import json

    import pandas as pd

    from pipeline import modelstore, registry, tracking
    from pipeline.serving import ServingInputError

    tracking.configure(project_dir, os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        version = registry.resolve_version(ref)
        if not _generative(version):
            raise ServingInputError(
                f"{version.name}/{version.version} is not a chat or translation model; "
                "label texts with `retune predict`"
            )
        loaded = modelstore.load_version(version.name, version.version)
        turns = loaded.predictor.wrap(prompt)
        params = {"max_new_tokens": max_new_tokens} if max_new_tokens else None
        asked = pd.DataFrame({"messages": [json.dumps(turns)]})
        answer = loaded.predict(asked, params)["answer"][0]
    except (registry.ModelRefError, ServingInputError) as err:
        _fail(str(err))
    typer.echo(answer)


def _registry(project_dir: Path) -> None:
    """Point MLflow at the project's store (or MLFLOW_TRACKING_URI)."""
    set_runtime_defaults(project_dir)
    from pipeline import tracking

    tracking.configure(project_dir, os.environ.get("MLFLOW_TRACKING_URI"))


@app.command()
def models(
    name: Annotated[
        str | None,
        typer.Argument(help="Registered model name (default: the config's, retune-<dataset>)."),
    ] = None,
    config: ConfigFile = None,
    set_: Overrides = None,
    project_dir: ProjectDir = Path("."),
) -> None:
    """List a model's versions: aliases, metrics, gate verdicts, data md5, creation time.

    Also marks MLflow runs left RUNNING by a killed retune run on this machine as FAILED.
    """
    from datetime import UTC, datetime

    from rich.table import Table

    project_dir = project_dir.resolve()
    cfg = _load(project_dir, config, set_ or [])
    _registry(project_dir)
    from pipeline import registry, tracking

    for orphan in tracking.mark_orphans(cfg.registry.experiment):
        typer.echo(f"MLflow run {orphan.run_id}: its process {orphan.pid} is gone; marked FAILED")
    if name is None:
        try:
            name = registry.model_name(cfg)
        except ValueError as err:  # DataError: the dataset name is not a valid slug
            _fail(str(err))

    versions = registry.list_versions(name)
    if not versions:
        _fail(f"no registered model named {name!r}")
    table = Table(
        "version",
        "aliases",
        "test acc",
        "test macro-F1",
        "validation",
        "forgetting",
        "bias",
        "policy",
        "data md5",
        "created (UTC)",
        title=name,
        title_justify="left",
    )
    for v in versions:
        metrics = tracking.get_run(v.run_id).metrics if v.run_id else {}
        created = datetime.fromtimestamp(v.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")

        table.add_row(
            v.version,
            ", ".join(v.aliases) or "-",
            f"{metrics['test_accuracy']:.4f}" if "test_accuracy" in metrics else "-",
            f"{metrics['test_macro_f1']:.4f}" if "test_macro_f1" in metrics else "-",
            v.tags.get(tag.VALIDATION, "-"),
            _first_word(v.tags.get(tag.FORGETTING_GATE, "-")),
            _first_word(v.tags.get(tag.BIAS_GATE, "-")),
            _first_word(v.tags.get(tag.POLICY, "-")),
            v.tags.get(tag.DATA_MD5, "-"),
            created,
        )
    _console().print(table)


def _first_word(verdict: str) -> str:
    """'refused: mean drop ...' -> 'refused'."""
    return verdict.split(":")[0]


Reason = Annotated[str, typer.Option(help="Why (recorded in the audit trail).")]


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="The version to make champion.")],
    reason: Reason,
    force: Annotated[
        bool, typer.Option(help="Promote even if the policy refuses (recorded as forced).")
    ] = False,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Make VERSION the champion: the policy runs again and must agree, unless --force."""
    project_dir = project_dir.resolve()
    _registry(project_dir)
    from flows.promote import IncompatibleModel, PromotionRefused
    from flows.promote import promote as promote_version
    from pipeline import registry

    try:
        verdict, entry = promote_version(name, version, reason, force, project_dir)
    except PromotionRefused as refused:
        for c in refused.verdict.criteria:
            typer.echo(f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}", err=True)
        _refuse(f"{name}/{version}: {refused} (use --force with a --reason to override)")
    except IncompatibleModel as refused:  # another kind of model: not even --force
        _refuse(str(refused))
    except (registry.ModelRefError, registry.PromotionError, ValueError) as err:
        _fail(str(err))
    for c in verdict.criteria:
        typer.echo(f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    forced = "" if verdict.promote else " (forced)"
    typer.echo(
        f"{name}: champion v{entry.from_version or '-'} -> v{entry.to_version}{forced}; "
        f"audit entry {entry.sequence}"
    )


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    reason: Reason,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Move champion back to the version that held it before the current one."""
    project_dir = project_dir.resolve()
    _registry(project_dir)
    from flows.promote import rollback as rollback_champion
    from pipeline import registry

    try:
        entry = rollback_champion(name, reason, project_dir)
    except (registry.ModelRefError, registry.PromotionError, ValueError) as err:
        _fail(str(err))
    typer.echo(
        f"{name}: champion v{entry.from_version} -> v{entry.to_version} (rollback); "
        f"audit entry {entry.sequence}"
    )


@app.command()
def audit(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    project_dir: ProjectDir = Path("."),
) -> None:
    """The full, append-only history of a model's alias changes."""
    import json
    from dataclasses import asdict
    from datetime import UTC, datetime

    from rich.table import Table

    project_dir = project_dir.resolve()
    _registry(project_dir)
    from pipeline import registry

    entries = registry.read_audit(name)
    if as_json:
        typer.echo(json.dumps([asdict(e) for e in entries], indent=2))
        return
    table = Table(
        "#",
        "when (UTC)",
        "alias",
        "action",
        "from",
        "to",
        "by",
        "why",
        "verdict",
        "status",
        title=f"{name}: alias history",
        title_justify="left",
    )
    for e in entries:
        when = datetime.fromtimestamp(e.time_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            str(int(e.sequence)),
            when,
            e.alias,
            e.action,
            e.from_version or "-",
            e.to_version,
            e.actor,
            e.reason,
            e.verdict,
            e.status,
        )
    _console().print(table)
    for problem in registry.audit_problems(entries):
        typer.echo(f"warning: {problem}", err=True)


@app.command()
def card(
    ref: Annotated[str, typer.Argument(help="NAME@alias or NAME/VERSION.")],
    html: Annotated[bool, typer.Option("--html", help="Print the HTML rendering.")] = False,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Print the model card of a registered version (Markdown, or HTML with --html)."""
    project_dir = project_dir.resolve()
    _registry(project_dir)
    from pipeline import registry, tracking

    try:
        version = registry.resolve_version(ref)
    except registry.ModelRefError as err:
        _fail(str(err))
    name = "model_card.html" if html else "model_card.md"
    try:
        text = tracking.read_text(version.run_id or "", f"card/{name}")
    except Exception as err:  # the run predates model cards, or the artifact is gone
        _fail(f"{ref}: its run {version.run_id} holds no card/{name} ({err})")
    typer.echo(text)


Cron = Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 3 * * 1".')]
Interval = Annotated[int | None, typer.Option(help="Run every N seconds.")]
RRule = Annotated[str | None, typer.Option(help='iCal RRule, e.g. "FREQ=WEEKLY;BYDAY=MO".')]
ConfigOption = Annotated[Path | None, typer.Option(help="Config file, relative to the project.")]
RetrainAlways = Annotated[
    bool, typer.Option(help="Retrain even when the data has not changed since the champion.")
]


def _schedule(cron: str | None, interval: int | None, rrule: str | None) -> dict[str, Any]:
    given = {k: v for k, v in (("cron", cron), ("interval", interval), ("rrule", rrule)) if v}
    if len(given) != 1:
        _fail("give exactly one schedule: --cron, --interval or --rrule")
    return given


def _deployment_parameters(
    project_dir: Path, config: Path | None, retrain_always: bool
) -> tuple[dict[str, Any], Any]:
    """The deployment's flow parameters, and the config they name (loaded, so checked)."""
    config = config or Path(DEFAULT_CONFIG)
    loaded = _load(
        project_dir, project_dir / config if (project_dir / config).is_file() else None, []
    )
    parameters = {
        "config_path": str(config),
        "project_dir": str(project_dir),
        "retrain_always": retrain_always,
    }
    return parameters, loaded


@app.command()
def deploy(
    cron: Cron = None,
    interval: Interval = None,
    rrule: RRule = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "retune-scheduled",
    config: Annotated[
        Path | None, typer.Option(help="Config file, relative to the project.")
    ] = None,
    pool: Annotated[
        str, typer.Option(help="Prefect work pool (a process pool).")
    ] = "retune-process",
    retrain_always: RetrainAlways = False,
    project_dir: ProjectDir = Path("."),
    worker_project_dir: Annotated[
        str | None,
        typer.Option(help="The project root as the worker sees it (default: --project-dir)."),
    ] = None,
    worker_code_dir: Annotated[
        str | None,
        typer.Option(
            help="Where retune's code (flows/, pipeline/) lies on the worker "
            "(default: this installation's)."
        ),
    ] = None,
) -> None:
    """Create a Prefect deployment of scheduled retraining on a work pool (needs a server).

    Start a worker for the pool: prefect worker start --pool retune-process --type process.
    For a Kubernetes pool (infra/k8s/base-job-template.json) pass the paths inside the
    image, e.g. --worker-project-dir /project --worker-code-dir /opt/retune; each run's job then
    asks for train.nproc_per_node GPUs (the template's ``gpus`` variable).
    """
    project_dir = project_dir.resolve()
    schedule = _schedule(cron, interval, rrule)
    parameters, loaded = _deployment_parameters(project_dir, config, retrain_always)
    if worker_project_dir:
        parameters["project_dir"] = worker_project_dir
    if not os.environ.get("PREFECT_API_URL"):
        _fail("retune deploy needs a Prefect server: set PREFECT_API_URL (or use retune serve)")
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.scheduled import scheduled_retrain

    with get_client(sync_client=True) as client:
        try:
            pool_type = client.read_work_pool(pool).type
        except ObjectNotFound:
            _fail(
                f"work pool {pool!r} not found on {os.environ['PREFECT_API_URL']}; "
                f"create it: prefect work-pool create {pool} --type process"
            )
    job_variables: dict[str, Any] = {}
    if pool_type == "kubernetes":
        job_variables["gpus"] = loaded.train.nproc_per_node
    code_root = Path(__file__).resolve().parents[1]  # where flows/ is installed
    flow = scheduled_retrain.from_source(
        source=str(code_root), entrypoint="flows/scheduled.py:scheduled_retrain"
    )
    deployment_id = flow.deploy(
        name=name,
        work_pool_name=pool,
        parameters=parameters,
        job_variables=job_variables,
        concurrency_limit=1,  # runs of this deployment never overlap
        print_next_steps=False,
        build=False,
        push=False,
        **schedule,
    )
    if worker_code_dir:
        _set_working_directory(deployment_id, worker_code_dir)
    from flows.locks import ensure_promotion_limit
    from pipeline.registry import model_name

    limit = ensure_promotion_limit(model_name(loaded))
    typer.echo(f"deployment scheduled-retrain/{name} ({deployment_id}) on pool {pool}: {schedule}")
    if job_variables:
        typer.echo(f"job variables: {job_variables}")
    typer.echo(f"promotions of the model are serialised by the concurrency limit {limit}")


@app.command()
def join(
    shared: Annotated[
        Path | None,
        typer.Option(help="The folder every node mounts (default: RETUNE_SHARED_DIR)."),
    ] = None,
    once: Annotated[bool, typer.Option(help="Exit after one job.")] = False,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds without a job.")
    ] = None,
) -> None:
    """Be one of the other nodes of multi-node training (train.nnodes > 1).

    Waits for the node running the flow to announce a job in the shared folder, then
    trains it with torchrun, meeting at the endpoint the announcement names; repeats.
    """
    from pipeline.worker import join as join_jobs

    folder = shared or (
        Path(os.environ["RETUNE_SHARED_DIR"]) if os.environ.get("RETUNE_SHARED_DIR") else None
    )
    if folder is None:
        _fail("retune join needs --shared or RETUNE_SHARED_DIR")
    folder.mkdir(parents=True, exist_ok=True)  # node 0 may not have written to it yet
    raise typer.Exit(code=join_jobs(folder, once=once, timeout=timeout))


def _set_working_directory(deployment_id: Any, directory: str) -> None:
    """Point the deployment's pull step at ``directory``: where the worker finds the code."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    steps = [{"prefect.deployments.steps.set_working_directory": {"directory": directory}}]
    with get_client(sync_client=True) as client:
        client.update_deployment(deployment_id, DeploymentUpdate(pull_steps=steps))


@app.command()
def examples() -> None:
    """Install the example data that no pip package ships: Fashion-MNIST (Debian's
    dataset-fashion-mnist, MIT) for examples/images.yaml, where it is missing."""
    import os
    import shutil
    import subprocess

    from pipeline.images import FASHION_MNIST_DIR, FASHION_MNIST_PACKAGE

    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        _console().print(f"Fashion-MNIST: installed ({FASHION_MNIST_DIR})")
        return
    if shutil.which("apt-get") is None:
        _fail(
            f"Fashion-MNIST is missing and there is no apt-get here: install the Debian "
            f"package {FASHION_MNIST_PACKAGE}, or put its four .gz files in {FASHION_MNIST_DIR}"
        )
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q"]):
        args = [*sudo, *command] + ([FASHION_MNIST_PACKAGE] if "install" in command else [])
        if subprocess.run(args).returncode != 0:
            _fail(f"`{' '.join(args)}` failed; install {FASHION_MNIST_PACKAGE} by hand")
    _console().print(f"Fashion-MNIST: installed ({FASHION_MNIST_DIR})")


@app.command()
def serve(
    cron: Cron = None,
    interval: Interval = None,
    rrule: RRule = None,
    name: Annotated[str, typer.Option(help="Deployment name.")] = "retune-scheduled",
    config: Annotated[
        Path | None, typer.Option(help="Config file, relative to the project.")
    ] = None,
    retrain_always: RetrainAlways = False,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Serve scheduled retraining from this machine (no work pool needed); Ctrl-C stops."""
    project_dir = project_dir.resolve()
    schedule = _schedule(cron, interval, rrule)
    parameters, _ = _deployment_parameters(project_dir, config, retrain_always)
    from flows.scheduled import scheduled_retrain

    scheduled_retrain.serve(name=name, parameters=parameters, global_limit=1, **schedule)


def _console() -> Any:
    """A rich console; when piped or captured, wide enough that md5s never wrap."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _debug_traceback() -> None:
    if DEBUG["on"] and sys.exc_info()[0] is not None:
        traceback.print_exc()


def _fail(message: str) -> None:
    """Bad input: one ``error:`` line (and, with --debug, the traceback), exit 1."""
    _debug_traceback()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


def _refuse(message: str) -> None:
    """A refusal (the policy, a gate): one ``refused:`` line, exit 3; nothing moved."""
    _debug_traceback()
    typer.echo(f"refused: {message}", err=True)
    raise typer.Exit(code=REFUSED_EXIT)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
