"""Registration and aliases against a real MLflow SQLite store in a temp dir."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlflow import MlflowClient
from pipeline import registry, tracking
from pipeline import tags as tag
from pipeline.registry import CHALLENGER, CHAMPION


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


# --- audit trail and all-or-nothing champion moves, with real pyfunc models -------------

LABELS = ["fresh", "rotten"]


@pytest.fixture(scope="module")
def model_store(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A store holding one logged tiny classifier and one run whose "model" is not a model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import serving
    from pipeline.finetune import save_model

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_base_model,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    classifier = save_model(model, tokenizer, tmp_path_factory.mktemp("clf"))
    root = tmp_path_factory.mktemp("audit-store")
    tracking.configure(root)
    run_id = tracking.start_run(root, "exp", "log", {})
    model_uri = serving.log_classifier(run_id, classifier, ["good", "bad"])
    tracking.end_run(run_id)
    broken_run, broken_uri = candidate(root, 0.9)  # model/weights.txt: loads as nothing
    return {
        "root": str(root),
        "run_id": run_id,
        "model_uri": model_uri,
        "broken_run": broken_run,
        "broken_uri": broken_uri,
    }


@pytest.fixture
def name(model_store: dict[str, str]) -> str:
    """A fresh registered model with versions 1-3 of the tiny classifier and 4 broken."""
    tracking.configure(Path(model_store["root"]))
    client = MlflowClient()
    model_name = f"audit-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(model_name)
    for _ in range(3):
        client.create_model_version(
            model_name, model_store["model_uri"], run_id=model_store["run_id"]
        )
    client.create_model_version(
        model_name, model_store["broken_uri"], run_id=model_store["broken_run"]
    )
    return model_name


def promote(name: str, version: str, **kwargs) -> registry.AuditEntry:
    kwargs = {"actor": "ana", "reason": "better", "verdict": "promote to champion"} | kwargs
    return registry.move_champion(name, version, **kwargs)


def trail(name: str) -> list[tuple[str, str, str, str, str, int]]:
    return [
        (e.action, e.status, e.alias, e.from_version, e.to_version, e.sequence)
        for e in registry.read_audit(name)
    ]


def test_move_champion_moves_the_alias_clears_challenger_and_records_the_move(name: str):
    first = promote(name, "1", reason="first model", verdict="promote to champion: floor ok")
    assert aliases(name) == {CHAMPION: "1"}
    registry.set_challenger(name, "2", "prefect-flow-run:abc", "lost", "keep as challenger: x")
    assert aliases(name) == {CHAMPION: "1", CHALLENGER: "2"}

    entry = promote(name, "2", actor="bob", reason="retrained on May data")

    assert aliases(name) == {CHAMPION: "2"}  # the challenger won: it no longer is one
    assert trail(name) == [
        ("promote", "done", CHAMPION, "", "1", 1),
        ("promote", "done", CHALLENGER, "", "2", 2),
        ("promote", "done", CHAMPION, "1", "2", 3),
    ]
    assert (entry.actor, entry.reason, entry.verdict) == (
        "bob",
        "retrained on May data",
        "promote to champion",
    )
    assert registry.read_audit(name)[0] == first
    assert first.time_ms <= entry.time_ms and first.time_ms > 1_700_000_000_000
    assert registry.read_audit(name)[1].actor == "prefect-flow-run:abc"
    # Stored as runs with tags in the retune-audit experiment of the same backend.
    client = MlflowClient()
    run = client.get_run(entry.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == registry.AUDIT_EXPERIMENT
    assert run.data.tags["retune.audit.sequence"] == "00000003"
    assert run.data.tags["retune.audit.from_version"] == "1"
    assert registry.audit_problems(registry.read_audit(name)) == []
    assert [v.version for v in registry.list_versions(name)] == ["4", "3", "2", "1"]
    assert registry.list_versions(name)[2].aliases == [CHAMPION]


def test_a_version_that_does_not_load_and_predict_moves_nothing(name: str):
    promote(name, "1")
    with pytest.raises(registry.PromotionError, match=r"models:/audit-\w+/4 failed to load or "):
        promote(name, "4")
    with pytest.raises(registry.PromotionError, match="already holds champion"):
        promote(name, "1")

    assert aliases(name) == {CHAMPION: "1"}
    assert trail(name) == [("promote", "done", CHAMPION, "", "1", 1)]


def test_failure_between_alias_move_and_audit_record_restores_the_previous_champion(name: str):
    promote(name, "1")
    registry.set_challenger(name, "2", "ana", "lost", "keep as challenger")

    def disk_full() -> None:
        assert aliases(name)[CHAMPION] == "2"  # the alias had moved
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        promote(name, "2", after_move=disk_full, verdict="promote to champion: ok")

    assert aliases(name) == {CHAMPION: "1", CHALLENGER: "2"}
    assert trail(name) == [
        ("promote", "done", CHAMPION, "", "1", 1),
        ("promote", "done", CHALLENGER, "", "2", 2),
        ("restore", "restored", CHAMPION, "2", "1", 3),
    ]
    restore = registry.read_audit(name)[-1]
    assert restore.reason == (
        "promote of v2 failed after the alias moved (OSError: disk full); champion restored to v1"
    )
    assert restore.verdict == "promote to champion: ok"
    assert registry.previous_champion(name) is None  # the failed move is no champion
    assert registry.audit_problems(registry.read_audit(name)) == []


def test_failed_first_promotion_leaves_no_champion(name: str):
    with pytest.raises(RuntimeError, match="boom"):
        promote(name, "1", after_move=lambda: (_ for _ in ()).throw(RuntimeError("boom")))

    assert aliases(name) == {}
    assert trail(name) == [("restore", "restored", CHAMPION, "1", "", 1)]
    assert registry.read_audit(name)[0].reason.endswith("champion restored to no champion")


def test_stale_verdict_moves_nothing(name: str):
    promote(name, "1")
    promote(name, "2", expected_champion="1")
    with pytest.raises(registry.StaleChampionError, match="champion is v2, but the verdict for v3"):
        promote(name, "3", expected_champion="1")
    assert aliases(name) == {CHAMPION: "2"}
    assert len(registry.read_audit(name)) == 2


def test_rollback_walks_back_along_the_trail_and_the_trail_keeps_everything(name: str):
    for version in ("1", "2", "3"):
        promote(name, version)
    with pytest.raises(OSError):  # a failed attempt in between changes nothing
        promote(name, "1", after_move=lambda: (_ for _ in ()).throw(OSError("x")))
    assert registry.previous_champion(name) == "2"

    back = promote(name, "2", action="rollback", reason="v3 mislabels sarcasm")
    assert (back.from_version, back.to_version, back.action) == ("3", "2", "rollback")
    assert aliases(name) == {CHAMPION: "2"}
    assert registry.previous_champion(name) == "1"  # again: further back, not forth

    promote(name, "1", action="rollback", reason="still bad")
    assert aliases(name) == {CHAMPION: "1"}
    assert registry.previous_champion(name) is None
    assert trail(name) == [
        ("promote", "done", CHAMPION, "", "1", 1),
        ("promote", "done", CHAMPION, "1", "2", 2),
        ("promote", "done", CHAMPION, "2", "3", 3),
        ("restore", "restored", CHAMPION, "1", "3", 4),
        ("rollback", "done", CHAMPION, "3", "2", 5),
        ("rollback", "done", CHAMPION, "2", "1", 6),
    ]
    assert registry.audit_problems(registry.read_audit(name)) == []


def _promote_in_child(root: str, name: str, version: str, lock_path: str, barrier) -> None:
    """One "flow": wait for the other, then promote under the shared file lock."""
    tracking.configure(Path(root))
    barrier.wait(timeout=120)
    registry.move_champion(
        name,
        version,
        actor=f"prefect-flow-run:{version}",
        reason="concurrent",
        verdict="promote to champion",
        lock=registry.file_lock(Path(lock_path)),
        after_move=lambda: time.sleep(0.3),  # widen the window between move and record
    )


def test_two_concurrent_promotions_under_a_lock_leave_one_champion_and_a_full_chain(
    name: str, model_store: dict[str, str], tmp_path: Path
):
    promote(name, "1")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    lock_path = str(tmp_path / "promote.lock")
    flows = [
        context.Process(
            target=_promote_in_child,
            args=(model_store["root"], name, version, lock_path, barrier),
        )
        for version in ("2", "3")
    ]
    for flow in flows:
        flow.start()
    for flow in flows:
        flow.join(timeout=300)
    assert [flow.exitcode for flow in flows] == [0, 0]

    entries = registry.read_audit(name)
    assert registry.audit_problems(entries) == []
    assert [e.sequence for e in entries] == [1, 2, 3]
    assert entries[0].to_version == "1"
    assert entries[1].from_version == "1"
    assert entries[2].from_version == entries[1].to_version  # one chain, whoever went first
    assert {entries[1].to_version, entries[2].to_version} == {"2", "3"}
    assert aliases(name) == {CHAMPION: entries[2].to_version}
    champions = [v.version for v in registry.list_versions(name) if CHAMPION in v.aliases]
    assert champions == [entries[2].to_version]


def test_without_a_lock_interleaved_promotions_break_the_chain(name: str, monkeypatch):
    """Why the lock matters: both read champion v1 before either moves the alias."""
    promote(name, "1")
    both_read = threading.Barrier(2, timeout=60)
    original = MlflowClient.set_registered_model_alias

    def after_both_read(self, model, alias, version):
        both_read.wait()
        return original(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", after_both_read)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda v: promote(name, v), ["2", "3"]))
    monkeypatch.undo()

    entries = registry.read_audit(name)
    assert [e.from_version for e in entries[1:]] == ["1", "1"]  # two moves away from v1
    assert any(
        "moved champion from v1 but the trail left it at" in p
        for p in (registry.audit_problems(entries))
    )


# --- refusals, stale verdicts decided again, orphaned runs ---------------------------------


def test_a_refusal_is_audited_moves_nothing_and_keeps_the_trail_clean(name: str):
    promote(name, "1")
    entry = registry.record_refusal(name, "1", "ana", "refused run r1: another kind", "refused")
    assert (entry.action, entry.status, entry.from_version, entry.to_version) == (
        "refuse",
        "refused",
        "1",
        "1",
    )
    promote(name, "2", expected_champion="1")
    assert trail(name) == [
        ("promote", "done", CHAMPION, "", "1", 1),
        ("refuse", "refused", CHAMPION, "1", "1", 2),
        ("promote", "done", CHAMPION, "1", "2", 3),
    ]
    assert registry.audit_problems(registry.read_audit(name)) == []
    assert registry.previous_champion(name) == "1"


def _verdict(alias: str):
    from pipeline.promotion import Criterion, PromotionVerdict

    passed = alias == CHAMPION
    criterion = Criterion("champion", passed, f"decided for {alias}")
    return PromotionVerdict(promote=passed, alias=alias, criteria=[criterion])


def _apply(name: str, verdict, champion: str, recompute, lock_dir: Path):
    import logging

    from pipeline.registration import apply_verdict

    def lock():  # a fresh lock per move: a file lock is used once
        return registry.file_lock(lock_dir / "promote.lock")

    return apply_verdict(
        name, "2", verdict, champion, "ana", lock, None, recompute, logging.getLogger("t")
    )


def test_a_stale_verdict_is_decided_again_against_the_champion_of_now(name: str, tmp_path):
    promote(name, "1")  # another run took champion while this one trained
    asked = []

    def recompute():
        asked.append(registry.resolve_version(f"{name}@{CHAMPION}").version)
        return "1", _verdict(CHALLENGER)

    applied = _apply(name, _verdict(CHAMPION), "", recompute, tmp_path)
    assert applied.alias == CHALLENGER and asked == ["1"]
    assert aliases(name) == {CHAMPION: "1", CHALLENGER: "2"}
    assert [t[:5] for t in trail(name)] == [
        ("promote", "done", CHAMPION, "", "1"),
        ("promote", "done", CHALLENGER, "", "2"),
    ]
    # Decided again, it beats the new champion: it takes champion from v1.
    promote(name, "3", expected_champion="1")
    applied = _apply(name, _verdict(CHAMPION), "1", lambda: ("3", _verdict(CHAMPION)), tmp_path)
    assert applied.promote and aliases(name) == {CHAMPION: "2"}
    assert registry.audit_problems(registry.read_audit(name)) == []


@pytest.mark.parametrize("alias", [CHAMPION, CHALLENGER])
def test_a_verdict_decided_again_refuses_another_kind_of_model_than_the_new_champion(
    name: str, model_store: dict[str, str], tmp_path: Path, alias: str
):
    """Two runs with other label sets under one name and no champion: the one that took
    champion first keeps it, the other gets no alias and leaves no version behind."""
    from functools import partial

    from pipeline import promotion, registration
    from pipeline.config import PromotionConfig

    sentiment = promotion.text_classifier_identity(LABELS)
    topics = promotion.text_classifier_identity(["business", "sport"])
    for key, value in sentiment.to_tags().items():
        MlflowClient().set_model_version_tag(name, "1", key, value)
    promote(name, "1")  # the sentiment run took champion while the topic run trained
    before = {v.version for v in MlflowClient().search_model_versions(f"name='{name}'")}

    def figures():  # never read: another kind of model is not compared on metrics
        raise AssertionError("the champion's figures were read")

    recompute = registration.decide_again(
        promotion.CandidateFigures("macro_f1", 0.99, None, [], {}),
        PromotionConfig(),
        figures,
        partial(registration.incompatibility, name, topics, "retune-news"),
    )
    with pytest.raises(registration.IncompatibleModel) as refused:
        registration.register_candidate(
            name,
            model_store["run_id"],
            model_store["model_uri"],
            topics.to_tags(),
            _verdict(alias),  # decided against no champion
            "",
            "ana",
            lambda: registry.file_lock(tmp_path / "promote.lock"),
            recompute=recompute,
        )

    assert refused.value.verdict.incompatible and refused.value.verdict.alias == "none"
    assert "labels [business, sport] differ from champion v1's [fresh, rotten]" in str(
        refused.value
    )
    assert "--set registry.model_name=retune-news" in str(refused.value)
    assert aliases(name) == {CHAMPION: "1"}
    after = {v.version for v in MlflowClient().search_model_versions(f"name='{name}'")}
    assert after == before  # the topic model's version was deleted again
    assert trail(name)[-1][:5] == ("refuse", "refused", CHAMPION, "1", "1")
    assert registry.audit_problems(registry.read_audit(name)) == []


def test_a_champion_that_keeps_changing_is_retried_a_bounded_number_of_times(name: str, tmp_path):
    from pipeline.registration import STALE_RETRIES

    promote(name, "1")
    calls = []

    def recompute():  # always against a champion that is no longer there
        calls.append(1)
        return "3", _verdict(CHAMPION)

    with pytest.raises(registry.StaleChampionError, match="changed 3 times"):
        _apply(name, _verdict(CHAMPION), "", recompute, tmp_path)
    assert len(calls) == STALE_RETRIES
    assert aliases(name) == {CHAMPION: "1"}


def test_another_kind_found_on_the_last_retry_is_a_refusal_not_a_stale_champion(
    name: str, tmp_path
):
    from pipeline.promotion import Criterion, PromotionVerdict, refuse_incompatible
    from pipeline.registration import STALE_RETRIES

    promote(name, "1")
    refusal = refuse_incompatible(Criterion("compatible", False, "labels differ"))
    answers = [("3", _verdict(CHAMPION))] * (STALE_RETRIES - 1) + [("1", refusal)]

    def recompute() -> tuple[str, PromotionVerdict]:
        return answers.pop(0)

    applied = _apply(name, _verdict(CHAMPION), "", recompute, tmp_path)
    assert applied.incompatible and answers == []
    assert aliases(name) == {CHAMPION: "1"}


def test_runs_whose_process_is_gone_are_marked_failed_others_stay(store: Path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    host = tracking.process_tags()[tag.HOST]
    dead = tracking.start_run(store, "exp", "dead", {tag.HOST: host, tag.PID: str(gone.pid)})
    alive = tracking.start_run(store, "exp", "alive", tracking.process_tags())
    elsewhere = tracking.start_run(
        store, "exp", "other host", {tag.HOST: "another-machine", tag.PID: str(gone.pid)}
    )
    orphans = tracking.mark_orphans("exp")
    assert [o.run_id for o in orphans] == [dead] and orphans[0].pid == gone.pid
    assert tracking.get_run(dead).status == "FAILED"
    assert (
        tracking.get_run(dead)
        .tags[tag.ORPHANED]
        .startswith(f"process {gone.pid} on {host} was gone")
    )
    assert tracking.get_run(alive).status == "RUNNING"
    assert tracking.get_run(elsewhere).status == "RUNNING"
    assert tracking.mark_orphans("exp") == [] and tracking.mark_orphans("no-such") == []


def test_a_signal_ends_a_run_killed_anything_else_failed():
    from prefect.exceptions import TerminationSignal

    assert tracking.end_status(TerminationSignal(15)) == "KILLED"
    assert tracking.end_status(KeyboardInterrupt()) == "KILLED"
    from pipeline.finetune import TrainingInterrupted

    assert tracking.end_status(TrainingInterrupted("checkpoint written")) == "KILLED"
    assert tracking.end_status(ValueError("bad")) == "FAILED"


# --- registering a candidate: the alias its verdict earns, all or nothing ----------------


def versions(name: str) -> list[str]:
    return [v.version for v in registry.list_versions(name)]


def _register(name: str, model_store: dict[str, str], verdict, lock, champion: str = "1"):
    from pipeline.registration import register_candidate

    return register_candidate(
        name,
        model_store["run_id"],
        model_store["model_uri"],
        {tag.DATA_MD5: "abc.dir"},
        verdict,
        champion,
        "prefect-flow-run:r2",
        lock,
    )


def test_a_registered_candidate_gets_its_alias_and_its_verdict_tag(
    name: str, model_store: dict[str, str], tmp_path: Path
):
    promote(name, "1")

    def lock():
        return registry.file_lock(tmp_path / "promote.lock")

    kept = _register(name, model_store, _verdict(CHALLENGER), lock)
    assert (kept.version, kept.aliases, kept.champion_version) == ("5", [CHALLENGER], "1")
    won = _register(name, model_store, _verdict(CHAMPION), lock)
    assert (won.version, won.aliases, won.champion_version) == ("6", [CHAMPION], "6")
    assert aliases(name) == {CHAMPION: "6", CHALLENGER: "5"}
    tags = MlflowClient().get_model_version(name, "6").tags
    assert tags[tag.POLICY] == "promote to champion: champion ok (decided for champion)"
    assert tags[tag.DATA_MD5] == "abc.dir"
    assert [t[:5] for t in trail(name)] == [
        ("promote", "done", CHAMPION, "", "1"),
        ("promote", "done", CHALLENGER, "", "5"),
        ("promote", "done", CHAMPION, "1", "6"),
    ]


def test_a_lock_that_fails_deletes_the_new_version_and_moves_nothing(
    name: str, model_store: dict[str, str]
):
    promote(name, "1")
    before = registry.read_audit(name)

    @contextlib.contextmanager
    def unreachable():
        raise ConnectionError("the Prefect API is unreachable")
        yield

    with pytest.raises(ConnectionError, match="unreachable"):
        _register(name, model_store, _verdict(CHAMPION), unreachable)
    assert versions(name) == ["4", "3", "2", "1"]  # v5 was created, then deleted
    assert aliases(name) == {CHAMPION: "1"}
    assert registry.read_audit(name) == before


def test_a_move_that_fails_after_the_alias_moved_restores_the_champion_and_deletes_the_version(
    name: str, model_store: dict[str, str], tmp_path: Path
):
    """The audit experiment deleted under a running flow: the alias moves, its record fails
    (AuditTrailError), the champion goes back to v1 and v5 is deleted again."""
    promote(name, "1")
    before = registry.read_audit(name)
    client = MlflowClient()
    audit = client.get_experiment_by_name(registry.AUDIT_EXPERIMENT).experiment_id
    moved_to = []
    original = MlflowClient.set_registered_model_alias

    def recording(self, model, alias, version):  # the real move, recorded
        moved_to.append((alias, str(version)))
        return original(self, model, alias, version)

    client.delete_experiment(audit)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(MlflowClient, "set_registered_model_alias", recording)
            with pytest.raises(registry.AuditTrailError, match="was deleted") as raised:
                _register(
                    name,
                    model_store,
                    _verdict(CHAMPION),
                    lambda: registry.file_lock(tmp_path / "promote.lock"),
                )
    finally:
        client.restore_experiment(audit)
    assert moved_to == [(CHAMPION, "5"), (CHAMPION, "1")]  # moved, then put back
    assert "the audit entry for the restore was not written" in "\n".join(raised.value.__notes__)
    assert versions(name) == ["4", "3", "2", "1"]
    assert aliases(name) == {CHAMPION: "1"}
    assert registry.read_audit(name) == before
    assert registry.audit_problems(registry.read_audit(name)) == []


def test_the_champion_of_now_is_read_from_its_run_or_evaluated(
    name: str, model_store: dict[str, str]
):
    from pipeline.registration import current_champion_figures, decide_again

    def never(loaded):
        raise AssertionError("the recorded metric should be used")

    assert current_champion_figures(name, "abc.dir", "macro_f1", never) is None
    promote(name, "1")
    client = MlflowClient()
    client.set_model_version_tag(name, "1", tag.DATA_MD5, "abc.dir")
    client.log_metric(model_store["run_id"], "test_macro_f1", 0.75)

    same = current_champion_figures(name, "abc.dir", "macro_f1", never)
    assert (same.version, same.metric, same.group_accuracy) == ("1", 0.75, {})

    seen = []

    def evaluate(loaded) -> float:  # another data version: the champion predicts again
        seen.append(loaded.predictor.labels)
        return 0.5

    other = current_champion_figures(name, "other.dir", "macro_f1", evaluate)
    assert (other.version, other.metric) == ("1", 0.5) and seen == [LABELS]

    from pipeline.config import PromotionConfig
    from pipeline.promotion import CandidateFigures

    candidate = CandidateFigures("macro_f1", 0.9, None, gates=[], group_accuracy={})
    champion, verdict = decide_again(candidate, PromotionConfig(), lambda: other)()
    assert champion == "1" and verdict.promote
    assert "test macro_f1 0.9000" in verdict.summary() and "0.5000" in verdict.summary()
