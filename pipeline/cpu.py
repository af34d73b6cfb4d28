"""CPU threads from the cores this process may really use, and a wait policy that shares.

torch sizes its OpenMP pool from the host, and its threads spin while they wait for work.
On cores shared with another job (a CI runner, a Kubernetes pod with a CPU limit, a
scheduled run beside a manual one) the spinning threads take the cores the other job
needs, and both slow down far more than sharing explains (bench/threads.py measures it).
So retune counts the cores it may use (CPU affinity and the cgroup CPU quota, never the
host's count) and has OpenMP threads sleep instead of spin while they wait.

The wait policy is an environment variable that OpenMP reads once, when it loads (with
torch): :data:`WAIT_POLICY_ENV` is applied by the CLI before heavy imports and passed to
torchrun workers. The thread count is applied by :func:`set_cpu_threads` at every entry
point that computes. The readers take their roots as parameters so tests use real files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

PROC_SELF = Path("/proc/self")
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Measured by bench/threads.py (bench/README.md): two trainings on the same cores keep
# the whole machine busy instead of a third of it; a user's own value wins.
WAIT_POLICY_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
BYPASS = "set train.num_threads (or OMP_NUM_THREADS) to skip reading the cgroup"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:  # missing file, a folder, no permission: no limit known there
        return None


def read_cpu_max(path: Path) -> float | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` file ("QUOTA PERIOD" in µs), None if no limit.

    Raises:
        ValueError: the file holds something other than "max PERIOD" or "QUOTA PERIOD".
    """
    text = _read(path)
    if text is None:
        return None
    fields = text.split()
    if (
        len(fields) != 2
        or not fields[1].isdigit()
        or not (fields[0] == "max" or fields[0].isdigit())
    ):
        raise ValueError(
            f"{path}: expected 'max PERIOD' or 'QUOTA PERIOD' (µs), found {text!r}; {BYPASS}"
        )
    if fields[0] == "max" or int(fields[1]) == 0:
        return None
    return int(fields[0]) / int(fields[1])


def read_cfs_quota(folder: Path) -> float | None:
    """Cores allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None if none.

    Raises:
        ValueError: either file holds something other than an integer.
    """
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        raise ValueError(
            f"{folder}: cpu.cfs_quota_us and cpu.cfs_period_us must be integers (µs), "
            f"found {quota!r} and {period!r}; {BYPASS}"
        ) from None
    if quota_us <= 0 or period_us <= 0:  # -1: no quota
        return None
    return quota_us / period_us


def _own_cgroups(proc_self: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and its v1 ``cpu`` controller path, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (_read(proc_self / "cgroup") or "").splitlines():
        parts = line.split(":", 2)  # "ID:CONTROLLERS:PATH"
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _limits_up_to(folder: Path, root: Path, read: Callable[[Path], float | None]) -> list[float]:
    """Quotas of ``folder`` and each parent up to ``root``: a parent's limit binds too."""
    found = []
    while True:
        limit = read(folder)
        if limit is not None:
            found.append(limit)
        if folder == root or root not in folder.parents:
            return found
        folder = folder.parent


def cgroup_cpu_limit(proc_self: Path = PROC_SELF, cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (1.5 for 150 ms per 100 ms), or None.

    Reads the process's own cgroup from ``proc_self/cgroup``, then cgroup v2 ``cpu.max``
    (under ``cgroup_root``, or ``cgroup_root/unified`` on a hybrid host) and v1
    ``cpu.cfs_quota_us`` (under ``cgroup_root/cpu`` or ``cgroup_root/cpu,cpuacct``) for that
    cgroup and its parents; the smallest limit wins. A cgroup path that is not there (a
    container that sees its host-side path) falls back to the mount's own root.
    """
    v2, v1 = _own_cgroups(proc_self)
    limits: list[float] = []
    if v2 is not None:
        for mount in (cgroup_root, cgroup_root / "unified"):
            if (mount / "cgroup.controllers").is_file():
                limits += _limits_up_to(
                    _inside(mount, v2), mount, lambda f: read_cpu_max(f / "cpu.max")
                )
                break
    if v1 is not None:
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            mount = cgroup_root / name
            if (mount / "cpu.cfs_quota_us").is_file():
                limits += _limits_up_to(_inside(mount, v1), mount, read_cfs_quota)
                break
    return min(limits) if limits else None


def _inside(mount: Path, cgroup: str) -> Path:
    folder = mount / cgroup.lstrip("/")
    return folder if folder.is_dir() else mount


def affinity_cores() -> int:
    """How many cores this process may be scheduled on (``os.sched_getaffinity``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows: no affinity call
        return os.cpu_count() or 1


def usable_cores(
    affinity: int | None = None, proc_self: Path = PROC_SELF, cgroup_root: Path = CGROUP_ROOT
) -> int:
    """Cores this process may really use: its affinity, capped by the cgroup quota rounded down.

    Args:
        affinity: the affinity core count (default: :func:`affinity_cores`).

    Returns:
        At least 1: a quota of 1.5 cores on 2 gives 1, a quota of 0.5 gives 1.
    """
    cores = affinity if affinity is not None else affinity_cores()
    quota = cgroup_cpu_limit(proc_self, cgroup_root)
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(1, cores)


def thread_count(
    override: int | None = None,
    workers: int = 1,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> int:
    """Threads for one process: ``override`` (``train.num_threads``), else the user's
    ``OMP_NUM_THREADS``, else the usable cores shared among ``workers`` processes.

    Raises:
        ValueError: ``OMP_NUM_THREADS`` is set but is not a positive integer.
    """
    if override:
        return override
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        value = environ["OMP_NUM_THREADS"].split(",")[0].strip()  # "4,2": outer level first
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']!r} is not a positive integer; "
                "unset it or set e.g. OMP_NUM_THREADS=2 (or train.num_threads)"
            )
        return int(value)
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, workers))


def set_cpu_threads(override: int | None = None) -> int:
    """Size torch's intra-op pool for this process (see :func:`thread_count`); returns it.

    Call at each entry point that computes, before the first torch operation. Under
    torchrun the usable cores are shared among the node's processes (``LOCAL_WORLD_SIZE``).
    """
    import torch

    workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = thread_count(override, workers)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def worker_env(nproc_per_node: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for ``nproc_per_node`` worker processes on this node.

    Adds the wait policy and ``OMP_NUM_THREADS`` (the usable cores shared among the
    processes; torchrun would otherwise set 1) where the user has not set them.
    """
    env = dict(os.environ if environ is None else environ)
    for key, value in WAIT_POLICY_ENV.items():
        env.setdefault(key, value)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // max(1, nproc_per_node)))
    return env
