"""Data versioning with DVC. The only module that talks to DVC.

``data/`` holds one folder per dataset (``data/<name>/{train,validation,test}.csv``) and is
tracked as a whole by the committed ``data.dvc``. Next to DVC's own hash of ``data/``,
``data.dvc`` carries a ``meta.datasets`` manifest (DVC keeps ``meta`` on re-add): for each
dataset its own DVC md5, rows per split, labels, source (a file's absolute path), the rows
dropped on import by reason, and, for an import forced past failed checks, those checks.
So a fresh clone knows what every dataset must hash to, and git history of ``data.dvc`` is
the history of the data.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_REMOTE_NAME = "local"
DEFAULT_REMOTE_DIR = ".dvc-storage"


class DataVersionError(RuntimeError):
    """DVC could not version the data, or the data does not match its recorded version."""


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset's entry in the ``data.dvc`` manifest."""

    name: str
    md5: str  # DVC's hash of data/<name>/, e.g. "3f2a...c1.dir"
    rows: dict[str, int]
    labels: list[str]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. allow_invalid, failed_checks
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "md5": self.md5,
            "rows": self.rows,
            "labels": self.labels,
            "source": self.source,
        }
        if self.dropped:  # absent, not {}, where nothing was dropped
            meta["dropped"] = self.dropped
        return meta | self.extra


@dataclass(frozen=True)
class DataVersion:
    dataset: DatasetRecord
    data_md5: str  # DVC's hash of the whole data/ folder, as in data.dvc outs
    dvc_file: Path
    remote_url: str | None
    pushed: bool

    @property
    def md5(self) -> str:
        return self.dataset.md5


def _quiet_dvc() -> None:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # DVC logs git hints ("git add data.dvc") at INFO; callers report the version.
    logging.getLogger("dvc").setLevel(logging.WARNING)


def read_dvc_file(dvc_file: Path) -> dict[str, Any]:
    """The parsed ``.dvc`` file ({} if it does not exist)."""
    if not dvc_file.is_file():
        return {}
    meta = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    if not isinstance(meta, dict):
        raise DataVersionError(f"{dvc_file} is not a DVC file (expected a mapping)")
    return meta


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 of the whole tracked folder recorded in a ``.dvc`` file, or None."""
    meta = read_dvc_file(dvc_file)
    if not meta:
        return None
    outs = meta.get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise DataVersionError(f"{dvc_file} records no md5 under outs[0]; is it a DVC file?")
    return str(outs[0]["md5"])


def recorded_datasets(dvc_file: Path) -> dict[str, DatasetRecord]:
    """The ``meta.datasets`` manifest of a ``.dvc`` file, by dataset name."""
    return _datasets_from_meta(read_dvc_file(dvc_file))


def _datasets_from_meta(meta: dict[str, Any]) -> dict[str, DatasetRecord]:
    datasets = ((meta.get("meta") or {}).get("datasets")) or {}
    records = {}
    for name, entry in datasets.items():
        entry = dict(entry)
        records[name] = DatasetRecord(
            name=name,
            md5=str(entry.pop("md5")),
            rows={k: int(v) for k, v in (entry.pop("rows", {}) or {}).items()},
            labels=[str(x) for x in entry.pop("labels", [])],
            source=str(entry.pop("source", "")),
            dropped={str(k): int(v) for k, v in (entry.pop("dropped", {}) or {}).items()},
            extra=entry,
        )
    return records


def folder_md5(path: Path) -> str:
    """DVC's md5 of a folder (what ``dvc add`` would record), computed without adding it."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    if not path.is_dir():
        raise DataVersionError(f"{path} is not a folder")
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5", dry_run=True)
    return str(obj.hash_info.value)


def init_repo(project_dir: Path, remote_dir: Path | None = None) -> None:
    """``dvc init`` in a git repo with a local folder as default remote (idempotent)."""
    from dvc.repo import Repo

    _quiet_dvc()
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


def remote_url(project_dir: Path) -> str | None:
    """The URL of the default DVC remote (absolute for a local folder), or None."""
    from dvc.repo import Repo

    _quiet_dvc()
    config = Repo(str(project_dir)).config
    name = config["core"].get("remote")
    if not name:
        return None
    url = str(config["remote"][name]["url"])
    if "://" not in url and not os.path.isabs(url):
        url = str((project_dir / ".dvc" / url).resolve())
    return url


def _require_repo(project_dir: Path) -> None:
    if not (project_dir / ".dvc").is_dir():
        raise DataVersionError(
            f"{project_dir} is not a DVC repository (no .dvc/); run `dvc init` there first"
        )


