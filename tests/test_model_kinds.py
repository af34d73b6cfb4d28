"""A model of another kind (labels, task, input) never takes an alias of a registered model:
the flow refuses it before training, `promote --force` refuses it, the audit trail says so."""

from __future__ import annotations

import pytest
from conftest import run_retune
from test_flow import reviews, write_csv, write_tiny_config

from mlflow import MlflowClient
from pipeline import promotion, registry, tracking
from pipeline import tags as tag

pytestmark = pytest.mark.integration

NAME = "retune-reviews"  # the default: retune-<dataset name>, the dataset from reviews.csv
TOPICS = ("business", "sport", "tech")


def topics(n_groups: int = 30) -> list[dict[str, str]]:
    words = {"business": "shares and profits rose", "sport": "the match ended", "tech": "a chip"}
    return [
        {"review": f"{words[label]} story {g} part {k}", "sentiment": label, "film": f"desk-{g}"}
        for g in range(n_groups)
        for k, label in enumerate(TOPICS)
    ]


def cli(api, project, *args):
    return run_retune(project, api, *args, "--project-dir", str(project))


@pytest.mark.slow  # minutes of real flow runs: make test-slow (CI runs it too)
def test_another_label_set_is_refused_and_the_champion_stays(
    prefect_harness, project, tiny_base_model
):
    write_tiny_config(project, tiny_base_model)  # no registry.model_name: the default
    write_csv(project / "reviews.csv", reviews())
    first = cli(prefect_harness, project, "run")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    tracking.configure(project)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags[tag.IDENTITY_LABELS] == '["pos", "neg"]'
    assert v1.tags[tag.IDENTITY_TASK] == "text-classification"
    assert v1.tags[tag.IDENTITY_INPUT] == '{"text": "string"}'
    listed = cli(prefect_harness, project, "models")  # NAME defaults to the config's
    assert listed.returncode == 0, listed.stderr
    assert NAME in listed.stdout and "champion" in listed.stdout
    audit_before = registry.read_audit(NAME)

    write_csv(project / "topics.csv", topics())
    second = cli(
        prefect_harness,
        project,
        "run",
        "--set",
        "data.source=topics.csv",
        "--set",
        f"data.labels=[{', '.join(TOPICS)}]",
        "--set",
        f"registry.model_name={NAME}",
    )
    assert second.returncode == 3, second.stdout[-3000:] + second.stderr[-3000:]
    assert (
        "compatible: labels [business, sport, tech] differ from champion v1's [pos, neg]"
        in second.stderr
    )
    assert "--set registry.model_name=retune-topics" in second.stderr
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert [v.version for v in registry.list_versions(NAME)] == ["1"]  # nothing registered
    assert registry.list_versions("retune-topics") == []
    experiment = client.get_experiment_by_name("retune")
    refused = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`retune.verdict` = 'refused'"
    )
    assert len(refused) == 1 and refused[0].info.status == "FINISHED"
    assert refused[0].data.tags[tag.IDENTITY_LABELS] == '["business", "sport", "tech"]'
    assert "compatible FAILED" in refused[0].data.tags["retune.promotion_verdict"]
    entries = registry.read_audit(NAME)
    assert entries[: len(audit_before)] == audit_before
    (entry,) = entries[len(audit_before) :]
    assert (entry.action, entry.status, entry.alias) == ("refuse", "refused", "champion")
    assert (entry.from_version, entry.to_version) == ("1", "1")
    assert refused[0].info.run_id in entry.reason
    assert "labels [business, sport, tech]" in entry.verdict
    assert registry.audit_problems(entries) == []

    # A version of another kind registered by hand: --force does not make it champion.
    other = client.create_model_version(
        NAME,
        v1.source,
        run_id=v1.run_id,
        tags=promotion.text_classifier_identity(list(TOPICS)).to_tags(),
    )
    forced = cli(
        prefect_harness, project, "promote", NAME, str(other.version), "--reason", "x", "--force"
    )
    assert forced.returncode == 3, forced.stdout + forced.stderr  # refused
    assert "cannot take champion, not even with --force" in forced.stderr
    assert "labels [business, sport, tech] differ from champion v1's [pos, neg]" in forced.stderr
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert registry.read_audit(NAME) == entries
