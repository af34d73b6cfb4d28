"""Lineage: what every run and model version records, and the chain back to the data.

Pure helpers plus git and file hashing; MLflow access goes through ``registry`` and
``tracking``.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import registry, tracking
from pipeline import tags as tag
from pipeline.config import RetuneConfig
from pipeline.finetune import resolve_base_model
from pipeline.versioning import DataVersion

# Tag keys, on the MLflow run and on the registered model version.


# Untracked files that can change what a run does; other untracked files (data copied in,
# reports, notes) leave the tree clean: the data is identified by its DVC md5 and the
# config by its hash. What retune itself writes (stores, caches, run folders, with copies
# of code among the model artefacts) is never code, even where no .gitignore says so.
CODE_SUFFIXES = (".py", ".pyi", ".pyx", ".sh")
CODE_NAMES = ("Makefile", "Dockerfile", "pyproject.toml", "setup.cfg")
OUTPUT_DIRS = ("runs/", "mlflow/", "mlruns/", "mlartifacts/", "reports/", "data/", ".retune/")
MAX_DIRTY_FILES_SHOWN = 20


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool
    dirty_files: tuple[str, ...] = ()  # what made it dirty, relative to the repo root

    def dirty_files_tag(self) -> str:
        """``"flows/x.py, retune.yaml"`` (at most 20 names, then "(+N more)"), or "none"."""
        if not self.dirty_files:
            return "none"
        shown = ", ".join(self.dirty_files[:MAX_DIRTY_FILES_SHOWN])
        more = len(self.dirty_files) - MAX_DIRTY_FILES_SHOWN
        return shown + (f" (+{more} more)" if more > 0 else "")


def is_code(path: str) -> bool:
    """Whether an untracked file can change a run: source and build files outside
    retune's own output folders and hidden tool folders (``.prefect/``, ``.dvc/``)."""
    if path.startswith(OUTPUT_DIRS) or path.startswith("."):
        return False
    name = Path(path).name
    return name in CODE_NAMES or Path(path).suffix in CODE_SUFFIXES


def dirty_files(porcelain: str) -> list[str]:
    """The files of ``git status --porcelain -z --untracked-files=all`` that make a tree
    dirty: every changed tracked file except DVC's pointers (``*.dvc``, ``.gitignore``: the
    data is identified by its md5), and untracked code (:func:`is_code`)."""
    entries = porcelain.split("\0")
    found, i = [], 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        status, path = entry[:2], entry[3:]
        if "R" in status or "C" in status:
            i += 1  # a rename/copy is followed by its source path
        if status == "!!":
            continue
        if status == "??":
            if is_code(path):
                found.append(path)
        elif not (path.endswith(".dvc") or Path(path).name == ".gitignore"):
            found.append(path)
    return sorted(found)


def git_state(project_dir: Path) -> GitState:
    """HEAD and the files that make the tree dirty ("unknown" outside a git repo)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(project_dir), *args], capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        files = dirty_files(git("status", "--porcelain", "-z", "--untracked-files=all"))
    except (OSError, subprocess.CalledProcessError):
        return GitState("unknown", False)
    return GitState(commit, bool(files), tuple(files))


def config_hash(config: RetuneConfig) -> str:
    """sha256 of the resolved config (every default filled in), first 16 hex digits."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def weights_sha256(base_model: str) -> str:
    """sha256 over the base model's weight files (safetensors, else .bin), in name order.

    A GGUF base (``packaged:SmolLM2-135M-Instruct`` or a ``.gguf`` file) is the sha256 of
    its file, the packaged MobileNetV2 that of its ``.pth``. A hub id that is not a local
    folder gives "unresolved:<id>": the weights are
    not here.
    """
    from pipeline.causal_lm import file_sha256, gguf_file

    if base_model == "packaged:mobilenet_v2":  # pipeline.image_models.PACKAGED_MOBILENET_V2
        from pipeline.image_models import mobilenet_v2_weights

        return file_sha256(mobilenet_v2_weights())
    gguf = gguf_file(base_model)
    if gguf is not None:
        return file_sha256(gguf)
    folder = Path(resolve_base_model(base_model))
    if not folder.is_dir():
        return f"unresolved:{base_model}"
    return folder_sha256(folder)