def _local_files(root: Path | None) -> set[Path]:
    if root is None or not root.is_dir():
        return set()
    return {p for p in root.rglob("*") if p.is_file()}


def _local_remote(project_dir: Path) -> Path | None:
    url = remote_url(project_dir)
    return Path(url) if url and "://" not in url else None


@contextmanager
def _rollback_on_error(project_dir: Path, data_dir: str, name: str) -> Iterator[None]:
    """Undo every change to data/<name>, data.dvc, the DVC cache and a local remote on error."""
    dvc_file = project_dir / f"{data_dir}.dvc"
    target = project_dir / data_dir / name
    previous_dvc = dvc_file.read_bytes() if dvc_file.is_file() else None
    cache_root, remote_root = project_dir / ".dvc" / "cache", _local_remote(project_dir)
    cache_before, remote_before = _local_files(cache_root), _local_files(remote_root)
    backup = project_dir / ".dvc" / "tmp" / f"retune-backup-{uuid.uuid4().hex}"
    if target.exists():
        backup.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(target, backup)
    try:
        yield
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        if backup.exists():
            shutil.copytree(backup, target)
        if previous_dvc is None:
            dvc_file.unlink(missing_ok=True)
        else:
            dvc_file.write_bytes(previous_dvc)
        # Objects this attempt added are referenced by nothing else: remove them.
        for root, before in ((cache_root, cache_before), (remote_root, remote_before)):
            for path in _local_files(root) - before:
                path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def _check_other_datasets_present(project_dir: Path, data_dir: str, keep: str) -> None:
    """Every other recorded dataset must be in the workspace, or ``dvc add`` would drop it.

    A missing one is pulled (the caller rebuilds first what needs no remote).
    """
    from dvc.repo import Repo

    dvc_file = project_dir / f"{data_dir}.dvc"
    others = {n: r for n, r in recorded_datasets(dvc_file).items() if n != keep}
    missing = [n for n in others if not (project_dir / data_dir / n).is_dir()]
    if missing:
        try:
            Repo(str(project_dir)).pull(targets=[str(dvc_file)])
        except Exception as err:  # DVC raises many types; the message below says what to do
            raise DataVersionError(
                f"{data_dir}.dvc records datasets {missing} that are not in {data_dir}/ and "
                f"`dvc pull` could not restore them ({err}); check the DVC remote"
            ) from err
    for name, record in others.items():
        actual = folder_md5(project_dir / data_dir / name)
        if actual != record.md5:
            raise DataVersionError(
                f"{data_dir}/{name} hashes to {actual} but {data_dir}.dvc records {record.md5}; "
                f"restore it with `dvc checkout` before versioning other data"
            )


def stage_folder(project_dir: Path) -> Path:
    """A fresh scratch folder on the same filesystem as the project (for atomic moves)."""
    scratch = project_dir / ".dvc" / "tmp" / f"retune-stage-{uuid.uuid4().hex}"
    scratch.mkdir(parents=True)
    return scratch


