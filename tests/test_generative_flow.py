"""The real flow for a generative task (translation pairs, chat) on a tiny Llama.

Prefect, GX, DVC and MLflow are real; the base is a 2-layer Llama with a ChatML template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_retune

from mlflow import MlflowClient
from pipeline import modelstore, tracking
from pipeline.versioning import recorded_datasets

pytestmark = pytest.mark.integration

WORDS = ["Save", "Delete", "Close", "Open", "Cancel", "Help", "Print", "Search", "Edit", "Copy"]
GERMAN = [
    "Sichern",
    "Löschen",
    "Schliessen",
    "Öffnen",
    "Abbrechen",
    "Hilfe",
    "Drucken",
    "Suchen",
    "Bearbeiten",
    "Kopieren",
]


def pairs_csv(path: Path, n: int = 80) -> Path:
    rows = [
        {"en": f"{WORDS[i % 10]} item {i}", "de": f"{GERMAN[i % 10]} Element {i}"} for i in range(n)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


UI_PAIRS = (  # the translation pairs of pairs_csv(project / "ui.csv")
    "task=translation",
    "data.source=ui.csv",
    "generation.source_column=en",
    "generation.target_column=de",
)


def tiny_generative(tiny_causal_lm: Path) -> list[str]:
    return [
        f"train.base_model={tiny_causal_lm}",
        "train.strategy=full",
        "train.epochs=1",
        "train.batch_size=8",
        "train.learning_rate=0.001",
        "train.bf16=false",
        "generation.max_new_tokens=8",
        "forgetting.gate=warn",
        "bias.severity.crows_pairs=warn",
        "promotion.beat_probe=false",
    ]


def run(api_url: str, project: Path, *overrides: str):
    args = ["run", "--project-dir", str(project)]
    for item in overrides:
        args += ["--set", item]
    return run_retune(project, api_url, *args)


@pytest.mark.slow  # 90 s here; make test-slow (CI runs both tiers)
def test_translation_pairs_run_the_whole_flow_and_register_a_chat_model(
    prefect_harness, project, tiny_causal_lm
):
    pairs_csv(project / "ui.csv")
    overrides = [
        *UI_PAIRS,
        *tiny_generative(tiny_causal_lm),
    ]
    result = run(prefect_harness, project, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    record = recorded_datasets(project / "data.dvc")["ui"]
    assert record.source == "ui.csv" and sum(record.rows.values()) == 80
    train = pd.read_csv(project / "data" / "ui" / "train.csv")
    test = pd.read_csv(project / "data" / "ui" / "test.csv")
    assert not set(train["source"]) & set(test["source"])  # no msgid in two splits
    assert json.loads(test["messages"][0])[-1]["role"] == "assistant"

    tracking.configure(project)
    client = MlflowClient()
    model = client.get_registered_model("retune-ui")
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1"}
    run_id = client.get_model_version("retune-ui", "1").run_id
    metrics = client.get_run(run_id).data.metrics
    for key in ("test_chrf", "test_answer_loss", "test_token_accuracy", "probe_test_chrf"):
        assert key in metrics, key
    assert metrics["retention_lee_base"] < 0  # a mean log-probability per token
    assert "crows_stereotype_shift" in metrics
    report = tracking.read_report(run_id, "reports/forgetting.json")
    # The random tiny base answers the general prompts with nothing: that task is left out.
    assert [t["task"] for t in report["base"]["tasks"]] == ["lee", "brown"]
    assert "general-answers: the base answered none" in result.stdout + result.stderr
    assert {t["metric"] for t in report["base"]["tasks"]} == {"log-likelihood"}

    card = tracking.read_text(run_id, "card/model_card.md")
    assert "- **Task:** translation: it answers a conversation" in card
    assert (
        "| model | conversations | answer loss | perplexity | token accuracy | chrF | BLEU |"
        in card
    )
    assert "Test prompts answered by both models" in card and "classification head" not in card
    assert "| all | 1,018 |" in card  # CrowS-Pairs, base against tuned

    loaded = modelstore.load_version("retune-ui", "1", project / "tmp")
    asked = [[{"role": "user", "content": "Translate from English to German:\nSave item 1"}]]
    out = loaded.predict(pd.DataFrame({"messages": [json.dumps(asked[0])]}))
    assert list(out.columns) == ["answer"] and isinstance(out["answer"][0], str)

    # The registered translator answers through the CLI: one prompt, and a file of texts
    # wrapped with the instruction it was tuned with.
    env_run = [project, prefect_harness]
    said = run_retune(*env_run, "generate", "retune-ui@champion", "Save item 2")
    assert said.returncode == 0, said.stderr[-2000:]
    (project / "texts.jsonl").write_text('{"text": "Open item 4"}\n{"text": "Close item 9"}\n')
    answered = run_retune(*env_run, "predict", "retune-ui@champion", "texts.jsonl")
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert "answered 2 rows" in answered.stdout
    rows = pd.read_json(project / "texts.predictions.jsonl", lines=True)
    assert list(rows.columns) == ["text", "answer"] and len(rows) == 2

    # Retraining meets the champion: it is measured (answers, retention, CrowS-Pairs) and
    # compared; the same data and seed give the same figures, so it does not take over.
    again = run(prefect_harness, project, *overrides)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    second = client.get_model_version("retune-ui", "2")
    assert str(client.get_registered_model("retune-ui").aliases["champion"]) == "1"
    report = tracking.read_report(second.run_id, "reports/forgetting.json")
    assert report["champion_version"] == "1" and report["champion"]["tasks"]
    bias = tracking.read_report(second.run_id, "reports/bias.json")
    assert bias["champion_version"] == "1" and bias["champion_shift"] == pytest.approx(0.0)

    # Version 1 reproduces exactly from its DVC data and recorded config: the kind's own
    # metrics and its likelihood retention tasks, not the classifier's.
    done = run_retune(*env_run, "reproduce", "retune-ui/1", "--project-dir", ".")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    compared = {line.split()[0] for line in lines if line.strip().endswith("same")}
    assert {"test_answer_loss", "test_token_accuracy", "test_chrf", "best_epoch"} <= compared
    assert {"retention_lee", "retention_brown"} <= compared
    assert "reproduced exactly" in done.stdout


def chat_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GOOD_TURNS = [
    {"role": "user", "content": "My router blinks red."},
    {"role": "assistant", "content": "Restart it and wait a minute."},
]


@pytest.mark.parametrize(
    ("name", "write", "expected"),
    [
        (
            "chat.jsonl",
            lambda p: chat_jsonl(p, [{"messages": GOOD_TURNS}, {"messages": GOOD_TURNS[:1]}]),
            r"chat\.jsonl: line 2: no assistant turn",
        ),
        (
            "chat.jsonl",
            lambda p: chat_jsonl(p, [{"messages": [{"role": "bot", "content": "hi"}]}]),
            r"chat\.jsonl: line 1: turn 1 has unknown role 'bot'",
        ),
        (
            "chat.jsonl",
            lambda p: chat_jsonl(p, [{"messages": []}]),
            r"chat\.jsonl: line 1: 'messages' must be a non-empty list",
        ),
    ],
)
def test_bad_conversations_stop_before_training_and_change_nothing(
    prefect_harness, project, tiny_causal_lm, name, write, expected
):
    write(project / name)
    dvc_before = (project / "data.dvc").read_bytes()
    result = run(
        prefect_harness,
        project,
        "task=chat",
        f"data.source={name}",
        *tiny_generative(tiny_causal_lm),
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert re.search(expected, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (project / "data.dvc").read_bytes() == dvc_before
    assert not (project / "data").exists() and not (project / "mlflow" / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("name", "content", "overrides", "expected"),
    [
        ("ui.po", 'msgid "Save"\nmsgstr "Sichern\n\nmsgid\n', [], r"ui\.po is not a gettext"),
        ("ui.csv", "en,german\nSave,Sichern\n", [], r"ui\.csv has no column 'de'"),
    ],
)
def test_bad_pairs_stop_before_training_and_change_nothing(
    prefect_harness, project, tiny_causal_lm, name, content, overrides, expected
):
    (project / name).write_text(content, encoding="utf-8")
    dvc_before = (project / "data.dvc").read_bytes()
    result = run(
        prefect_harness,
        project,
        "task=translation",
        f"data.source={name}",
        "generation.source_column=en",
        "generation.target_column=de",
        *tiny_generative(tiny_causal_lm),
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert re.search(expected, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (project / "data.dvc").read_bytes() == dvc_before
    assert not (project / "data").exists()


def test_a_base_that_is_not_a_causal_lm_stops_before_training(
    prefect_harness, project, tiny_causal_lm, tiny_base_model
):
    pairs_csv(project / "ui.csv", 40)
    dvc_before = (project / "data.dvc").read_bytes()
    overrides = [o for o in tiny_generative(tiny_causal_lm) if not o.startswith("train.base")]
    result = run(
        prefect_harness,
        project,
        *UI_PAIRS,
        f"train.base_model={tiny_base_model}",
        *overrides,
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert re.search(r"is a bert model .*not a causal language model", result.stderr), (
        result.stderr[-2000:]
    )
    assert "Traceback" not in result.stderr
    assert (project / "data.dvc").read_bytes() == dvc_before
    assert not (project / "data").exists()


def test_chat_conversations_run_the_whole_flow_with_a_system_prompt(
    prefect_harness, project, tiny_causal_lm
):
    questions = ["my router blinks red", "the app will not start", "I forgot my password"]
    records = [
        {
            "messages": [
                {"role": "user", "content": f"{questions[i % 3]} (case {i})"},
                {"role": "assistant", "content": f"please restart the router, case {i}"},
                {"role": "user", "content": "thank you"},
                {"role": "assistant", "content": "goodbye"},
            ]
        }
        for i in range(60)
    ]
    chat_jsonl(project / "support.jsonl", records)
    result = run(
        prefect_harness,
        project,
        "task=chat",
        "data.source=support.jsonl",
        "generation.system_prompt=You are brief.",
        *tiny_generative(tiny_causal_lm),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "test (base model)" in result.stdout and "token accuracy" in result.stdout
    train = pd.read_csv(project / "data" / "support" / "train.csv")
    first = json.loads(train["messages"][0])
    assert first[0] == {"role": "system", "content": "You are brief."}
    assert [t["role"] for t in first[1:]] == ["user", "assistant", "user", "assistant"]
    tracking.configure(project)
    client = MlflowClient()
    version = client.get_model_version("retune-support", "1")
    assert version.tags["retune.identity.task"] == "chat"
    metrics = client.get_run(version.run_id).data.metrics
    assert "test_token_accuracy" in metrics and "test_chrf" not in metrics
    # the multi-turn answers, both of them, carried the loss: the tuned model learned them
    assert metrics["test_answer_loss"] < metrics["probe_test_answer_loss"]


def test_full_tuning_with_kl_distillation_and_wise_ft_through_the_flow(
    prefect_harness, project, tiny_causal_lm
):
    """Full fine-tuning with the KL pull toward the base, then a WiSE-FT sweep of every
    weight; with no forgetting allowed only the base's own weights (alpha 0) pass."""
    pairs_csv(project / "ui.csv")
    result = run(
        prefect_harness,
        project,
        *UI_PAIRS,
        *tiny_generative(tiny_causal_lm),
        "train.learning_rate=0.01",
        "forgetting.distill=1.0",
        "forgetting.distill_batch_size=4",
        "forgetting.wise_ft=true",
        "forgetting.wise_ft_alphas=[1.0, 0.0]",
        "forgetting.gate=error",
        "forgetting.max_mean_drop=0",
        "forgetting.max_task_drop=0",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "forgetting gate: passed" in result.stdout
    tracking.configure(project)
    client = MlflowClient()
    version = client.get_model_version("retune-ui", "1")
    report = tracking.read_report(version.run_id, "reports/forgetting.json")
    assert report["mitigation"]["distill"] == 1.0
    choice = report["mitigation"]["wise_ft"]
    curve = {p["alpha"]: p for p in choice["curve"]}
    assert sorted(curve) == [0.0, 1.0] and choice["alpha"] == 0.0
    assert curve[0.0]["passed"] and curve[0.0]["mean_drop"] == 0.0
    assert not curve[1.0]["passed"] and curve[1.0]["mean_drop_ci_high"] > 0.0
    # the blend is what was evaluated and registered: the base's own likelihoods
    assert report["base"]["mean_drop"] == 0.0
    plots = [a.path for a in client.list_artifacts(version.run_id, "plots")]
    assert "plots/wise_ft.png" in plots


@pytest.mark.slow  # 40 s: FSDP through the flow; make test-slow
def test_the_flow_trains_a_causal_lm_sharded_over_two_processes(
    prefect_harness, project, tiny_causal_lm
):
    pairs_csv(project / "ui.csv")
    result = run(
        prefect_harness,
        project,
        *UI_PAIRS,
        *tiny_generative(tiny_causal_lm),
        "train.nproc_per_node=2",
        "train.fsdp=true",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    tracking.configure(project)
    client = MlflowClient()
    version = client.get_model_version("retune-ui", "1")
    params = client.get_run(version.run_id).data.params
    assert params["train.fsdp"] == "True" and params["train.nproc_per_node"] == "2"
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["test_answer_loss"] < metrics["probe_test_answer_loss"]
    spec = json.loads(next((project / "runs").glob("*/distributed/spec.json")).read_text())
    assert spec["kind"] == "causal" and spec["config"]["fsdp"] is True
