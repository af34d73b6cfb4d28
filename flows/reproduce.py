"""Reproduce a registered version: restore its exact data, retrain with its config, compare."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from flows.retrain import evaluate_model, train_model
from pipeline import data, lineage, retention, tasks, versioning
from pipeline.config import IMAGE_CLASSIFICATION, RetuneConfig
from pipeline.run_record import headline_metrics

# What must match exactly on CPU for a run to count as reproduced: the kind's test metrics
# (``test_<metric>``), the best epoch and the tuned model's score on every retention task
# (``retention_<task>``), as far as the run recorded them.


@dataclass(frozen=True)
class Reproduction:
    model: str
    version: str
    data_dvc_md5: str
    dataset: str
    recorded: dict[str, float]
    reproduced: dict[str, float]
    code_commit_then: str
    code_commit_now: str

    @property
    def matches(self) -> bool:
        """Every recorded figure reproduced, and there was something to compare."""
        return "best_epoch" in self.recorded and all(
            self.recorded.get(k) == self.reproduced.get(k) for k in self.recorded
        )


@flow(name="reproduce")
def reproduce(ref: str, project_dir: str = ".", tracking_uri: str | None = None) -> Reproduction:
    """Restore the data a version was trained on, retrain with its recorded config, compare.

    Nothing is registered; ``data/`` and ``data.dvc`` are not touched.
    """
    from pipeline import tracking

    logger = get_run_logger()
    root = Path(project_dir).resolve()
    tracking.configure(root, tracking_uri)
    trace = lineage.trace(ref)
    if trace.data_dvc_md5 == "unknown" or not trace.run_id:
        raise versioning.DataVersionError(f"{ref} records no data version: cannot reproduce it")
    config = RetuneConfig.model_validate(trace.config)
    work = root / "runs" / f"reproduce-{trace.model}-{trace.version}"
    shutil.rmtree(work, ignore_errors=True)
    folder = versioning.restore_dataset(
        root, trace.data_dvc_md5, trace.dataset, work / "data" / trace.dataset
    )
    restored = versioning.folder_md5(folder)
    if restored != trace.data_md5:
        raise versioning.DataVersionError(
            f"restored data hashes to {restored}, but {ref} records {trace.data_md5}"
        )
    logger.info("restored %s (%s) from DVC into %s", trace.dataset, restored, folder)
    # The restored copy is the data: a kind that reads files beside the tables (images)
    # finds them there, not in data/, which may hold a later version.
    data_dir = (work / "data").relative_to(root).as_posix()
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"data_dir": data_dir})}
    )
    frames = data.read_splits(folder)
    train = data.subsample(frames["train"], config.train.max_train_samples, config.train.seed)
    test = data.subsample(frames["test"], config.evaluate.max_test_samples, config.train.seed)
    trained = train_model(config, train, frames["validation"], None, work / "model", root)
    restored_suite = None
    if config.task != IMAGE_CLASSIFICATION:  # images: built from pinned packages, no DVC
        suite_folder = versioning.restore_dataset(
            root, trace.data_dvc_md5, retention.SUITE_NAME, work / "suite"
        )
        restored_suite = retention.Suite(
            retention.load_suite(suite_folder),
            versioning.folder_md5(suite_folder),
            [],
            suite_folder,
        )
    suite = tasks.get(config.task).retention_suite(config, root, restored_suite)
    evaluation = evaluate_model(config, trained, test, suite, root)
    shutil.rmtree(work / "model", ignore_errors=True)
    reproduced = {
        **{f"test_{k}": v for k, v in headline_metrics(evaluation.report).items()},
        "best_epoch": float(trained.result.best_epoch),
    } | {f"retention_{name}": out.score for name, out in evaluation.retention.outputs.items()}
    return Reproduction(
        model=trace.model,
        version=trace.version,
        data_dvc_md5=trace.data_dvc_md5,
        dataset=trace.dataset,
        recorded={k: trace.metrics[k] for k in reproduced if k in trace.metrics},
        reproduced=reproduced,
        code_commit_then=trace.git_commit,
        code_commit_now=lineage.git_state(root).commit,
    )
