"""The lock every promotion of a model takes: a file lock beside the embedded store, or a
Prefect global concurrency limit that every machine sharing the servers sees."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pipeline import registry

PROMOTION_LIMIT_PREFIX = "retune-promote-"


def promotion_lock(
    project_dir: Path, tracking_uri: str | None, name: str
) -> contextlib.AbstractContextManager[Any]:
    """The lock every promotion of ``name`` takes: a file lock beside the embedded store, or
    a Prefect global concurrency limit (``retune-promote-NAME``, limit 1) with a server."""
    if tracking_uri is None or tracking_uri.startswith("sqlite:"):
        return registry.file_lock(project_dir / "mlflow" / f"promote-{name}.lock")
    from prefect.concurrency.sync import concurrency

    return concurrency(ensure_promotion_limit(name), occupy=1, strict=True)


def ensure_promotion_limit(model_name: str) -> str:
    """The Prefect global concurrency limit promotions of a model take, created if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = f"{PROMOTION_LIMIT_PREFIX}{model_name}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass
    return name
