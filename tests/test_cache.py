"""pipeline.cache: an array is computed once per key, and a bad file is recomputed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import cache_path, cached_array

KEY = {"weights_sha256": "ab" * 32, "data_md5": "0123456789abcdef.dir", "max_length": "64"}


class Counting:
    """compute() for cached_array: a seeded (5, 3) float32 array; counts its calls."""

    def __init__(self, seed: int = 0):
        self.calls, self.seed = 0, seed

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return np.random.default_rng(self.seed).normal(size=(5, 3)).astype(np.float32)


def test_cached_array_equals_the_recomputation_and_computes_once(tmp_path: Path):
    compute = Counting()
    first = cached_array(tmp_path, KEY, compute)
    again = cached_array(tmp_path, dict(reversed(KEY.items())), compute)  # order is no part
    assert compute.calls == 1
    np.testing.assert_array_equal(again, Counting()())
    assert again.dtype == np.float32 and again.shape == (5, 3)
    np.testing.assert_array_equal(first, again)
    assert [p.name for p in tmp_path.iterdir()] == [cache_path(tmp_path, KEY).name]


@pytest.mark.parametrize("part", sorted(KEY))
def test_a_changed_key_part_recomputes(tmp_path: Path, part: str):
    cached_array(tmp_path, KEY, Counting(0))
    other = Counting(1)
    changed = cached_array(tmp_path, KEY | {part: KEY[part] + "x"}, other)
    assert other.calls == 1
    np.testing.assert_array_equal(changed, Counting(1)())
    np.testing.assert_array_equal(cached_array(tmp_path, KEY, Counting(2)), Counting(0)())
    assert len(list(tmp_path.iterdir())) == 2


def test_an_added_key_part_recomputes(tmp_path: Path):
    cached_array(tmp_path, KEY, Counting(0))
    added = Counting(1)
    cached_array(tmp_path, KEY | {"split": "train"}, added)
    assert added.calls == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # torn write
        lambda data: b"",  # empty file
        lambda data: b"not an npy file at all",
        lambda data: data[:10],  # header cut
    ],
    ids=["truncated", "empty", "garbage", "header-only"],
)
def test_a_corrupt_file_is_recomputed_and_replaced(tmp_path: Path, damage):
    cached_array(tmp_path, KEY, Counting())
    path = cache_path(tmp_path, KEY)
    path.write_bytes(damage(path.read_bytes()))
    compute = Counting()
    repaired = cached_array(tmp_path, KEY, compute)
    assert compute.calls == 1
    np.testing.assert_array_equal(repaired, Counting()())
    np.testing.assert_array_equal(np.load(path), Counting()())  # the file is whole again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_an_object_array_from_disk_is_not_unpickled(tmp_path: Path):
    path = cache_path(tmp_path, KEY)
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    compute = Counting()
    np.testing.assert_array_equal(cached_array(tmp_path, KEY, compute), Counting()())
    assert compute.calls == 1


def test_the_cache_folder_is_created(tmp_path: Path):
    folder = tmp_path / "a" / "b"
    cached_array(folder, KEY, Counting())
    assert cache_path(folder, KEY).is_file()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ({}, "a cache key needs at least one part"),
        ({"data_md5": "x", "max_length": 64}, "cache key parts must be strings; not: max_length"),
    ],
)
def test_bad_keys_are_refused(tmp_path: Path, key, message):
    with pytest.raises(ValueError, match=message):
        cached_array(tmp_path, key, Counting())
    assert not any(tmp_path.iterdir())


def test_object_results_are_refused_and_nothing_is_written(tmp_path: Path):
    with pytest.raises(ValueError, match="stores numeric arrays; compute returned object"):
        cached_array(tmp_path, KEY, lambda: np.array(["a", None], dtype=object))
    assert not any(tmp_path.iterdir())


def test_a_json_value_is_computed_once_per_key_and_a_torn_file_recomputed(tmp_path: Path):
    from pipeline.cache import cache_path, cached_json

    calls = []

    def compute() -> list[str]:
        calls.append(1)
        return ["Sichern", "Löschen"]

    assert cached_json(tmp_path, KEY, compute) == ["Sichern", "Löschen"]
    assert cached_json(tmp_path, KEY, compute) == ["Sichern", "Löschen"] and len(calls) == 1
    cached_json(tmp_path, KEY | {"max_length": "128"}, compute)  # another key
    assert len(calls) == 2
    cache_path(tmp_path, KEY, ".json").write_text('["Sich')  # torn
    assert cached_json(tmp_path, KEY, compute) == ["Sichern", "Löschen"] and len(calls) == 3
    assert not list(tmp_path.glob(".*.tmp"))
