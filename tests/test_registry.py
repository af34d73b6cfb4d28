"""Registration and aliases against a real MLflow SQLite store in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow import MlflowClient
from pipeline import registry, tracking
from pipeline.registry import CHALLENGER, CHAMPION, decide_aliases


def test_first_version_is_champion_later_only_if_strictly_better():
    assert decide_aliases(0.7, None, "test_macro_f1").alias == CHAMPION
    assert decide_aliases(0.80, 0.79, "test_macro_f1").alias == CHAMPION
    equal = decide_aliases(0.79, 0.79, "test_macro_f1")
    assert equal.alias == CHALLENGER
    assert "0.7900 <= champion's 0.7900" in equal.reason
    assert decide_aliases(0.5, 0.79, "m").alias == CHALLENGER


@pytest.fixture
def store(tmp_path: Path) -> Path:
    tracking.configure(tmp_path)
    return tmp_path


def candidate(store: Path, f1: float) -> tuple[str, str]:
    run_id = tracking.start_run(store, "exp", "r", {})
    tracking.log_params_and_metrics(run_id, {}, {"test_macro_f1": f1})
    MlflowClient().log_text(run_id, "weights", "model/weights.txt")
    tracking.end_run(run_id)
    return run_id, f"runs:/{run_id}/model"


def aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_register_sets_champion_then_challenger_then_moves_champion(store: Path):
    run1, uri1 = candidate(store, 0.80)
    v1 = registry.register_model(
        uri1, "m", run1, {"retune.data_md5": "abc.dir"}, 0.80, "test_macro_f1"
    )
    assert (v1.version, v1.aliases, v1.champion_version) == ("1", [CHAMPION], "1")
    assert MlflowClient().get_model_version("m", "1").tags["retune.data_md5"] == "abc.dir"

    run2, uri2 = candidate(store, 0.80)
    v2 = registry.register_model(uri2, "m", run2, {}, 0.80, "test_macro_f1")
    assert (v2.version, v2.aliases, v2.champion_version) == ("2", [CHALLENGER], "1")
    assert aliases("m") == {CHAMPION: "1", CHALLENGER: "2"}

    run3, uri3 = candidate(store, 0.81)
    v3 = registry.register_model(uri3, "m", run3, {}, 0.81, "test_macro_f1")
    assert v3.aliases == [CHAMPION]
    assert aliases("m") == {CHAMPION: "3"}
    assert (
        "0.8100 > champion's 0.8000"
        in MlflowClient().get_model_version("m", "3").tags["retune.alias_decision"]
    )


def test_failure_after_the_version_exists_leaves_no_half_registered_model(store: Path, monkeypatch):
    run1, uri1 = candidate(store, 0.80)
    registry.register_model(uri1, "m", run1, {}, 0.80, "test_macro_f1")
    run2, uri2 = candidate(store, 0.90)

    def broken(self, name, alias, version):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(RuntimeError, match="registry went away"):
        registry.register_model(uri2, "m", run2, {}, 0.90, "test_macro_f1")
    monkeypatch.undo()
    versions = MlflowClient().search_model_versions("name='m'")
    assert [str(v.version) for v in versions] == ["1"]
    assert aliases("m") == {CHAMPION: "1"}
