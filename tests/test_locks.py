"""The promotion lock: a file lock beside the embedded store, a Prefect global concurrency
limit on a real (temporary) Prefect API with a tracking server."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.locks import ensure_promotion_limit, promotion_lock

SERVER_URI = "http://127.0.0.1:5000"  # any tracking server: the lock is Prefect's then


def _hold_both(lock, hold_s: float = 0.4) -> list[tuple[float, float]]:
    """Two threads take ``lock()`` at once, each holding it ``hold_s``; their spans, sorted."""
    both = threading.Barrier(2, timeout=60)
    spans: list[tuple[float, float]] = []

    def hold(_: int) -> None:
        both.wait()
        with lock():
            start = time.monotonic()
            time.sleep(hold_s)
            spans.append((start, time.monotonic()))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(hold, range(2)))
    return sorted(spans)


def test_with_the_embedded_store_the_lock_is_a_file_lock_that_never_overlaps(tmp_path: Path):
    name = "retune-reviews"
    spans = _hold_both(lambda: promotion_lock(tmp_path, None, name))
    assert spans[0][1] <= spans[1][0]
    assert (tmp_path / "mlflow" / f"promote-{name}.lock").is_file()
    sqlite = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    spans = _hold_both(lambda: promotion_lock(tmp_path, sqlite, name), 0.1)
    assert spans[0][1] <= spans[1][0]


@pytest.mark.integration
def test_with_a_server_the_lock_is_a_prefect_limit_of_one_that_never_overlaps(
    prefect_harness: str, tmp_path: Path
):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    model = f"m-{uuid.uuid4().hex[:8]}"
    limit_name = f"retune-promote-{model}"
    with get_client(sync_client=True) as client:
        with pytest.raises(ObjectNotFound):
            client.read_global_concurrency_limit_by_name(limit_name)

    spans = _hold_both(lambda: promotion_lock(tmp_path, SERVER_URI, model))

    assert len(spans) == 2 and spans[0][1] <= spans[1][0]  # one holder at a time
    assert not (tmp_path / "mlflow").exists()  # no file lock was taken
    assert ensure_promotion_limit(model) == limit_name  # found, not created twice
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name)
        named = [g for g in client.read_global_concurrency_limits() if g.name == limit_name]
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)  # all released
    assert len(named) == 1
