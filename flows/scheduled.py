"""Scheduled retraining: retrain only when the data changed, then the whole flow.

Deployed with ``retune deploy`` (a Prefect deployment on a work pool) or served with
``retune serve``; runs of one deployment never overlap (concurrency limit 1).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.retrain import retrain
from pipeline import data, registry, tracking, versioning
from pipeline import tags as tag
from pipeline.config import EXAMPLE_SOURCE, RetuneConfig, load_config

SKIPPED = "skipped"


@dataclass(frozen=True)
class ScheduledOutcome:
    action: str  # "retrained" or "skipped"
    reason: str
    data_md5: str
    champion_data_md5: str | None
    mlflow_run_id: str | None
    version: str | None = None


def current_data_md5(config: RetuneConfig, project_dir: Path) -> str:
    """The DVC md5 the configured data would be versioned as, without versioning it.

    A dataset already in data.dvc (``dataset:NAME``, or the pinned example) is read from
    there; a source file is prepared and hashed exactly as an import would write it.
    """
    name = data.dataset_name(config.data)
    recorded = versioning.recorded_datasets(project_dir / f"{config.data.data_dir}.dvc")
    if config.data.source.startswith(data.DATASET_PREFIX) or (
        config.data.source == EXAMPLE_SOURCE and name in recorded
    ):
        if name not in recorded:
            raise data.DataError(f"dataset '{name}' is not recorded in data.dvc")
        return recorded[name].md5
    frames = data.prepare_frames(config.data, project_dir)
    staged = versioning.stage_folder(project_dir)
    try:
        data.write_splits(frames, staged)
        return versioning.folder_md5(staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def champion_data_md5(model_name: str) -> str | None:
    try:
        champion = registry.resolve_version(f"{model_name}@{registry.CHAMPION}")
    except registry.ModelRefError:
        return None
    return champion.tags.get(tag.DATA_MD5)


@flow(name="scheduled-retrain", log_prints=True)
def scheduled_retrain(
    config_path: str = "retune.yaml", project_dir: str = ".", retrain_always: bool = False
) -> dict[str, Any]:
    """Retrain if the data changed since the champion was trained (or ``retrain_always``).

    A skipped run is recorded as an MLflow run tagged ``retune.verdict=skipped`` with the
    reason. A refused or failed retraining fails this flow run (non-zero exit, no alias
    moved, every report kept).
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    path = root / config_path
    config = load_config(path if path.is_file() else None)
    uri = tracking.configure(root, os.environ.get("MLFLOW_TRACKING_URI"))
    md5 = current_data_md5(config, root)
    champion_md5 = champion_data_md5(registry.model_name(config))
    if champion_md5 == md5 and not retrain_always:
        reason = f"data unchanged since the champion was trained (md5 {md5})"
        logger.info("skipping retraining: %s", reason)
        run_key = str(flow_run.id or "local")
        run_id = tracking.start_run(
            root,
            config.registry.experiment,
            f"scheduled-{run_key[:8]}",
            {
                tag.VERDICT: SKIPPED,
                tag.SKIP_REASON: reason,
                tag.DATA_MD5: md5,
                tag.FLOW_RUN: run_key,
            },
        )
        tracking.end_run(run_id)
        return asdict(ScheduledOutcome(SKIPPED, reason, md5, champion_md5, run_id))
    reason = (
        "retrain_always is set"
        if champion_md5 == md5
        else f"data changed: {md5} vs the champion's {champion_md5 or '(no champion)'}"
    )
    logger.info("retraining: %s", reason)
    summary = retrain(config, str(root), uri)
    return asdict(
        ScheduledOutcome(
            "retrained",
            reason,
            summary.data_md5,
            champion_md5,
            summary.mlflow_run_id,
            summary.version,
        )
    )