def commit_dataset(
    project_dir: Path,
    data_dir: str,
    staged: Path,
    record: DatasetRecord,
    expected_md5: str | None = None,
    push: bool = True,
) -> DataVersion:
    """Move a staged dataset folder into ``data/<name>``, ``dvc add`` and push, all or nothing.

    Another recorded dataset missing from ``data_dir`` is pulled first (``dvc add`` would
    drop it): the caller rebuilds beforehand what needs no remote.

    Args:
        staged: a folder with the dataset's files (from :func:`stage_folder`); consumed.
        record: the manifest entry; its md5 is recomputed from ``staged``.
        expected_md5: if given and the staged data hashes differently, nothing changes
            and DataVersionError is raised (a regenerated dataset must match its record).

    Raises:
        DataVersionError: no DVC repo, a hash mismatch, missing datasets or a DVC failure;
            data/, data.dvc, the DVC cache and a local remote are then as they were.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    _quiet_dvc()
    _require_repo(project_dir)
    dvc_file = project_dir / f"{data_dir}.dvc"
    md5 = folder_md5(staged)
    try:
        if expected_md5 is not None and md5 != expected_md5:
            raise DataVersionError(
                f"the regenerated dataset '{record.name}' hashes to {md5}, but "
                f"{dvc_file.name} records {expected_md5}: the data is not the committed "
                f"version (changed source package or code?). Restore it with `dvc pull`, "
                f"or commit the new {dvc_file.name} if the change is intended."
            )
        _check_other_datasets_present(project_dir, data_dir, record.name)
        record = replace(record, md5=md5)
        with _rollback_on_error(project_dir, data_dir, record.name):
            target = project_dir / data_dir / record.name
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staged), str(target))
            repo = Repo(str(project_dir))
            try:
                # DVC resolves a relative target against the cwd, not the repo: absolute.
                repo.add(str((project_dir / data_dir).resolve()))
                _write_manifest(dvc_file, record)
                pushed = False
                if push:
                    repo.push(targets=[str(dvc_file)])
                    pushed = True
            except (DvcException, OSError) as err:
                raise DataVersionError(f"DVC failed to version {data_dir}/: {err}") from err
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    data_md5 = recorded_md5(dvc_file)
    assert data_md5 is not None
    return DataVersion(record, data_md5, dvc_file, remote_url(project_dir), pushed)


def _write_manifest(dvc_file: Path, record: DatasetRecord) -> None:
    meta = read_dvc_file(dvc_file)
    block = meta.setdefault("meta", {}) or {}
    meta["meta"] = block
    datasets = block.setdefault("datasets", {}) or {}
    block["datasets"] = datasets
    datasets[record.name] = record.to_meta()
    block["datasets"] = dict(sorted(datasets.items()))
    dvc_file.write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")


@dataclass(frozen=True)
class HistoryEntry:
    commit: str  # "working tree" for uncommitted changes
    date: str
    subject: str
    data_md5: str | None
    datasets: dict[str, str]  # name -> md5


def history(project_dir: Path, data_dir: str = "data") -> list[HistoryEntry]:
    """Versions of ``data.dvc`` in git history (newest first), and uncommitted changes."""
    dvc_name = f"{data_dir}.dvc"
    out = subprocess.run(
        ["git", "-C", str(project_dir), "log", "--format=%H%x09%aI%x09%s", "--", dvc_name],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise DataVersionError(f"git log failed in {project_dir}: {out.stderr.strip()}")
    entries = []
    working = project_dir / dvc_name
    head = subprocess.run(
        ["git", "-C", str(project_dir), "show", f"HEAD:{dvc_name}"], capture_output=True, text=True
    )
    if working.is_file() and (
        head.returncode != 0 or head.stdout != working.read_text(encoding="utf-8")
    ):
        meta = read_dvc_file(working)
        entries.append(_entry("working tree", "", "(uncommitted)", meta))
    for line in out.stdout.splitlines():
        commit, date, subject = line.split("\t", 2)
        shown = subprocess.run(
            ["git", "-C", str(project_dir), "show", f"{commit}:{dvc_name}"],
            capture_output=True,
            text=True,
        )
        meta = yaml.safe_load(shown.stdout) if shown.returncode == 0 else {}
        entries.append(_entry(commit, date, subject, meta or {}))
    return entries


def _entry(commit: str, date: str, subject: str, meta: dict[str, Any]) -> HistoryEntry:
    outs = meta.get("outs") or [{}]
    return HistoryEntry(
        commit=commit,
        date=date,
        subject=subject,
        data_md5=outs[0].get("md5"),
        datasets={n: r.md5 for n, r in _datasets_from_meta(meta).items()},
    )


def restore_dataset(project_dir: Path, data_md5: str, name: str, dest: Path) -> Path:
    """Materialise dataset ``name`` as it was when ``data/`` hashed to ``data_md5``.

    Reads from the DVC cache, fetching from the remote what is missing; ``data/`` and
    ``data.dvc`` are not touched.

    Returns:
        ``dest`` holding that dataset's files.
    """
    from dvc.repo import Repo

    _quiet_dvc()
    _require_repo(project_dir)
    scratch = f".retune-restore-{uuid.uuid4().hex[:12]}"
    dvc_file = project_dir / f"{scratch}.dvc"
    dvc_file.write_text(
        yaml.safe_dump({"outs": [{"md5": data_md5, "hash": "md5", "path": scratch}]}),
        encoding="utf-8",
    )
    try:
        try:
            Repo(str(project_dir)).pull(targets=[str(dvc_file)])
        except Exception as err:
            raise DataVersionError(
                f"data version {data_md5} is neither in the DVC cache nor on the remote: {err}"
            ) from err
        source = project_dir / scratch / name
        if not source.is_dir():
            raise DataVersionError(f"data version {data_md5} holds no dataset '{name}'")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
    finally:
        dvc_file.unlink(missing_ok=True)
        shutil.rmtree(project_dir / scratch, ignore_errors=True)
        _drop_gitignore_line(project_dir, f"/{scratch}")
    return dest


def _drop_gitignore_line(project_dir: Path, line: str) -> None:
    gitignore = project_dir / ".gitignore"
    if gitignore.is_file():
        lines = gitignore.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [x for x in lines if x.strip() != line]
        if kept != lines:
            gitignore.write_text("".join(kept), encoding="utf-8")