def folder_sha256(folder: Path) -> str:
    """sha256 over a model folder's weight files (safetensors, else .bin), in name order."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def lineage_tags(project_dir: Path, config: RetuneConfig, version: DataVersion) -> dict[str, str]:
    """Everything needed to trace a model back to its data, code, config and base model."""
    git = git_state(project_dir)
    return {
        tag.DATA_MD5: version.md5,
        tag.DATASET: version.dataset.name,
        tag.DATA_DVC_MD5: version.data_md5,
        tag.DVC_REMOTE: version.remote_url or "none",
        tag.GIT_COMMIT: git.commit,
        tag.GIT_DIRTY: str(git.dirty).lower(),
        tag.GIT_DIRTY_FILES: git.dirty_files_tag(),
        tag.CONFIG_HASH: config_hash(config),
        tag.BASE_MODEL: config.train.base_model,
        tag.BASE_MODEL_SHA256: weights_sha256(config.train.base_model),
    }


@dataclass(frozen=True)
class Lineage:
    """The chain from a registered version back to what made it."""

    model: str
    version: str
    aliases: list[str]
    run_id: str | None
    run_status: str
    dataset: str
    data_md5: str
    data_dvc_md5: str
    dvc_remote: str
    git_commit: str
    git_dirty: str
    config_hash: str
    config: dict[str, Any]
    base_model: str
    base_model_sha256: str
    validation: str
    reports: dict[str, str]  # name -> artifact URI
    metrics: dict[str, float]
    flagged: str | None
    git_dirty_files: str = "unknown"


REPORTS = ("validation", "data_bias", "test_metrics", "forgetting", "config")


def trace(ref: str) -> Lineage:
    """Follow ``NAME@alias`` or ``NAME/VERSION`` to its run, data, code, config and reports.

    Raises:
        ModelRefError: no such version.
    """
    version = registry.resolve_version(ref)
    run = tracking.get_run(version.run_id) if version.run_id else None
    tags = run.tags if run else {}
    tags = tags | version.tags  # the version's own tags win (e.g. flagged)
    config: dict[str, Any] = {}
    if run:
        try:
            config = tracking.read_report(run.run_id, "reports/config.json")
        except Exception:  # an older run without the artifact: the params still hold it
            config = dict(run.params)
    return Lineage(
        model=version.name,
        version=version.version,
        aliases=version.aliases,
        run_id=version.run_id,
        run_status=run.status if run else "missing",
        dataset=tags.get(tag.DATASET, "unknown"),
        data_md5=tags.get(tag.DATA_MD5, "unknown"),
        data_dvc_md5=tags.get(tag.DATA_DVC_MD5, "unknown"),
        dvc_remote=tags.get(tag.DVC_REMOTE, "unknown"),
        git_commit=tags.get(tag.GIT_COMMIT, "unknown"),
        git_dirty=tags.get(tag.GIT_DIRTY, "unknown"),
        config_hash=tags.get(tag.CONFIG_HASH, "unknown"),
        config=config,
        base_model=tags.get(tag.BASE_MODEL, "unknown"),
        base_model_sha256=tags.get(tag.BASE_MODEL_SHA256, "unknown"),
        validation=tags.get(tag.VALIDATION, "unknown"),
        reports={name: f"{run.artifact_uri}/reports/{name}.json" for name in REPORTS}
        if run
        else {},
        metrics=run.metrics if run else {},
        flagged=tags.get(tag.FLAGGED),
        git_dirty_files=tags.get(tag.GIT_DIRTY_FILES, "unknown"),
    )


def versions_trained_on(md5: str) -> list[registry.VersionInfo]:
    """Every registered version whose dataset or whole data/ hashed to ``md5``."""
    found = {(v.name, v.version): v for v in registry.versions_with_tag(tag.DATA_MD5, md5)}
    found |= {(v.name, v.version): v for v in registry.versions_with_tag(tag.DATA_DVC_MD5, md5)}
    return sorted(found.values(), key=lambda v: (v.name, int(v.version)))


def flag_versions(md5: str, reason: str) -> list[registry.VersionInfo]:
    """Tag every version trained on ``md5`` with ``retune.flagged = reason``; returns them."""
    if not reason.strip():
        raise ValueError("a flag needs a reason")
    versions = versions_trained_on(md5)
    for v in versions:
        registry.tag_version(v.name, v.version, tag.FLAGGED, reason)
    return versions_trained_on(md5)
