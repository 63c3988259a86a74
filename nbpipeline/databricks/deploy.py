"""Deploying the Databricks-native jobs: find them by name, diff them, create or replace them.

`deploy` creates or fully replaces (`jobs/reset`) the jobs, found by exact name across every page
of the job list so a second copy is never created; `diff_jobs` shows what deploy would change and
whether the workspace notebooks drifted from the copy the job was deployed with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from databricks.sdk import WorkspaceClient
from databricks.sdk.service import jobs

from nbpipeline.databricks.client import API_ERRORS, describe_api_error, resolve_workspace_dir
from nbpipeline.databricks.jobs import NOTEBOOKS_TAG, JobOptions, all_job_settings
from nbpipeline.databricks.kinds import JOB_NAMES
from nbpipeline.databricks.sync import (
    local_notebooks,
    normalized_source,
    notebooks_digest,
    sync_notebooks,
    workspace_notebooks,
)
from nbpipeline.errors import ConfigError, NbPipelineError

_LOG = logging.getLogger("nbpipeline.databricks")


def find_jobs(ws: WorkspaceClient, names: Iterable[str]) -> dict[str, list[int]]:
    """Job ids by exact name, for `names`, looking through every page of the job list.

    The list is walked in full (the SDK follows `next_page_token`) rather than filtered by name
    on the server, whose filter is case-insensitive; deploy is rare and must never miss a job.
    """
    wanted = set(names)
    found: dict[str, list[int]] = {n: [] for n in wanted}
    for job in ws.jobs.list(limit=100):
        name = job.settings.name if job.settings is not None else None
        if name in wanted and job.job_id is not None:
            found[name].append(int(job.job_id))
    return found


def single_job_id(name: str, ids: list[int]) -> int | None:
    if len(ids) > 1:
        raise ConfigError(
            f"{len(ids)} jobs are named {name!r} (ids {', '.join(map(str, sorted(ids)))})",
            hint="delete the extra copies in the Databricks UI, then deploy again",
        )
    return ids[0] if ids else None


# Keys Databricks fills in itself; their presence on the deployed job is not a difference.
_SERVER_MANAGED = frozenset({"format", "run_as", "edit_mode", "deployment", "budget_policy_id"})
_SERVER_DEFAULTS: dict[str, Any] = {"run_if": "ALL_SUCCESS", "source": "WORKSPACE"}
_LIST_KEYS = {"tasks": "task_key", "job_clusters": "job_cluster_key", "depends_on": "task_key"}


@dataclass(frozen=True)
class Change:
    op: str  # "+": deploy adds, "-": deploy removes, "~": deploy changes
    path: str
    deployed: Any = None
    desired: Any = None

    def __str__(self) -> str:
        if self.op == "+":
            return f"+ {self.path}: {_show(self.desired)}"
        if self.op == "-":
            return f"- {self.path}: {_show(self.deployed)}"
        return f"~ {self.path}: {_show(self.deployed)} -> {_show(self.desired)}"


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def _ignorable(key: str, value: Any) -> bool:
    return (
        value in (None, {}, [], "", 0, False)
        or key in _SERVER_MANAGED
        or (key in _SERVER_DEFAULTS and _SERVER_DEFAULTS[key] == value)
    )


def diff_settings(desired: Mapping[str, Any], deployed: Mapping[str, Any]) -> list[Change]:
    """What `jobs/reset` with `desired` would change on a job whose settings are `deployed`.

    Every key deploy writes is compared. Keys only the deployed job has are reported as
    removals, except server-managed ones (run_as, format, ...) and server defaults
    (run_if=ALL_SUCCESS, empty notification blocks); inside a cluster spec extra keys are the
    cloud defaults Databricks adds, so they are not compared at all.
    """
    changes: list[Change] = []
    _diff_value("", desired, deployed, changes, strict=True)
    return changes


def _diff_value(path: str, want: Any, have: Any, out: list[Change], *, strict: bool) -> None:
    if isinstance(want, Mapping) and isinstance(have, Mapping):
        for key, value in want.items():
            sub = f"{path}.{key}" if path else key
            if key not in have:
                out.append(Change("+", sub, desired=value))
            else:
                _diff_value(sub, value, have[key], out, strict=strict and key != "new_cluster")
        if strict:
            for key, value in have.items():
                if key not in want and not _ignorable(key, value):
                    out.append(Change("-", f"{path}.{key}" if path else key, deployed=value))
        return
    key_name = _LIST_KEYS.get(path.rsplit(".", 1)[-1].split("[")[0])
    if key_name and isinstance(want, list) and isinstance(have, list):
        have_by = {item.get(key_name): item for item in have if isinstance(item, Mapping)}
        want_keys = [item.get(key_name) for item in want]
        for item in want:
            k = item.get(key_name)
            sub = f"{path}[{k}]"
            if k not in have_by:
                out.append(Change("+", sub, desired=item))
            else:
                _diff_value(sub, item, have_by[k], out, strict=strict)
        for k, item in have_by.items():
            if k not in want_keys:
                out.append(Change("-", f"{path}[{k}]", deployed=item))
        return
    if want != have:
        out.append(Change("~", path, deployed=have, desired=want))


@dataclass
class JobDiff:
    mode: str
    name: str
    job_id: int | None
    changes: list[Change] = field(default_factory=list)
    drift: str | None = None  # the workspace notebooks differ from those the job was deployed with

    @property
    def exists(self) -> bool:
        return self.job_id is not None

    @property
    def in_sync(self) -> bool:
        return self.exists and not self.changes and self.drift is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "name": self.name,
            "job_id": self.job_id,
            "exists": self.exists,
            "in_sync": self.in_sync,
            "changes": [asdict(c) for c in self.changes],
            "drift": self.drift,
        }

    def format_text(self) -> str:
        if not self.exists:
            return f"{self.name}: not deployed; deploy would create it"
        lines = []
        if not self.changes:
            lines.append(f"{self.name} (job {self.job_id}): settings up to date")
        else:
            lines.append(f"{self.name} (job {self.job_id}): {len(self.changes)} difference(s)")
            lines += [f"  {c}" for c in self.changes]
        if self.drift:
            lines.append(f"  drift: {self.drift}")
        return "\n".join(lines)


def _drift(
    deployed_sha: str | None, workspace: Mapping[str, bytes | None], local: Mapping[str, bytes]
) -> str | None:
    """Why the workspace copy no longer is what the job was deployed with (None: it is)."""
    missing = sorted(n for n, data in workspace.items() if data is None)
    if missing:
        return f"missing from the workspace folder: {', '.join(missing)}"
    current = notebooks_digest({n: d for n, d in workspace.items() if d is not None})
    if deployed_sha is None or deployed_sha == current:
        return None
    changed = sorted(
        n
        for n, data in workspace.items()
        if data is not None and normalized_source(data) != normalized_source(local[n])
    )
    where = f" (differ from local: {', '.join(changed)})" if changed else ""
    return (
        "the workspace notebooks were changed after deploy"
        f"{where}; the job now runs code it was not deployed with"
    )


def prepared(
    ws: WorkspaceClient | None, options: JobOptions
) -> tuple[JobOptions, dict[str, bytes]]:
    """Options with the workspace folder resolved (needs `ws`) and the local notebooks' hash."""
    local = local_notebooks()
    folder = resolve_workspace_dir(ws, options.workspace_dir) if ws is not None else None
    return replace(
        options,
        workspace_dir=folder or options.workspace_dir,
        notebooks_sha256=notebooks_digest(local),
    ), local


