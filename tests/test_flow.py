"""The real retraining flow through Prefect, GX, DVC and MLflow, on a tiny base model.

Bad input must stop the flow before training, name the file and the problem, and
leave data.dvc, data/ and the registry untouched.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_retune

from mlflow import MlflowClient
from pipeline import tracking
from pipeline.versioning import recorded_datasets

pytestmark = pytest.mark.integration


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def reviews(n_groups: int = 40, labels: tuple[str, str] = ("pos", "neg")) -> list[dict[str, str]]:
    words = {labels[0]: "a fine and lovely film", labels[1]: "a dull and tiresome film"}
    return [
        {"review": f"{words[label]} number {g} take {k}", "sentiment": label, "film": f"film-{g}"}
        for g in range(n_groups)
        for k, label in enumerate(labels)
    ]


def run_cli(api_url: str, project: Path, *overrides: str):
    args = ["run", "--project-dir", str(project)]
    for item in overrides:
        args += ["--set", item]
    return run_retune(project, api_url, *args)


USER_DATA = (
    "data.source=reviews.csv",
    "data.text_column=review",
    "data.label_column=sentiment",
    "data.group_column=film",
    "data.labels=[pos, neg]",
    "validation.min_text_chars=1",
    # A tiny random encoder rarely beats the frozen probe; these tests are about the flow.
    "promotion.beat_probe=false",
)


def tiny_full(tiny_base_model: Path) -> tuple[str, ...]:
    """Overrides: full fine-tuning of the tiny model for one epoch, forgetting gate warns."""
    return (
        f"train.base_model={tiny_base_model}",
        "train.strategy=full",
        "train.epochs=1",
        "train.bf16=false",
        "forgetting.gate=warn",
    )


def write_tiny_config(project: Path, tiny_base_model: Path) -> None:
    """retune.yaml for the reviews CSV on the tiny model, head-only, one epoch."""
    import yaml

    config: dict = {}
    for item in (
        *USER_DATA,
        f"train.base_model={tiny_base_model}",
        "train.epochs=1",
        "train.bf16=false",
        "train.strategy=head",
    ):
        key, value = item.split("=", 1)
        section, name = key.split(".")
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    (project / "retune.yaml").write_text(yaml.safe_dump(config))


def assert_untouched(project: Path, dvc_before: bytes) -> None:
    assert (project / "data.dvc").read_bytes() == dvc_before
    assert not (project / "data").exists()
    assert not (project / "mlflow" / "mlflow.db").exists()  # the registry was never opened


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.csv", None, r"data file .*missing\.csv does not exist"),
        ("empty.csv", "", r"data file .*empty\.csv is empty"),
        (
            "no_text.csv",
            "sentiment,film\npos,a\n",
            r"column 'review' missing in .*no_text\.csv; found: sentiment, film",
        ),
    ],
)
def test_bad_input_stops_before_training(prefect_harness, project, name, content, expected):
    if content is not None:
        (project / name).write_text(content, encoding="utf-8")
    before = (project / "data.dvc").read_bytes()
    overrides = [o for o in USER_DATA if not o.startswith("data.source")] + [f"data.source={name}"]
    result = run_cli(prefect_harness, project, *overrides)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert re.search(expected, errors[0]), errors[0]
    # Bad input is a message, not a bug: no traceback, and the message is printed once.
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert sum(1 for line in output.splitlines() if re.search(expected, line)) == 1, output
    assert_untouched(project, before)


def test_debug_shows_the_traceback_of_bad_input(prefect_harness, project):
    result = run_retune(
        project, prefect_harness, "--debug", "run", "--set", "data.source=missing.csv"
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "pipeline.data.DataError: data file" in result.stderr


def test_labels_outside_the_set_fail_validation_with_counts(prefect_harness, project):
    rows = reviews()
    for row in rows[:3]:
        row["sentiment"] = "meh"
    write_csv(project / "reviews.csv", rows)
    before = (project / "data.dvc").read_bytes()
    result = run_cli(prefect_harness, project, *USER_DATA)
    assert result.returncode == 1
    # Bad input, not a bug: the message once, on one error: line, with no traceback.
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("error: ") == 1
    message = result.stderr[result.stderr.index("error: ") :]
    assert "reviews.csv failed validation" in message
    assert "label_set (expect_column_values_to_be_in_set on 'label') failed on" in message
    # The 3 bad rows are spread over splits; the failures add up to 3.
    counts = [
        int(part.split(" of ")[0].rsplit(" ", 1)[1]) for part in message.split("failed on")[1:]
    ]
    assert sum(counts) == 3
    assert_untouched(project, before)
    # retune's own validation page is written even though the run stops: offline-readable.
    (page,) = project.glob("runs/*/html/validation.html")
    html = page.read_text(encoding="utf-8")
    assert "Verdict: failed" in html and "label_set" in html and "meh" in html


def test_rows_dropped_from_a_source_path_are_logged_with_their_reason(prefect_harness, project):
    from pipeline.data import split_by_group

    rows = reviews()
    films = pd.DataFrame({"group": [f"copy-{i}" for i in range(200)]})
    outside = split_by_group(films, 0.15, 0.15).query("split != 'train'")["group"].head(2)
    train = split_by_group(pd.DataFrame({"group": [r["film"] for r in rows]}), 0.15, 0.15)
    quoted = rows[int(train.index[train["split"] == "train"][0])]
    rows += [quoted | {"film": film, "review": quoted["review"].upper()} for film in outside]
    write_csv(project / "reviews.csv", rows)
    # A limit nothing meets stops the flow right after validation: no training needed.
    result = run_cli(prefect_harness, project, *USER_DATA, "validation.min_rows_per_label=1000")
    assert result.returncode == 1
    logged = result.stdout + result.stderr
    assert "dropped 2 rows: cross-split near-duplicate (its text" in logged, logged[-3000:]


def test_user_csv_runs_the_whole_flow_and_registers(prefect_harness, project, tiny_base_model):
    write_csv(project / "reviews.csv", reviews())
    result = run_cli(
        prefect_harness,
        project,
        *USER_DATA,
        *tiny_full(tiny_base_model),
        "forgetting.distill=0.5",
        "forgetting.l2sp=0.01",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "forgetting (retention suite)" in result.stdout
    # A low LR and both regularisers keep the tiny encoder close to its base.
    assert "forgetting gate: passed" in result.stdout
    md5 = recorded_datasets(project / "data.dvc")["reviews"].md5
    assert md5 in result.stdout
    assert sorted(p.name for p in (project / "data" / "reviews").iterdir()) == [
        "test.csv",
        "train.csv",
        "validation.csv",
    ]

    tracking.configure(project)
    client = MlflowClient()
    model = client.get_registered_model("retune-reviews")
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1"}
    version = client.get_model_version("retune-reviews", "1")
    assert version.tags["retune.data_md5"] == md5
    run = client.get_run(version.run_id)
    # The UIs name the run by its data and strategy, and the run ends with direct links.
    assert re.fullmatch(r"reviews-full-[0-9a-f]{8}", run.info.run_name)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    ui = "http://127.0.0.1:5000/#"
    run_link = f"{ui}/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert f"run: {run_link}" in result.stdout
    assert f"model version: {ui}/models/retune-reviews/versions/1" in result.stdout
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect_client:
        flow_run = prefect_client.read_flow_run(run.data.tags["retune.prefect_flow_run_id"])
    assert flow_run.name == "retrain reviews full"
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests == {"train": md5, "test": md5}
    assert 0.0 <= run.data.metrics["test_macro_f1"] <= 1.0
    assert run.data.params["data.source"] == "reviews.csv"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {
        "reports/validation.json",
        "reports/data_bias.json",
        "reports/forgetting.json",
        "reports/bias.json",
        "reports/bias.html",
        "reports/validation.html",
        "reports/forgetting.html",
    } <= artifacts
    bias_report = tracking.read_report(run.info.run_id, "reports/bias.json")
    assert bias_report["model"] == "candidate"
    assert bias_report["base_probe"]["model"] == "base probe"
    assert version.tags["retune.bias_gate"].startswith(bias_report["gate"]["status"])
    assert "model bias (test split)" in result.stdout
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
        "plots/forgetting.png",
        "plots/learning_curve.png",
    ]
    suite = recorded_datasets(project / "data.dvc")["retention-suite"]
    assert run.data.tags["retune.retention_suite_md5"] == suite.md5
    assert run.data.tags["retune.verdict"] == "accepted"
    assert run.data.tags["retune.forgetting_gate"] == "passed"
    assert {"lee", "men", "wordsim353", "simlex999", "brown"} <= set(suite.rows)
    report = tracking.read_report(run.info.run_id, "reports/forgetting.json")
    assert [t["task"] for t in report["base"]["tasks"]] == [
        "lee",
        "men",
        "wordsim353",
        "simlex999",
        "brown",
    ]
    assert report["mitigation"] == {"l2sp": 0.01, "distill": 0.5}
    # distillation's teacher embeddings of the base, kept for the next run
    assert len(list((project / ".retune" / "cache" / "distill").glob("*.npy"))) == 1
    assert len(report["cka"]) == 3  # embeddings + 2 layers of the tiny model
    assert run.data.metrics["forgetting_mean_drop"] == pytest.approx(report["base"]["mean_drop"])
    assert any(a.path == "data_docs" for a in client.list_artifacts(run.info.run_id))
    val_losses = client.get_metric_history(run.info.run_id, "val_loss")
    assert len(val_losses) == 1  # one epoch, logged through the injected MetricLogger

    # Batch prediction with the registered champion, through the CLI.
    (project / "to_label.csv").write_text("id,text\n1,a fine and lovely film\n2,a dull film\n")
    predicted = run_retune(
        project,
        prefect_harness,
        "predict",
        "retune-reviews@champion",
        "to_label.csv",
        "--project-dir",
        str(project),
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert "labelled 2 rows" in predicted.stdout
    out = pd.read_csv(project / "to_label.predictions.csv")
    assert list(out.columns) == ["id", "text", "label", "prob_pos", "prob_neg"]
    assert set(out["label"]) <= {"pos", "neg"}
    assert ((out["prob_pos"] + out["prob_neg"]) - 1).abs().max() < 1e-5


@pytest.mark.slow  # 65 s here; make test-slow (CI runs both tiers)
def test_forgetting_gate_refuses_records_and_registers_nothing(
    prefect_harness, project, tiny_base_model
):
    write_csv(project / "reviews.csv", reviews())
    tiny = (*USER_DATA, f"train.base_model={tiny_base_model}", "train.epochs=1", "train.bf16=false")
    first = run_cli(prefect_harness, project, *tiny, "train.strategy=head")
    # head: the encoder is untouched, so nothing is forgotten and the gate passes.
    assert first.returncode == 0, first.stdout + first.stderr
    assert "forgetting gate: passed" in first.stdout

    second = run_cli(
        prefect_harness,
        project,
        *tiny,
        "train.strategy=full",
        "train.learning_rate=0.01",
        "forgetting.max_mean_drop=0",
        "forgetting.max_task_drop=0",
    )
    assert second.returncode == 3, second.stdout + second.stderr
    assert "refused: model refused (recorded as MLflow run" in second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    assert "forgetting: mean drop" in second.stderr
    assert "upper bound above 0.000" in second.stderr
    assert "vs champion" in second.stdout  # the table compares with version 1 too

    tracking.configure(project)
    client = MlflowClient()
    versions = client.search_model_versions("name = 'retune-reviews'")
    assert [str(v.version) for v in versions] == ["1"]  # nothing registered
    assert str(client.get_model_version_by_alias("retune-reviews", "champion").version) == "1"
    runs = client.search_runs(
        [client.get_experiment_by_name("retune").experiment_id],
        order_by=["attributes.start_time DESC"],
    )
    refused = runs[0]
    assert refused.info.status == "FINISHED"
    assert refused.data.tags["retune.verdict"] == "refused"
    assert refused.data.tags["retune.forgetting_gate"].startswith("refused: mean drop")
    report = tracking.read_report(refused.info.run_id, "reports/forgetting.json")
    assert report["gate"]["refused"] is True
    assert report["champion_version"] == "1"
    assert report["champion"]["reference"] == "champion v1"
    first_report = tracking.read_report(runs[1].info.run_id, "reports/forgetting.json")
    assert first_report["base"]["mean_drop"] == 0.0  # head-only: the encoder is the base


@pytest.mark.slow  # 45 s: two torchrun nodes; make test-slow
def test_two_node_training_through_the_flow(
    prefect_harness, project, tiny_base_model, tmp_path, monkeypatch
):
    """train.nnodes=2: the flow is node 0, a `retune join` process the other node; the
    model rank 0 wrote to the shared folder is the one evaluated and registered."""
    import socket

    from pipeline.worker import read_announcement

    shared = tmp_path / "shared"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RETUNE_SHARED_DIR", str(shared))
    monkeypatch.setenv("RETUNE_RDZV_ENDPOINT", f"127.0.0.1:{port}")
    write_csv(project / "reviews.csv", reviews())
    joiner = subprocess.Popen(
        [str(Path(sys.executable).parent / "retune"), "join", "--once", "--timeout", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        result = run_cli(
            prefect_harness,
            project,
            *USER_DATA,
            *tiny_full(tiny_base_model),
            "train.nnodes=2",
            "forgetting.distill=0.5",
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert joiner.wait(timeout=120) == 0
    finally:
        joiner.kill()
    assert "joining job retune-" in joiner.stderr.read()
    job = read_announcement(shared)
    assert job["state"] == "finished" and job["nnodes"] == 2
    tracking.configure(project)
    version = MlflowClient().get_model_version("retune-reviews", "1")
    assert job["id"] == f"retune-{version.run_id}"  # the run's own folder: a retry resumes
    assert (shared / job["id"] / "model" / "result.json").is_file()
