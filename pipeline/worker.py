"""Training as a process of its own: ``python -m pipeline.worker SPEC.json``.

Used for data-parallel training (``torchrun --nproc_per_node=N -m pipeline.worker SPEC``,
gloo on CPU, NCCL on CUDA) and for resumable runs in a separate process. The spec names
the kind (``text-classification``, or ``causal`` for chat and translation), the config,
the train/validation CSVs (the split tables), the output folder and an optional
checkpoint folder, plus the labels (a classifier) or the base model's local folder (a
causal LM); rank 0 saves the trained model (safetensors + tokenizer) and ``result.json``.
Exit code 143 means SIGTERM: a checkpoint was written; run it again to resume.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.config import ForgettingConfig, ImageConfig, TrainConfig
from pipeline.cpu import set_cpu_threads, worker_env
from pipeline.finetune import EpochRecord, FineTuneResult, TrainingInterrupted
from pipeline.mitigation import TeacherCache

CLASSIFIER, CAUSAL, IMAGES = "text-classification", "causal", "image-classification"


def write_spec(
    path: Path,
    config: TrainConfig,
    labels: list[str],
    train_csv: Path,
    val_csv: Path,
    out_dir: Path,
    checkpoint_dir: Path | None = None,
    forgetting: ForgettingConfig | None = None,
    teacher_cache: TeacherCache | None = None,
    kind: str = CLASSIFIER,
    base: str | None = None,
    image: ImageConfig | None = None,
) -> Path:
    """Write the JSON spec this worker reads.

    ``forgetting`` carries the mitigations that act during training (L2-SP, distillation);
    every rank builds them from the pretrained weights, as one process would, reading a
    classifier's teacher embeddings from ``teacher_cache`` when given. A ``causal`` spec
    names the base's local folder (``base``) and has no labels; an image spec names the
    folder its tables' image paths are relative to (``base``) and carries ``image``.
    """
    if kind not in {CLASSIFIER, CAUSAL, IMAGES} or (kind == CLASSIFIER) != (base is None):
        raise ValueError(f"a {kind!r} spec with base={base!r}")
    if (kind == IMAGES) != (image is not None):
        raise ValueError(f"a {kind!r} spec with image={image!r}")
    spec = {
        "kind": kind,
        "base": base,
        "config": config.model_dump(),
        "image": image.model_dump() if image is not None else None,
        "labels": labels,
        "train_csv": str(train_csv),
        "val_csv": str(val_csv),
        "out_dir": str(out_dir),
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
        "forgetting": forgetting.model_dump() if forgetting is not None else None,
        "teacher_cache": (
            {"folder": str(teacher_cache.folder), "weights_sha256": teacher_cache.weights_sha256}
            if teacher_cache is not None
            else None
        ),
    }
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return path


def run(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    config = TrainConfig.model_validate(spec["config"])
    set_cpu_threads(config.num_threads)  # this node's usable cores shared by its processes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = int(os.environ.get("RANK", "0"))
    train = pd.read_csv(spec["train_csv"], dtype=str, keep_default_na=False)
    val = pd.read_csv(spec["val_csv"], dtype=str, keep_default_na=False)
    keep = spec.get("forgetting")
    forgetting = ForgettingConfig.model_validate(keep) if keep else None
    checkpoints = Path(spec["checkpoint_dir"]) if spec["checkpoint_dir"] else None
    out = Path(spec["out_dir"])
    try:
        if spec.get("kind", CLASSIFIER) == CAUSAL:
            result = _train_causal(spec, config, forgetting, train, val, out, checkpoints)
        elif spec["kind"] == IMAGES:
            result = _train_images(spec, config, forgetting, train, val, out, checkpoints)
        else:
            result = _train_classifier(spec, config, forgetting, train, val, out, checkpoints)
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 143
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:  # the training sequence saved the model there
        (out / "result.json").write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    return 0


def _train_classifier(
    spec: dict[str, Any],
    config: TrainConfig,
    forgetting: ForgettingConfig | None,
    train: pd.DataFrame,
    val: pd.DataFrame,
    out: Path,
    checkpoints: Path | None,
) -> FineTuneResult:
    from pipeline.training import train_classifier

    labels: list[str] = spec["labels"]
    index = {label: i for i, label in enumerate(labels)}
    teacher = spec.get("teacher_cache")
    _, _, result = train_classifier(
        config,
        forgetting,
        labels,
        train["text"].tolist(),
        train["label"].map(index).to_numpy(dtype=np.int64),
        val["text"].tolist(),
        val["label"].map(index).to_numpy(dtype=np.int64),
        out,
        checkpoint_dir=checkpoints,
        teacher_cache=(
            TeacherCache(Path(teacher["folder"]), teacher["weights_sha256"]) if teacher else None
        ),
    )
    return result


def _train_causal(
    spec: dict[str, Any],
    config: TrainConfig,
    forgetting: ForgettingConfig | None,
    train: pd.DataFrame,
    val: pd.DataFrame,
    out: Path,
    checkpoints: Path | None,
) -> FineTuneResult:
    from pipeline.causal_training import train_causal
    from pipeline.conversations import messages_of

    _, _, result = train_causal(
        config, forgetting, spec["base"], messages_of(train), messages_of(val), out, checkpoints
    )
    return result


def _train_images(
    spec: dict[str, Any],
    config: TrainConfig,
    forgetting: ForgettingConfig | None,
    train: pd.DataFrame,
    val: pd.DataFrame,
    out: Path,
    checkpoints: Path | None,
) -> FineTuneResult:
    from pipeline.image_models import square_pixels
    from pipeline.image_training import ImageSplits, train_image_classifier
    from pipeline.images import read_images

    image = ImageConfig.model_validate(spec["image"])
    labels: list[str] = spec["labels"]
    index, root = {label: i for i, label in enumerate(labels)}, Path(spec["base"])

    def split(frame: pd.DataFrame) -> tuple[Any, np.ndarray]:
        pixels = square_pixels(read_images(root, frame["path"].tolist()), image.size)
        return pixels, frame["label"].map(index).to_numpy(dtype=np.int64)

    splits = ImageSplits(*split(train), *split(val))
    distill = forgetting.distill if forgetting is not None else 0.0
    _, _, result = train_image_classifier(
        config, image, labels, splits, out, checkpoints, distill=distill
    )
    return result


def train_with_torchrun(
    config: TrainConfig,
    run_id: str | None,
    out_dir: Path,
    write: Callable[[Path, Path, Path], Path],
) -> FineTuneResult:
    """Data-parallel training under torchrun, on this node's processes or on several nodes
    sharing RETUNE_SHARED_DIR; the model ends up in ``out_dir``.

    Args:
        write: (work folder, model folder, checkpoint folder) -> the spec it wrote there,
            with the split tables beside it (see :func:`write_spec`).

    Raises:
        ValueError: ``nnodes > 1`` without RETUNE_SHARED_DIR.
        RuntimeError: torchrun failed.
    """
    import shutil
    import uuid

    work, model_dir = out_dir.parent / "distributed", out_dir
    if config.nnodes > 1:  # every node must see the spec, the data and the output
        shared = os.environ.get("RETUNE_SHARED_DIR")
        if not shared:
            raise ValueError(
                "train.nnodes > 1 needs RETUNE_SHARED_DIR: a folder every node mounts at "
                "the same path, where the other nodes wait in `retune join`"
            )
        job_id = f"retune-{run_id or uuid.uuid4().hex}"  # a retried task resumes
        work = Path(shared) / job_id
        model_dir = work / "model"
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = work / "checkpoints" if config.nnodes > 1 else out_dir.parent / "checkpoints"
    spec = write(work, model_dir, checkpoints)
    if config.nnodes > 1:
        train_on_nodes(Path(work.parent), job_id, spec, config.nproc_per_node, config.nnodes)
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    else:
        launch(spec, config.nproc_per_node, config.nnodes)
    return read_result(out_dir)


def launch(
    spec_path: Path,
    nproc_per_node: int,
    nnodes: int = 1,
    endpoint: str | None = None,
    rdzv_id: str | None = None,
    host: bool | None = None,
) -> None:
    """Run this worker under torchrun (data-parallel) and wait for it.

    With ``nnodes > 1`` every node runs this; they meet at ``endpoint`` (default
    ``RETUNE_RDZV_ENDPOINT``, host:port) under ``rdzv_id``, and ``host`` says whether this
    node serves the rendezvous store (None: torchrun guesses from the host name).

    Raises:
        RuntimeError: torchrun failed; its exit code and the tail of its output.
    """
    import subprocess

    if nnodes == 1:
        topology = ["--standalone", f"--nproc_per_node={nproc_per_node}"]
    else:
        endpoint = endpoint or os.environ.get("RETUNE_RDZV_ENDPOINT")
        if not endpoint:
            raise RuntimeError(
                "train.nnodes > 1 needs RETUNE_RDZV_ENDPOINT=host:port on every node"
            )
        topology = [
            f"--nnodes={nnodes}",
            f"--nproc_per_node={nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
        ]
        if rdzv_id:
            topology.append(f"--rdzv-id={rdzv_id}")
        if host is not None:
            topology.append(f"--rdzv-conf=is_host={int(host)}")
        if os.environ.get("RETUNE_NODE_ADDRESS"):  # how the other nodes reach this one
            topology.append(f"--local-addr={os.environ['RETUNE_NODE_ADDRESS']}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *topology,
        "-m",
        "pipeline.worker",
        str(spec_path),
    ]
    # The wait policy and a thread count per process, which torchrun would otherwise set to 1.
    env = worker_env(nproc_per_node)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited with {done.returncode}: {done.stderr[-2000:]}")


# Multi-node training: the node that runs the flow announces each job in a folder every
# node mounts at the same path (RETUNE_SHARED_DIR); the other nodes wait in `retune join`.
ANNOUNCEMENT = "job.json"


def _announce(shared: Path, job: dict[str, Any]) -> None:
    partial = shared / f".{ANNOUNCEMENT}.{os.getpid()}"
    partial.write_text(json.dumps(job, indent=2), encoding="utf-8")
    partial.replace(shared / ANNOUNCEMENT)  # atomic: joiners never read half a file


def read_announcement(shared: Path) -> dict[str, Any] | None:
    """The job last announced in ``shared``, or None."""
    try:
        return json.loads((shared / ANNOUNCEMENT).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def rendezvous_endpoint() -> str:
    """host:port where the other nodes reach this node's rendezvous store."""
    if os.environ.get("RETUNE_RDZV_ENDPOINT"):
        return os.environ["RETUNE_RDZV_ENDPOINT"]
    address = os.environ.get("RETUNE_NODE_ADDRESS") or socket.getfqdn()
    return f"{address}:{os.environ.get('RETUNE_RDZV_PORT', '29400')}"


