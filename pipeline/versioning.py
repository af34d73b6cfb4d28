"""Data versioning with DVC. The only module that talks to DVC."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_REMOTE_NAME = "local"
DEFAULT_REMOTE_DIR = ".dvc-storage"


class DataVersionError(RuntimeError):
    """DVC could not version the data, or the data does not match its recorded version."""


@dataclass(frozen=True)
class DataVersion:
    md5: str  # DVC's directory hash, e.g. "3f2a...c1.dir"
    dvc_file: Path
    n_files: int
    size: int
    pushed: bool


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 recorded in a ``.dvc`` file, or None if the file does not exist."""
    if not dvc_file.is_file():
        return None
    meta = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    outs = meta.get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise DataVersionError(f"{dvc_file} records no md5 under outs[0]; is it a DVC file?")
    return str(outs[0]["md5"])


def init_repo(project_dir: Path, remote_dir: Path | None = None) -> None:
    """``dvc init`` in a git repo with a local folder as default remote (idempotent)."""
    from dvc.repo import Repo

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if not (project_dir / ".dvc").is_dir():
        Repo.init(str(project_dir), no_scm=not (project_dir / ".git").exists())
    remote = remote_dir or project_dir / DEFAULT_REMOTE_DIR
    # DVC reads a relative path as relative to the cwd and stores it relative to
    # .dvc/config, so the committed config stays valid in every clone.
    url = os.path.relpath(remote.resolve(), Path.cwd()) if not remote_dir else str(remote)
    with Repo(str(project_dir)).config.edit() as conf:
        conf["core"]["remote"] = DEFAULT_REMOTE_NAME
        conf["core"]["analytics"] = False
        conf["remote"][DEFAULT_REMOTE_NAME] = {"url": url}


def version_data(
    project_dir: Path, data_dir: str, expected_md5: str | None = None, push: bool = True
) -> DataVersion:
    """``dvc add`` the data folder (writing ``<data_dir>.dvc``) and ``dvc push`` it.

    Args:
        expected_md5: if given and the new hash differs, the previous ``.dvc`` file is
            restored and DataVersionError is raised: the data is not what was recorded.

    Raises:
        DataVersionError: no DVC repo, a hash mismatch, or a failed push.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # DVC logs git hints ("git add data.dvc") at INFO; the caller reports the version.
    logging.getLogger("dvc").setLevel(logging.WARNING)
    if not (project_dir / ".dvc").is_dir():
        raise DataVersionError(
            f"{project_dir} is not a DVC repository (no .dvc/); run `dvc init` there first"
        )
    dvc_file = project_dir / f"{data_dir}.dvc"
    previous = dvc_file.read_bytes() if dvc_file.is_file() else None
    try:
        repo = Repo(str(project_dir))
        # DVC resolves a relative target against the cwd, not the repo: pass it absolute.
        repo.add(str((project_dir / data_dir).resolve()))
        md5 = recorded_md5(dvc_file)
        assert md5 is not None
        if expected_md5 is not None and md5 != expected_md5:
            raise DataVersionError(
                f"the regenerated {data_dir}/ hashes to {md5}, but {dvc_file.name} records "
                f"{expected_md5}: the data is not the committed version (changed source "
                f"package or code?). Restore it with `dvc pull`, or commit the new "
                f"{dvc_file.name} if the change is intended."
            )
        pushed = False
        if push:
            repo.push()
            pushed = True
    except (DvcException, DataVersionError) as err:
        if previous is None:
            dvc_file.unlink(missing_ok=True)
        else:
            dvc_file.write_bytes(previous)
        if isinstance(err, DataVersionError):
            raise
        raise DataVersionError(f"DVC failed to version {data_dir}/: {err}") from err
    out = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {})["outs"][0]
    return DataVersion(
        md5=md5,
        dvc_file=dvc_file,
        n_files=int(out.get("nfiles", 0)),
        size=int(out.get("size", 0)),
        pushed=pushed,
    )
