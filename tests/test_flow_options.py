"""Options of the real retraining flow, end to end through the CLI on the tiny base model:
a bias gate that refuses, a lexicon folder of the project's own, WiSE-FT, and the overhead
measurement of bench/overhead.py on the WiSE-FT run."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import REPO_ROOT, make_project
from test_flow import USER_DATA, reviews, run_cli, tiny_full, write_csv

from mlflow import MlflowClient
from pipeline import tracking


def runs_newest_first(project: Path) -> list:
    tracking.configure(project)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("retune")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


def project_with(folder: Path, rows: list[dict[str, str]]) -> Path:
    """A fresh project in ``folder`` holding ``rows`` as reviews.csv (USER_DATA's source)."""
    project = make_project(folder / "project")
    write_csv(project / "reviews.csv", rows)
    return project


# --- the bias gate and a lexicon folder of the project's own -----------------------------


# The label is the pronoun and nothing else: a model that learns the data learns its bias,
# and swapping "she" for "he" flips its prediction.
def pronoun_reviews(n_groups: int = 40) -> list[dict[str, str]]:
    return [
        {"review": f"{pronoun} saw film number {g}", "sentiment": label, "film": f"film-{g}"}
        for g in range(n_groups)
        for pronoun, label in (("she", "pos"), ("he", "neg"))
    ]


# Edited gender lexicon: its own group names, and one swap pair.
OWN_GENDER = {"groups": {"women": ["she"], "men": ["he"]}, "swaps": [["she", "he"]]}


def biased(tiny_base_model: Path) -> tuple[str, ...]:
    """Overrides: learn the pronoun (full fine-tuning, 3 epochs of 7 steps, the head at
    1e-3 (5e-3, the default for normalised features, overshoots here), no distillation
    holding the encoder back; it then labels every test text right), the project's lexicons."""
    return (
        *USER_DATA,
        *tiny_full(tiny_base_model),
        "train.epochs=3",
        "train.patience=3",
        "train.batch_size=8",
        "train.learning_rate=0.01",
        "train.head_learning_rate=0.001",
        "forgetting.distill=0",
        "bias.lexicons=[gender]",
        "bias.lexicon_dir=lexicons",
    )


@pytest.fixture(scope="module")
def champion_project(prefect_harness, tmp_path_factory, tiny_base_model):
    """A project whose first run (flips only warned about) registered version 1."""
    project = project_with(tmp_path_factory.mktemp("bias"), pronoun_reviews())
    (project / "lexicons").mkdir()
    (project / "lexicons" / "gender.json").write_text(json.dumps(OWN_GENDER))
    first = run_cli(
        prefect_harness,
        project,
        *biased(tiny_base_model),
        "bias.severity={counterfactual_flips: warn}",
    )
    assert first.returncode == 0, first.stdout + first.stderr
    return project, first


@pytest.mark.integration
def test_a_lexicon_folder_of_the_project_names_the_groups(champion_project):
    project, first = champion_project
    (run,) = runs_newest_first(project)
    data_bias = tracking.read_report(run.info.run_id, "reports/data_bias.json")
    assert {g["group"] for g in data_bias["groups"]} == {"women", "men"}
    # The label is the pronoun: each group holds one label only.
    rates = {g["group"]: g["positive_rate"] for g in data_bias["groups"]}
    assert rates == {"women": 1.0, "men": 0.0}
    model_bias = tracking.read_report(run.info.run_id, "reports/bias.json")
    assert {g["group"] for g in model_bias["groups"]["groups"]} == {"women", "men"}
    cf = model_bias["counterfactual"]
    # Every test text holds exactly one swappable term, through the folder's one pair.
    assert cf["pairs"] == sum(1 for _ in (project / "data" / "reviews" / "test.csv").open()) - 1
    assert all(
        ex["swapped"] == ex["original"].replace("she", "he", 1)
        or ex["swapped"] == ex["original"].replace("he", "she", 1)
        for ex in cf["examples"]
    )
    assert "female" not in first.stdout and "women" in first.stdout
    # The flow learned the data's bias: every swap flips (warned about here, not refused).
    assert cf["flip_rate"]["value"] == 1.0
    assert run.data.tags["retune.bias_gate"].startswith("warned: warning: counterfactual flip")


@pytest.mark.integration
def test_the_bias_gate_refuses_registers_nothing_and_keeps_the_champion(
    prefect_harness, champion_project, tiny_base_model
):
    project, _ = champion_project
    result = run_cli(prefect_harness, project, *biased(tiny_base_model))  # flips: error
    assert result.returncode == 3, result.stdout + result.stderr
    assert "refused: model refused (recorded as MLflow run" in result.stderr
    assert "bias: counterfactual flip rate" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    runs = runs_newest_first(project)  # configures the project's store for the client
    client = MlflowClient()
    refused = runs[0]
    assert [str(v.version) for v in client.search_model_versions("name = 'retune-reviews'")] == [
        "1"
    ]
    champion = client.get_model_version_by_alias("retune-reviews", "champion")
    assert str(champion.version) == "1" and champion.run_id == runs[1].info.run_id
    assert refused.info.status == "FINISHED"
    assert refused.data.tags["retune.verdict"] == "refused"
    assert refused.data.tags["retune.bias_gate"].startswith("refused: ")
    assert "retune.registered_version" not in refused.data.tags
    report = tracking.read_report(refused.info.run_id, "reports/bias.json")
    flips = next(c for c in report["gate"]["checks"] if c["check"] == "counterfactual_flips")
    assert flips["status"] == "failed" and flips["severity"] == "error"
    assert flips["value"] > report_limit(report)
    # The same data, seed and settings trained the same model both times.
    first = tracking.read_report(runs[1].info.run_id, "reports/bias.json")
    assert first["counterfactual"]["flip_rate"] == report["counterfactual"]["flip_rate"]


def report_limit(report: dict) -> float:
    return next(
        c["limit"] for c in report["gate"]["checks"] if c["check"] == "counterfactual_flips"
    )


# --- WiSE-FT through the flow, and the overhead of that run ------------------------------

# Full fine-tuning at a high learning rate forgets (alpha 1.0 is refused by a zero budget);
# alpha 0.0 is the base encoder with the tuned head: nothing forgotten, so it is chosen.
WISE_FT = (
    *USER_DATA,
    "train.strategy=full",
    "train.epochs=1",
    "train.bf16=false",
    "train.learning_rate=0.01",
    "forgetting.gate=error",
    "forgetting.max_mean_drop=0",
    "forgetting.max_task_drop=0",
    "forgetting.wise_ft=true",
    "forgetting.wise_ft_alphas=[1.0, 0.0]",
)


@pytest.fixture(scope="module")
def wise_run(prefect_harness, tmp_path_factory, tiny_base_model):
    """One WiSE-FT run of the CLI, its process wall time in seconds."""
    project = project_with(tmp_path_factory.mktemp("wise"), reviews())
    clock = time.perf_counter()
    result = run_cli(prefect_harness, project, *WISE_FT, f"train.base_model={tiny_base_model}")
    seconds = time.perf_counter() - clock
    assert result.returncode == 0, result.stdout + result.stderr
    return project, result, seconds


@pytest.mark.integration
def test_wise_ft_through_the_flow_records_the_chosen_alpha_and_its_blend(wise_run):
    project, result, _ = wise_run
    assert "forgetting gate: passed" in result.stdout
    (run,) = runs_newest_first(project)
    report = tracking.read_report(run.info.run_id, "reports/forgetting.json")
    choice = report["mitigation"]["wise_ft"]
    assert choice["alpha"] == 0.0
    assert choice["reason"].startswith("best validation metric")
    assert choice["reason"].endswith("within the forgetting budget")
    curve = {p["alpha"]: p for p in choice["curve"]}
    assert sorted(curve) == [0.0, 1.0]  # swept in order, whatever order configured
    assert curve[0.0]["passed"] and curve[0.0]["mean_drop"] == 0.0
    assert not curve[1.0]["passed"] and curve[1.0]["mean_drop_ci_high"] > 0.0
    # The blend is the model evaluated and registered: its encoder is the base's.
    assert report["base"]["mean_drop"] == 0.0 and report["gate"]["refused"] is False
    assert run.data.tags["retune.verdict"] == "accepted"
    assert run.data.tags["retune.registered_version"] == "1"
    client = MlflowClient()
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert "plots/wise_ft.png" in plots
    card = client.download_artifacts(run.info.run_id, "card/model_card.md")
    assert "WiSE-FT weight blending, alpha 0" in Path(card).read_text(encoding="utf-8")


@functools.cache
def load_overhead():
    """bench/overhead.py (a script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location("overhead", REPO_ROOT / "bench" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_overhead_reads_every_task_and_the_training_steps_of_a_run(wise_run):
    project, _, process_seconds = wise_run
    overhead = load_overhead()
    times = overhead.measure_run(project, "retune", None, process_seconds)
    (run,) = runs_newest_first(project)
    assert times.mlflow_run_id == run.info.run_id
    assert times.flow_run_id == run.data.tags["retune.prefect_flow_run_id"]
    names = [s.name for s in times.steps]
    for before, after in [("prepare_data", "train_model"), ("train_model", "blend_with_base")]:
        assert names.index(before) < names.index(after)
    assert names.count("train_model") == 1
    assert all(s.seconds >= 0 for s in times.steps)
    starts = [s.start for s in times.steps]
    assert starts == sorted(starts)
    assert 0 <= times.outside_tasks < times.flow_seconds < process_seconds
    train_task = next(s for s in times.steps if s.name == "train_model")
    training = json.loads(
        (project / "runs" / times.flow_run_id / "reports" / "training.json").read_text()
    )
    assert times.train_seconds == pytest.approx(training["train_seconds"])
    assert 0 < times.train_seconds < train_task.seconds
    ratio = (times.flow_seconds - times.train_seconds) / times.flow_seconds
    assert times.to_dict()["overhead_flow"] == pytest.approx(ratio)
    table = overhead.format_table(times)
    assert f"= {ratio:.1%}" in table.splitlines()[-2]
    assert all(name in table for name in names)


def step(name: str, second: int, seconds: float):
    return load_overhead().StepTime(name, datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC), seconds)


def test_overhead_table_and_ratios_by_hand():
    overhead = load_overhead()
    times = overhead.RunTimes(
        "run",
        "flow",
        200.0,
        [step("prepare_data", 0, 50.0), step("train_model", 1, 120.0)],
        train_seconds=100.0,
        process_seconds=230.0,
    )
    assert times.outside_tasks == 30.0
    figures = times.to_dict()
    assert figures["overhead_flow"] == 0.5  # (200 - 100) / 200
    assert figures["overhead_process"] == pytest.approx(130 / 230)
    lines = overhead.format_table(times).splitlines()
    assert lines[2].split() == ["prepare_data", "50.0", "25.0%"]
    assert lines[3].split() == ["train_model", "120.0", "60.0%"]
    assert lines[4].split() == ["of", "which", "training", "steps", "100.0"]
    assert lines[5].split() == ["(in", "the", "flow,", "between", "tasks)", "30.0"]
    assert "start-up and exit 30.0 s" in lines[7]
    assert lines[-2] == "overhead (flow): (200.0 - 100.0 training steps) / 200.0 = 50.0%"
    assert lines[-1] == "overhead (process): (230.0 - 100.0 training steps) / 230.0 = 56.5%"


@pytest.mark.parametrize(
    ("whole", "train", "message"),
    [(0.0, 0.0, "must take a positive time"), (10.0, 11.0, "do not fit in a run of 10.0 s")],
)
def test_overhead_ratio_refuses_impossible_times(whole, train, message):
    with pytest.raises(ValueError, match=message):
        load_overhead().overhead_ratio(whole, train)


@pytest.mark.parametrize(
    ("name", "task"),
    [("train_model-2f8", "train_model"), ("register-166", "register"), ("plain", "plain")],
)
def test_task_names_lose_prefects_run_suffix(name, task):
    assert load_overhead().task_name(name) == task
