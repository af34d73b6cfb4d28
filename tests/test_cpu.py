"""Usable cores from real affinity and cgroup files, and what a retune process gets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.cpu import (
    WAIT_POLICY_ENV,
    cgroup_cpu_limit,
    read_cpu_max,
    set_cpu_threads,
    thread_count,
    usable_cores,
    worker_env,
)

REPO = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_", "GOMP_", "KMP_", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def cgroup_v2(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self and a unified cgroup mount: ``limits`` maps cgroup folder -> cpu.max."""
    proc, root = tmp_path / "proc-self", tmp_path / "cgroup"
    write(proc / "cgroup", f"0::{own}\n")
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for folder, cpu_max in limits.items():
        write(root / folder.lstrip("/") / "cpu.max", cpu_max + "\n")
    return proc, root


def cgroup_v1(tmp_path: Path, own: str, quota: int, period: int = 100000) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc-self", tmp_path / "cgroup"
    write(proc / "cgroup", f"5:memory:/x\n4:cpu,cpuacct:{own}\n0::/\n")
    folder = root / "cpu,cpuacct" / own.lstrip("/")
    write(folder / "cpu.cfs_quota_us", f"{quota}\n")
    write(folder / "cpu.cfs_period_us", f"{period}\n")
    if folder != root / "cpu,cpuacct":  # the mount's root has no quota
        write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
        write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    return proc, root


def clean_env() -> dict[str, str]:
    """This environment without the OpenMP settings the shell may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith(THREAD_VARS)}


# --- cgroup v2 ---------------------------------------------------------------------------


def test_v2_quota_of_one_and_a_half_cores_leaves_one_of_two(tmp_path):
    proc, root = cgroup_v2(tmp_path, "/ci.slice/job-7", {"/ci.slice/job-7": "150000 100000"})
    assert cgroup_cpu_limit(proc, root) == 1.5
    assert usable_cores(affinity=2, proc_self=proc, cgroup_root=root) == 1


def test_v2_max_is_no_quota(tmp_path):
    proc, root = cgroup_v2(tmp_path, "/ci.slice/job-7", {"/ci.slice/job-7": "max 100000"})
    assert cgroup_cpu_limit(proc, root) is None
    assert usable_cores(affinity=2, proc_self=proc, cgroup_root=root) == 2


def test_v2_a_parent_limit_binds_and_the_smallest_wins(tmp_path):
    proc, root = cgroup_v2(
        tmp_path,
        "/kubepods/pod-a/c1",
        {
            "/kubepods": "800000 100000",
            "/kubepods/pod-a": "300000 100000",
            "/kubepods/pod-a/c1": "max 100000",
        },
    )
    assert cgroup_cpu_limit(proc, root) == 3.0
    assert usable_cores(affinity=16, proc_self=proc, cgroup_root=root) == 3
    assert usable_cores(affinity=2, proc_self=proc, cgroup_root=root) == 2  # affinity smaller


def test_v2_quota_below_one_core_still_gives_one_thread(tmp_path):
    proc, root = cgroup_v2(tmp_path, "/", {"/": "50000 100000"})  # a container's own root
    assert cgroup_cpu_limit(proc, root) == 0.5
    assert usable_cores(affinity=4, proc_self=proc, cgroup_root=root) == 1


def test_v2_in_a_hybrid_hierarchy_is_read_under_unified(tmp_path):
    proc = tmp_path / "proc-self"
    write(proc / "cgroup", "1:name=systemd:/\n0::/job\n")
    root = tmp_path / "cgroup"
    write(root / "unified" / "cgroup.controllers", "cpu\n")
    write(root / "unified" / "job" / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(proc, root) == 2.0


def test_a_malformed_cpu_max_names_the_file(tmp_path):
    path = write(tmp_path / "cpu.max", "lots\n")
    with pytest.raises(ValueError, match=r"cpu\.max: expected 'max PERIOD' or 'QUOTA PERIOD'"):
        read_cpu_max(path)
    with pytest.raises(ValueError, match=r"set train\.num_threads \(or OMP_NUM_THREADS\)"):
        read_cpu_max(path)


# --- cgroup v1 ---------------------------------------------------------------------------


def test_v1_cfs_quota_caps_the_cores(tmp_path):
    proc, root = cgroup_v1(tmp_path, "/docker/abc", quota=250000)
    assert cgroup_cpu_limit(proc, root) == 2.5
    assert usable_cores(affinity=8, proc_self=proc, cgroup_root=root) == 2


def test_v1_quota_minus_one_is_no_quota(tmp_path):
    proc, root = cgroup_v1(tmp_path, "/docker/abc", quota=-1)
    assert cgroup_cpu_limit(proc, root) is None
    assert usable_cores(affinity=8, proc_self=proc, cgroup_root=root) == 8


def test_v1_host_side_path_missing_inside_a_container_reads_the_mount_root(tmp_path):
    # Without a cgroup namespace /proc/self/cgroup shows the host's path, but the container
    # mounts its own cgroup as the root of cpu,cpuacct.
    proc, root = cgroup_v1(tmp_path, "/", quota=100000)
    write(proc / "cgroup", "4:cpu,cpuacct:/docker/0123abcd\n")
    assert cgroup_cpu_limit(proc, root) == 1.0


def test_no_cgroup_information_leaves_the_affinity(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "no-proc", tmp_path / "no-cgroup") is None
    assert usable_cores(affinity=3, proc_self=tmp_path / "no-proc", cgroup_root=tmp_path) == 3


def test_non_integer_v1_quota_names_the_folder(tmp_path):
    proc, root = cgroup_v1(tmp_path, "/job", quota=100000)
    write(root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "abc\n")
    with pytest.raises(ValueError, match=r"job: cpu.cfs_quota_us and cpu.cfs_period_us must"):
        cgroup_cpu_limit(proc, root)


# --- thread count ------------------------------------------------------------------------


def test_thread_count_order_override_then_omp_num_threads_then_cores_per_worker():
    assert thread_count(3, environ={"OMP_NUM_THREADS": "5"}, cores=8) == 3
    assert thread_count(None, environ={"OMP_NUM_THREADS": "5"}, cores=8) == 5
    assert thread_count(None, environ={}, cores=8) == 8
    assert thread_count(None, workers=3, environ={}, cores=8) == 2
    assert thread_count(None, workers=4, environ={}, cores=2) == 1
    assert thread_count(None, environ={"OMP_NUM_THREADS": "4,2"}, cores=8) == 4  # nested


def test_a_bad_omp_num_threads_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"OMP_NUM_THREADS='two' is not a positive integer"):
        thread_count(None, environ={"OMP_NUM_THREADS": "two"}, cores=2)


def test_set_cpu_threads_sizes_torch_and_the_override_wins(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        assert set_cpu_threads() == usable_cores() == torch.get_num_threads()
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_worker_env_adds_the_wait_policy_and_shares_the_cores_but_keeps_the_users():
    env = worker_env(2, environ={"PATH": "/bin"})
    assert env["OMP_WAIT_POLICY"] == WAIT_POLICY_ENV["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_NUM_THREADS"] == str(max(1, usable_cores() // 2))
    assert env["PATH"] == "/bin"
    mine = worker_env(2, environ={"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3"})
    assert (mine["OMP_WAIT_POLICY"], mine["OMP_NUM_THREADS"]) == ("ACTIVE", "3")


# --- real processes ----------------------------------------------------------------------

# What the CLI does before any command's heavy imports, then the first torch use.
ENTRY = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from flows.cli import set_runtime_defaults
    set_runtime_defaults(Path(sys.argv[1]))
    import torch
    from pipeline.cpu import set_cpu_threads
    print(os.environ["OMP_WAIT_POLICY"], set_cpu_threads(), torch.get_num_threads())
    """
)


