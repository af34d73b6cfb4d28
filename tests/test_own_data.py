"""The README's "your own data" path: a news corpus of long articles, imported from outside
the project, trains and registers a model of its own name; the existing model keeps its
aliases and audit trail; every dropped row is printed."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_retune
from test_flow import reviews, write_csv, write_tiny_config
from test_import import TOPICS, news_csv

from mlflow import MlflowClient
from pipeline import registry, tracking

pytestmark = pytest.mark.integration


def cli(api: str, project: Path, *args: str):
    return run_retune(project, api, *args, "--project-dir", str(project))


@pytest.mark.slow  # minutes: make test-slow (CI runs it too)
def test_a_news_corpus_gets_a_model_of_its_own(prefect_harness, project, tiny_base_model, tmp_path):
    write_tiny_config(project, tiny_base_model)  # the tiny model: this is about the path
    write_csv(project / "reviews.csv", reviews())
    first = cli(prefect_harness, project, "run")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    tracking.configure(project)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("retune-reviews", "champion").version) == "1"
    audit_before = registry.read_audit("retune-reviews")

    # The README's commands, with the file where a user downloaded it.
    (tmp_path / "downloads").mkdir()
    source, _ = news_csv(tmp_path / "downloads" / "news.csv")
    flags = ["--text-col", "body", "--label-col", "topic", "--group-col", "id"]
    imported = cli(
        prefect_harness, project, "data", "import", str(source), "--name", "news", *flags
    )
    assert imported.returncode == 0, imported.stdout[-3000:] + imported.stderr[-3000:]
    assert "dropped 2" in imported.stdout and "cross-split" in imported.stdout
    labels = ", ".join(sorted(TOPICS))
    trained = cli(
        prefect_harness,
        project,
        "run",
        "--set",
        "data.source=dataset:news",
        "--set",
        f"data.labels=[{labels}]",
        "--set",
        "train.max_train_samples=300",
        "--set",
        "evaluate.max_test_samples=200",
    )
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    assert "truncated" in trained.stdout  # long articles: counted and reported, not refused

    # A model of its own name, champion of its own; the reviews model is untouched.
    news = client.get_model_version_by_alias("retune-news", "champion")
    assert str(news.version) == "1"
    assert news.tags["retune.identity.labels"] == '["' + '", "'.join(sorted(TOPICS)) + '"]'
    assert "model version: http://127.0.0.1:5000/#/models/retune-news/versions/1" in trained.stdout
    assert str(client.get_model_version_by_alias("retune-reviews", "champion").version) == "1"
    assert [v.version for v in registry.list_versions("retune-reviews")] == ["1"]
    assert registry.read_audit("retune-reviews") == audit_before
