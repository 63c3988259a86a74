"""Keeping the workspace copy of the notebooks in step with the local ones.

The workspace is the source of truth for "unchanged": each sync exports the workspace copies and
compares normalized sources, so a notebook edited in the Databricks UI or uploaded from elsewhere
is detected and restored. Within one Dagster run the step processes sync once between them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import dagster as dg
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import NotFound
from databricks.sdk.service import workspace as ws_api

from nbpipeline import settings
from nbpipeline.backend import NOTEBOOK_NAMES
from nbpipeline.databricks.client import API_ERRORS, describe_api_error
from nbpipeline.errors import ConfigError

_LOG = logging.getLogger("nbpipeline.databricks")


def local_notebooks(directory: Path | None = None) -> dict[str, bytes]:
    """Every `*.py` in the notebooks folder, by workspace name (file name without `.py`).

    All of them are synced, not just Notebook1..4: the notebooks `%run ./_common`, and `%run`
    resolves relative to the notebook's workspace path, so helpers must sit next to them.
    """
    folder = directory or settings.notebooks_dir()
    if not folder.is_dir():
        raise ConfigError(
            f"notebooks folder {folder} does not exist", hint="set NBPIPELINE_NOTEBOOKS_DIR"
        )
    found = {p.stem: p.read_bytes() for p in sorted(folder.glob("*.py")) if p.is_file()}
    missing = [n for n in NOTEBOOK_NAMES if n not in found]
    if missing:
        raise ConfigError(
            f"notebooks folder {folder} has no {', '.join(m + '.py' for m in missing)}"
        )
    return found


def normalized_source(data: bytes) -> str:
    """Source text compared for "unchanged": line endings, trailing blanks and the header ignored.

    Databricks re-serializes imported notebooks (it adds the `# Databricks notebook source` header
    if missing and may trim trailing whitespace), so a byte-for-byte comparison would re-upload
    every time. None of the differences ignored here can change what a notebook does.
    """
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    if lines and lines[0] == "# Databricks notebook source":
        lines = lines[1:]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


def notebooks_digest(notebooks: Mapping[str, bytes]) -> str:
    """SHA-256 of the notebooks' normalized sources, so a workspace export hashes the same."""
    h = hashlib.sha256()
    for name in sorted(notebooks):
        h.update(name.encode() + b"\0" + normalized_source(notebooks[name]).encode() + b"\0")
    return h.hexdigest()


def workspace_notebooks(
    ws: WorkspaceClient, workspace_dir: str, names: Iterable[str]
) -> dict[str, bytes | None]:
    """The workspace copies of `names` in `workspace_dir` (None: missing or not a notebook)."""
    out: dict[str, bytes | None] = {}
    for name in sorted(names):
        try:
            exported = ws.workspace.export(
                f"{workspace_dir}/{name}", format=ws_api.ExportFormat.SOURCE
            )
        except NotFound:
            out[name] = None
            continue
        except API_ERRORS as exc:
            if "does not exist" in str(exc) or "doesn't exist" in str(exc):
                out[name] = None
                continue
            raise
        out[name] = base64.b64decode(exported.content or "")
    return out


def sync_notebooks(
    ws: WorkspaceClient,
    workspace_dir: str,
    notebooks: Mapping[str, bytes],
    *,
    log: logging.Logger | None = None,
) -> dict[str, str]:
    """Upload each notebook whose workspace copy differs; return {name: uploaded|unchanged}.

    "Differs" compares the exported workspace copy with the local text, both normalized, so an
    edit made in the workspace (UI, another machine, CI) is detected and restored too.
    """
    logger = log or _LOG
    try:
        ws.workspace.mkdirs(workspace_dir)
    except API_ERRORS as exc:
        raise ConfigError(
            f"cannot create workspace folder {workspace_dir}: {describe_api_error(exc)}"
        ) from None
    result: dict[str, str] = {}
    for name in sorted(notebooks):
        path = f"{workspace_dir}/{name}"
        content = notebooks[name]
        try:
            if _remote_matches(ws, path, content):
                result[name] = "unchanged"
                continue
            ws.workspace.import_(
                path,
                content=base64.b64encode(content).decode("ascii"),
                format=ws_api.ImportFormat.SOURCE,
                language=ws_api.Language.PYTHON,
                overwrite=True,
            )
        except API_ERRORS as exc:
            raise ConfigError(
                f"cannot sync notebook {name} to {path}: {describe_api_error(exc)}"
            ) from None
        result[name] = "uploaded"
        logger.info("uploaded notebook %s to %s", name, path)
    return result