def run_entry(
    tmp_path: Path, env: dict[str, str], one_core: bool = False
) -> subprocess.CompletedProcess:
    """The entry in a new process; ``one_core`` pins it (as ``taskset -c``) to one CPU."""
    env = env | {"PYTHONPATH": str(REPO), "OMP_DISPLAY_ENV": "true"}  # libgomp prints its ICVs
    cpu = min(os.sched_getaffinity(0))
    return subprocess.run(
        [sys.executable, "-c", ENTRY, str(tmp_path)],
        preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if one_core else None,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_a_retune_process_pinned_to_one_core_gets_one_thread_and_the_passive_policy(tmp_path):
    done = run_entry(tmp_path, clean_env(), one_core=True)
    assert done.stdout.split() == ["PASSIVE", "1", "1"]
    # OpenMP itself read the policy: it was set before torch loaded libgomp.
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in done.stderr


def test_affinity_smaller_than_cpu_count_is_what_counts(tmp_path):
    # One CPU of those this process may use: the host's count stays, the affinity is one.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from pipeline.cpu import affinity_cores, usable_cores; "
        "print(os.cpu_count(), affinity_cores(), usable_cores())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env() | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    host, affinity, usable = map(int, done.stdout.split())
    assert host == os.cpu_count() and affinity == 1 and usable == 1
    assert host >= 2  # on CI and here (2 cores): the affinity, not the host, counts


def test_the_users_own_wait_policy_wins(tmp_path):
    done = run_entry(tmp_path, clean_env() | {"OMP_WAIT_POLICY": "ACTIVE"})
    assert done.stdout.split()[0] == "ACTIVE"
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in done.stderr


def test_torchrun_workers_get_the_wait_policy_and_share_the_cores(tmp_path):
    script = write(
        tmp_path / "probe.py",
        "import os\nfrom pipeline.cpu import set_cpu_threads\n"
        "print(os.environ['RANK'], os.environ['OMP_WAIT_POLICY'], set_cpu_threads(), flush=True)\n",
    )
    env = worker_env(2, environ=clean_env() | {"PYTHONPATH": str(REPO)})
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    lines = sorted(line.split() for line in done.stdout.splitlines() if line.strip())
    per_process = str(max(1, usable_cores() // 2))
    assert lines == [["0", "PASSIVE", per_process], ["1", "PASSIVE", per_process]]