def diff_jobs(
    ws: WorkspaceClient, options: JobOptions, modes: Sequence[str] | None = None
) -> list[JobDiff]:
    """How each deployed job differs from what `deploy` with `options` would write, and whether
    the workspace notebooks drifted from the copy the job was deployed with."""
    options, local = prepared(ws, options)
    wanted = all_job_settings(options, modes)
    found = find_jobs(ws, [JOB_NAMES[m] for m in wanted])
    workspace: dict[str, bytes | None] | None = None
    result = []
    for mode, settings in wanted.items():
        name = JOB_NAMES[mode]
        job_id = single_job_id(name, found[name])
        if job_id is None:
            result.append(JobDiff(mode, name, None))
            continue
        deployed = ws.jobs.get(job_id).settings
        have = deployed.as_dict() if deployed else {}
        if workspace is None:
            workspace = workspace_notebooks(ws, options.workspace_dir, local)
        sha = (have.get("tags") or {}).get(NOTEBOOKS_TAG)
        result.append(
            JobDiff(
                mode,
                name,
                job_id,
                diff_settings(settings, have),
                _drift(sha, workspace, local),
            )
        )
    return result


@dataclass
class DeployResult:
    notebooks: dict[str, str]
    jobs: list[dict[str, Any]]
    workspace_dir: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"notebooks": self.notebooks, "jobs": self.jobs, "workspace_dir": self.workspace_dir}

    def format_text(self) -> str:
        uploaded = [n for n, s in self.notebooks.items() if s == "uploaded"]
        lines = [
            f"notebooks: {len(uploaded)} uploaded, {len(self.notebooks) - len(uploaded)} unchanged"
            + (f" in {self.workspace_dir}" if self.workspace_dir else "")
        ]
        for job in self.jobs:
            line = f"{job['action']} {job['name']} (job {job['job_id']})"
            if job["action"] == "updated":
                line += f": {job['changes']} change(s)"
            lines.append(line)
        return "\n".join(lines)


