"""Arrays that depend only on their inputs, cached on disk (one ``.npy`` file per key).

What a run computes from the base model and the data alone (the base probe's embeddings of
the training split, say) is the same on the next run with the same weights and data. The
key names every input (``{"weights_sha256": ..., "data_md5": ..., "max_length": "64"}``);
the file is named by a hash of the sorted key, so a changed part is a new file and an old
one is never served for it. Writes are atomic (a temporary file, then a rename), so runs
sharing a cache folder never read half a file; a file that does not load is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def texts_md5(texts: list[str]) -> str:
    """md5 of a list of texts, in order (a cache key part)."""
    return hashlib.md5("\x1e".join(texts).encode("utf-8")).hexdigest()


def cache_path(cache_dir: Path, key: Mapping[str, str], suffix: str = ".npy") -> Path:
    """The file that holds the array for ``key`` (order of the key's parts does not matter).

    Raises:
        ValueError: an empty key, or a part that is not a string.
    """
    if not key:
        raise ValueError("a cache key needs at least one part (e.g. the base weights' sha256)")
    bad = sorted(name for name, value in key.items() if not isinstance(value, str))
    if bad:
        raise ValueError(f"cache key parts must be strings; not: {', '.join(bad)}")
    digest = hashlib.sha256(json.dumps(sorted(key.items())).encode()).hexdigest()
    return cache_dir / f"{digest[:32]}{suffix}"


def cached_array(
    cache_dir: Path, key: Mapping[str, str], compute: Callable[[], np.ndarray]
) -> np.ndarray:
    """The cached array for ``key``, or ``compute()``'s, saved for the next call.

    Args:
        cache_dir: folder of the cache files (created when first needed).
        key: every input the array depends on, by name; all strings.
        compute: makes the array when the cache has none (or an unreadable one).

    Raises:
        ValueError: a bad key (see :func:`cache_path`), or ``compute`` returned object data.
    """
    path = cache_path(cache_dir, key)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        pass  # absent, or torn or foreign: recompute and replace it
    array = np.asarray(compute())
    if array.dtype.hasobject:
        raise ValueError(f"cached_array stores numeric arrays; compute returned {array.dtype}")
    _write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))
    return array


def cached_json(cache_dir: Path, key: Mapping[str, str], compute: Callable[[], Any]) -> Any:
    """As :func:`cached_array`, for a JSON value (a list of answers, a report's fields)."""
    path = cache_path(cache_dir, key, ".json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # absent, or torn or foreign: recompute and replace it
    value = compute()
    text = json.dumps(value, ensure_ascii=False).encode("utf-8")
    _write_atomic(path, lambda f: f.write(text))
    return value


def _write_atomic(path: Path, write: Callable[[Any], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)  # atomic on one file system
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
