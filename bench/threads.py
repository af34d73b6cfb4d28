"""Training speed alone and with a second training on the same cores: torch's defaults vs retune's.

Run from the project root: ``.venv/bin/python bench/threads.py`` (see bench/README.md).
Each measurement runs MiniLM-L6 training steps (the packaged model, batch 32, length 64,
fp32, fused AdamW, as retune trains) in fresh processes: one alone, then two started
together. Under ``torch`` the processes get what a user of plain torch or the transformers
Trainer gets (no OpenMP variables, torch's own thread count); under ``retune`` they get
``pipeline.cpu.WAIT_POLICY_ENV`` and ``pipeline.cpu.set_cpu_threads()``. OpenMP variables
of the calling shell are removed first, so every setting starts from the same place.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cpu import WAIT_POLICY_ENV  # noqa: E402  (no torch import)

BASE_MODEL = "packaged:all-MiniLM-L6-v2"
BATCH_SIZE = 32
MAX_LENGTH = 64
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Variables that change OpenMP/MKL threading: dropped from the caller's environment.
THREAD_VARS = ("OMP_", "GOMP_", "KMP_", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# name -> (environment added, whether the child calls pipeline.cpu.set_cpu_threads)
SETTINGS: dict[str, tuple[dict[str, str], bool]] = {
    "torch": ({}, False),
    "retune": (dict(WAIT_POLICY_ENV), True),
    # Alternatives measured to choose retune's setting (--settings ...):
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
    "spin-1k": ({"GOMP_SPINCOUNT": "1000"}, False),
    "spin-10k": ({"GOMP_SPINCOUNT": "10000"}, False),
    "spin-100k": ({"GOMP_SPINCOUNT": "100000"}, False),
    "threads-1": ({"OMP_NUM_THREADS": "1"}, False),
}


# --- the child: one training loop --------------------------------------------------------


def child(setting: str, seconds: float, warmup: int, barrier: Path, peers: int) -> None:
    """Train for ``seconds`` after ``warmup`` steps; print one JSON line with steps/s.

    Starts timing once all ``peers`` are ready (files in ``barrier``), then keeps stepping
    until every peer has finished its window, so each window is fully contended.
    """
    import torch

    from pipeline.finetune import load_classifier

    if SETTINGS[setting][1]:
        from pipeline.cpu import set_cpu_threads

        set_cpu_threads()
    model, _ = load_classifier(BASE_MODEL, ["negative", "positive"], 0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    generator = torch.Generator().manual_seed(os.getpid())
    # (32, 64) token ids from the ordinary vocabulary (above the special tokens); no padding.
    ids = torch.randint(
        1000, model.config.vocab_size, (BATCH_SIZE, MAX_LENGTH), generator=generator
    )
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (BATCH_SIZE,), generator=generator)

    def step() -> None:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _arrive(barrier, "ready", peers)
    start = time.perf_counter()
    ends: list[float] = []
    while not ends or ends[-1] - start < seconds:
        step()
        ends.append(time.perf_counter())
    done = _arrive(barrier, "done", peers, wait=False)
    if done:
        (barrier / "stop").touch()
    while not (barrier / "stop").exists():  # keep the cores contended for the peers
        step()
    print(
        json.dumps(
            {
                "setting": setting,
                "threads": torch.get_num_threads(),
                "steps": len(ends),
                "seconds": ends[-1] - start,
                "steps_per_s": len(ends) / (ends[-1] - start),
            }
        ),
        flush=True,
    )


def _arrive(barrier: Path, stage: str, peers: int, wait: bool = True) -> bool:
    """Mark this process at ``stage``; True once all ``peers`` are there (waits if ``wait``)."""
    (barrier / f"{stage}.{os.getpid()}").touch()
    while True:
        arrived = len(list(barrier.glob(f"{stage}.*"))) >= peers
        if arrived or not wait:
            return arrived
        time.sleep(0.05)


# --- the parent: alone and two at once ---------------------------------------------------


def child_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(THREAD_VARS)}
    return env | QUIET_ENV | SETTINGS[setting][0]


def busy_cores_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


def measure(setting: str, processes: int, seconds: float, warmup: int) -> dict[str, Any]:
    """Start ``processes`` children together; their steps/s and the other load on the machine."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--child", setting, "--seconds", str(seconds)]
        command += ["--warmup", str(warmup), "--barrier", tmp, "--peers", str(processes)]
        before_busy, before_total = busy_cores_seconds()
        before_children = _children_cpu()
        wall = time.perf_counter()
        procs = [
            subprocess.Popen(command, env=child_env(setting), stdout=subprocess.PIPE, text=True)
            for _ in range(processes)
        ]
        outputs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - wall
        if any(p.returncode for p in procs):
            raise SystemExit(
                f"a {setting} child failed: exit codes {[p.returncode for p in procs]}"
            )
    busy, total = busy_cores_seconds()
    cores = (total - before_total) / wall  # CPUs the kernel counts, from the same ticks
    ours = _children_cpu() - before_children
    others = max(0.0, (busy - before_busy) - ours) / wall
    rates = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    return {
        "setting": setting,
        "processes": processes,
        "runs": rates,
        "other_load": others,
        "cores": cores,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def report(results: list[dict[str, Any]]) -> str:
    """The table: steps/s alone, each of two at once, and what sharing costs (medians)."""
    lines = [
        "setting   threads  alone steps/s  two at once, each  each/alone  machine (sum/alone)"
        "  other load (cores) alone / two"
    ]
    cell: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        cell.setdefault((r["setting"], r["processes"]), []).append(r)

    def rates(setting: str, processes: int) -> list[float]:
        return [run["steps_per_s"] for r in cell[(setting, processes)] for run in r["runs"]]

    def load(setting: str, processes: int) -> float:
        return statistics.mean(r["other_load"] for r in cell[(setting, processes)])

    medians = {}
    for setting in dict.fromkeys(r["setting"] for r in results):
        one, each = statistics.median(rates(setting, 1)), statistics.median(rates(setting, 2))
        medians[setting] = one, each
        threads = cell[(setting, 1)][0]["runs"][0]["threads"]
        lines.append(
            f"{setting:<9} {threads:>7}  {one:>13.2f}  {each:>17.2f}  {each / one:>10.2f}  "
            f"{2 * each / one:>19.2f}  {load(setting, 1):>17.2f} / {load(setting, 2):.2f}"
        )
    if "torch" in medians and "retune" in medians:
        (t1, t2), (r1, r2) = medians["torch"], medians["retune"]
        lines.append(f"retune / torch: alone {r1 / t1:.2f}x, two at once {r2 / t2:.2f}x")
    rounds = max(len(v) for v in cell.values())
    cores = max(r["cores"] for r in results)
    lines.append(
        f"(medians of {rounds} round(s); {cores:.0f} CPUs; 'other load': cores busy with "
        "other processes meanwhile)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="torch,retune", help=f"of {', '.join(SETTINGS)}")
    parser.add_argument("--seconds", type=float, default=15.0, help="timed window per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="repeat, interleaving settings")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seconds, args.warmup, args.barrier, args.peers)
        return
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    results = []
    for round_ in range(args.rounds):
        for processes in (1, 2):  # settings side by side, so a change in load hits all
            for setting in settings:
                results.append(measure(setting, processes, args.seconds, args.warmup))
                results[-1]["round"] = round_
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(report(results))


if __name__ == "__main__":
    main()