def deploy(
    ws: WorkspaceClient,
    options: JobOptions,
    *,
    modes: Sequence[str] | None = None,
    log: logging.Logger | None = None,
) -> DeployResult:
    """Upload changed notebooks, then create or fully replace the jobs (tagged with their hash).

    An existing job is always `reset` (a full replacement, so nothing edited by hand survives),
    even when the diff is empty; the diff only decides whether it is reported as updated.
    """
    logger = log or _LOG
    options, local = prepared(ws, options)
    notebooks = sync_notebooks(ws, options.workspace_dir, local, log=logger)
    wanted = all_job_settings(options, modes)
    found = find_jobs(ws, [JOB_NAMES[m] for m in wanted])
    # Check every name before writing anything, so a duplicate never leaves a half deploy.
    ids = {mode: single_job_id(JOB_NAMES[mode], found[JOB_NAMES[mode]]) for mode in wanted}
    results: list[dict[str, Any]] = []
    for mode, settings in wanted.items():
        typed = jobs.JobSettings.from_dict(settings)
        job_id = ids[mode]
        try:
            if job_id is None:
                # Only the keys deploy sets: from_dict turns absent lists into [], and the
                # request must be exactly what --dry-run --json shows.
                created = ws.jobs.create(**{k: getattr(typed, k) for k in settings})
                job_id = int(created.job_id or 0)
                results.append(
                    {
                        "mode": mode,
                        "name": settings["name"],
                        "job_id": job_id,
                        "action": "created",
                        "changes": 0,
                    }
                )
                logger.info("created job %s (%s)", settings["name"], job_id)
                continue
            current = ws.jobs.get(job_id).settings
            changes = diff_settings(settings, current.as_dict() if current else {})
            ws.jobs.reset(job_id, typed)
        except API_ERRORS as exc:
            raise NbPipelineError(
                f"could not deploy job {settings['name']}: {describe_api_error(exc)}"
            ) from None
        results.append(
            {
                "mode": mode,
                "name": settings["name"],
                "job_id": job_id,
                "action": "updated" if changes else "unchanged",
                "changes": len(changes),
            }
        )
        logger.info("reset job %s (%s): %d change(s)", settings["name"], job_id, len(changes))
    return DeployResult(notebooks=notebooks, jobs=results, workspace_dir=options.workspace_dir)
