"""Promotion through the CLI on real flow runs: the policy at registration, a refused manual
promotion, --force with its reason, rollback, the audit trail and the model card."""

from __future__ import annotations

import pytest
from conftest import run_retune
from test_flow import USER_DATA, reviews, write_csv

from mlflow import MlflowClient
from pipeline import registry, tracking

pytestmark = pytest.mark.integration

NAME = "retune-reviews"


def cli(api, project, *args):
    return run_retune(project, api, *args, "--project-dir", str(project))


@pytest.mark.slow  # minutes: make test-slow (CI runs it too)
def test_policy_promote_force_rollback_audit_and_card(prefect_harness, project, tiny_base_model):
    write_csv(project / "reviews.csv", reviews())
    tiny = (*USER_DATA, f"train.base_model={tiny_base_model}", "train.epochs=1", "train.bf16=false")
    for strategy in ("head", "head"):
        args = ["run"] + [a for o in (*tiny, f"train.strategy={strategy}") for a in ("--set", o)]
        result = cli(prefect_harness, project, *args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The second run is the same model: not better than the champion, so challenger.
    tracking.configure(project)
    client = MlflowClient()
    aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
    assert aliases == {"champion": "1", "challenger": "2"}
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["retune.promotion_verdict"].startswith("keep as challenger: ")
    assert "champion FAILED (" in v2.tags["retune.promotion_verdict"]

    listed = cli(prefect_harness, project, "models", NAME)
    assert listed.returncode == 0, listed.stderr
    assert "champion" in listed.stdout and "challenger" in listed.stdout

    refused = cli(prefect_harness, project, "promote", NAME, "2", "--reason", "try it")
    assert refused.returncode == 3  # a refusal, not bad input
    assert f"refused: {NAME}/2: the promotion policy refuses it" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "FAIL champion:" in refused.stderr
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    forced = cli(
        prefect_harness,
        project,
        "promote",
        NAME,
        "2",
        "--reason",
        "hotfix for a customer",
        "--force",
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "champion v1 -> v2 (forced)" in forced.stdout
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"

    back = cli(prefect_harness, project, "rollback", NAME, "--reason", "hotfix misbehaved")
    assert back.returncode == 0, back.stderr[-3000:]
    assert "champion v2 -> v1 (rollback)" in back.stdout
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    entries = [e for e in registry.read_audit(NAME) if e.alias == "champion"]
    assert [(e.action, e.from_version, e.to_version) for e in entries] == [
        ("promote", "", "1"),
        ("promote", "1", "2"),
        ("rollback", "2", "1"),
    ]
    assert entries[0].actor.startswith("prefect-flow-run:")
    assert entries[1].reason == "hotfix for a customer"
    assert entries[1].verdict.startswith("forced over: ")
    assert registry.audit_problems(registry.read_audit(NAME)) == []
    shown = cli(prefect_harness, project, "audit", NAME)
    assert shown.returncode == 0 and "hotfix misbehaved" in shown.stdout

    card = cli(prefect_harness, project, "card", f"{NAME}@champion")
    assert card.returncode == 0, card.stderr
    assert card.stdout.startswith(f"# Model card: {NAME} version 1")
    assert f"retune reproduce {NAME}/1" in card.stdout
    html = cli(prefect_harness, project, "card", f"{NAME}/2", "--html")
    assert html.returncode == 0 and "<table>" in html.stdout