def _remote_matches(ws: WorkspaceClient, path: str, content: bytes) -> bool:
    try:
        info = ws.workspace.get_status(path)
    except NotFound:
        return False
    if info.object_type != ws_api.ObjectType.NOTEBOOK:
        kind = info.object_type.value if info.object_type else "unknown object"
        raise ConfigError(
            f"workspace path {path} is a {kind}, not a notebook",
            hint="remove it or choose another workspace_dir",
        )
    if info.language not in (None, ws_api.Language.PYTHON):
        return False
    try:
        exported = ws.workspace.export(path, format=ws_api.ExportFormat.SOURCE)
    except NotFound:
        return False
    remote = base64.b64decode(exported.content or "")
    return normalized_source(remote) == normalized_source(content)


# One sync per (workspace, folder, local content) per process, on top of the once-per-run marker:
# four assets starting at once in one process must not upload four times.
_SYNC_LOCK = threading.Lock()
_SYNCED: dict[tuple[str, str], str] = {}


@contextlib.contextmanager
def _host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (the step processes of one run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if sys.platform == "win32":  # pragma: no cover - Windows
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    time.sleep(0.1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run_sync_marker(host: str, workspace_dir: str, dagster_run_id: str) -> Path:
    """Where the step processes of one Dagster run record that the notebooks were synced."""
    key = hashlib.sha256(f"{host}\0{workspace_dir}\0{dagster_run_id}".encode()).hexdigest()[:32]
    return settings.home() / "databricks" / "synced" / key


def sync_once_per_run(
    ws: WorkspaceClient,
    host: str,
    workspace_dir: str,
    local: Mapping[str, bytes],
    *,
    log: logging.Logger,
) -> bool:
    """Sync the notebooks unless this Dagster run already did (in any of its step processes);
    outside a Dagster run, once per process. True if this call synced."""
    digest = notebooks_digest(local)
    key = (host, workspace_dir)
    with _SYNC_LOCK:
        if _SYNCED.get(key) == digest:
            return False
        step = current_dagster_step()
        if step is None:
            sync_notebooks(ws, workspace_dir, local, log=log)
            _SYNCED[key] = digest
            return True
        marker = _run_sync_marker(host, workspace_dir, step[0])
        with _host_lock(marker.with_suffix(".lock")):
            if marker.is_file() and marker.read_text() == digest:
                _SYNCED[key] = digest
                return False
            sync_notebooks(ws, workspace_dir, local, log=log)
            marker.write_text(digest)
        _SYNCED[key] = digest
        return True


def current_dagster_step() -> tuple[str, str, int] | None:
    """(run id, step key, retry number) of the Dagster step running this code, if any."""
    try:
        ctx = dg.OpExecutionContext.get()
    except dg.DagsterInvariantViolationError:
        return None
    try:
        step_key = ctx.get_step_execution_context().step.key
    except (AttributeError, dg.DagsterInvariantViolationError):
        step_key = str(ctx.op_handle)
    return ctx.run_id, step_key, int(ctx.retry_number)


def remember_synced(host: str, workspace_dir: str, notebooks: Mapping[str, bytes]) -> None:
    """Record that `notebooks` were just synced to `workspace_dir`, so this process skips it."""
    with _SYNC_LOCK:
        _SYNCED[(host, workspace_dir)] = notebooks_digest(notebooks)