def train_on_nodes(
    shared: Path,
    job_id: str,
    spec_path: Path,
    nproc_per_node: int,
    nnodes: int,
    timeout: float = 600.0,
) -> None:
    """This node's part of multi-node training, as the host of the rendezvous.

    Announces the job in ``shared`` (the spec, its CSVs and output folder must lie there
    too), trains, then waits up to ``timeout`` seconds for ``result.json``: whichever node
    gets rank 0 writes the model, and it may finish after this one. The announcement is
    marked finished whatever happens, so no node joins a job that is over.

    Raises:
        RuntimeError: torchrun failed, or rank 0 wrote no result in time.
    """
    endpoint = rendezvous_endpoint()
    job = {
        "id": job_id,
        "spec": str(spec_path),
        "nnodes": nnodes,
        "nproc_per_node": nproc_per_node,
        "endpoint": endpoint,
        "state": "running",
    }
    _announce(shared, job)
    try:
        launch(spec_path, nproc_per_node, nnodes, endpoint=endpoint, rdzv_id=job_id, host=True)
        result = Path(json.loads(spec_path.read_text(encoding="utf-8"))["out_dir"]) / "result.json"
        deadline = time.monotonic() + timeout
        while not result.is_file():
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0 wrote no {result} within {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        _announce(shared, job | {"state": "finished"})


def join(shared: Path, once: bool = False, timeout: float | None = None, poll: float = 1.0) -> int:
    """Serve as one of the other nodes: train every job announced in ``shared``.

    Returns 0 after a job when ``once``; 1 when ``timeout`` seconds pass with no job, or a
    job fails under ``once``. A job announced before this started still runs if it is
    running; finished ones are skipped.
    """
    served: set[str] = set()
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        job = read_announcement(shared)
        if job is not None and job.get("state") == "running" and job["id"] not in served:
            served.add(job["id"])
            print(f"joining job {job['id']} at {job['endpoint']}", file=sys.stderr, flush=True)
            try:
                launch(
                    Path(job["spec"]),
                    int(job["nproc_per_node"]),
                    int(job["nnodes"]),
                    endpoint=job["endpoint"],
                    rdzv_id=job["id"],
                    host=False,
                )
            except RuntimeError as err:
                print(f"job {job['id']} failed: {err}", file=sys.stderr, flush=True)
                if once:
                    return 1
                continue
            if once:
                return 0
            if timeout is not None:  # the wait for the next job starts now
                deadline = time.monotonic() + timeout
        time.sleep(poll)
    return 1


def read_result(out_dir: Path) -> FineTuneResult:
    """The FineTuneResult that rank 0 wrote next to the model."""
    raw = json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
    raw["history"] = [EpochRecord(**h) for h in raw["history"]]
    return FineTuneResult(**raw)


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
