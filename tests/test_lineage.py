"""Lineage and reproduction through real flow runs (tiny base model, real Prefect/DVC/MLflow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_retune

from mlflow import MlflowClient
from pipeline import tags as tag
from pipeline import tracking
from pipeline.lineage import weights_sha256
from pipeline.versioning import recorded_datasets

pytestmark = pytest.mark.integration


def write_reviews(path: Path, n_groups: int, word: str = "film") -> None:
    lines = ["review,sentiment,film"]
    for g in range(n_groups):
        lines.append(f"a fine and lovely {word} number {g},pos,f{g}")
        lines.append(f"a dull and tiresome {word} number {g},neg,f{g}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run(api: str, project: Path, *args: str):
    result = run_retune(project, api, *args, "--project-dir", str(project))
    return result


def train(api: str, project: Path, tiny: Path):
    overrides = [
        "data.source=reviews.csv",
        "data.name=reviews",
        "data.text_column=review",
        "data.label_column=sentiment",
        "data.group_column=film",
        "data.labels=[pos, neg]",
        f"train.base_model={tiny}",
        "train.strategy=full",
        "train.epochs=2",
        "train.bf16=false",
    ]
    args = ["run"]
    for item in overrides:
        args += ["--set", item]
    result = run(api, project, *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return recorded_datasets(project / "data.dvc")["reviews"].md5


@pytest.mark.slow  # minutes: make test-slow (CI runs it too)
def test_lineage_flags_and_reproduces_an_older_version(prefect_harness, project, tiny_base_model):
    api = prefect_harness
    write_reviews(project / "reviews.csv", 40)
    md5_v1 = train(api, project, tiny_base_model)
    write_reviews(project / "reviews.csv", 50, word="movie")  # the data moves on
    (project / "tweak.py").write_text("x = 1\n", encoding="utf-8")  # untracked code: dirty
    md5_v2 = train(api, project, tiny_base_model)
    assert md5_v1 != md5_v2

    traced = run(api, project, "lineage", "retune-reviews/1", "--json")
    assert traced.returncode == 0, traced.stderr
    chain = json.loads(traced.stdout)
    assert chain["dataset"] == "reviews" and chain["data_md5"] == md5_v1
    assert chain["base_model_sha256"] == weights_sha256(str(tiny_base_model))
    # reviews.csv (untracked data), data.dvc and .gitignore (changed by DVC) leave it clean.
    assert chain["git_commit"] != "unknown" and chain["git_dirty"] == "false"
    assert chain["git_dirty_files"] == "none"
    second = run(api, project, "lineage", "retune-reviews/2")
    assert "dirty tree" in second.stdout and "tweak.py" in second.stdout, second.stdout
    assert chain["config"]["train"]["epochs"] == 2 and len(chain["config_hash"]) == 16
    assert chain["validation"].startswith("passed")
    assert Path(chain["reports"]["validation"].removeprefix("file://")).is_file()
    assert chain["dvc_remote"].endswith("project-dvc-remote")

    listed = run(api, project, "lineage", "--data", md5_v1)
    assert listed.returncode == 0
    assert "retune-reviews/1" in listed.stdout and "retune-reviews/2" not in listed.stdout
    flagged = run(api, project, "lineage", "--data", md5_v1, "--flag", "labels were swapped")
    assert "flagged: labels were swapped" in flagged.stdout
    tracking.configure(project)
    client = MlflowClient()
    assert (
        client.get_model_version("retune-reviews", "1").tags[tag.FLAGGED] == "labels were swapped"
    )
    assert tag.FLAGGED not in client.get_model_version("retune-reviews", "2").tags

    # data/ now holds v2: reproduce v1 from the DVC cache, then from the remote alone.
    for cache_removed in (False, True):
        if cache_removed:
            shutil.rmtree(project / ".dvc" / "cache")
        result = run(api, project, "reproduce", "retune-reviews/1")
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "reproduced exactly" in result.stdout
        assert result.stdout.count(" same") == 8  # 3 test figures + 5 retention tasks
    assert recorded_datasets(project / "data.dvc")["reviews"].md5 == md5_v2  # untouched


def test_reproduce_reports_an_unknown_version(prefect_harness, project):
    result = run(prefect_harness, project, "reproduce", "retune-reviews/7")
    assert result.returncode == 1
    assert "retune-reviews/7: not in the registry" in result.stderr
