"""Databricks-native jobs: the four notebooks as `nbpipeline-sequential` and `nbpipeline-parallel`.

Dagster is one way to orchestrate the notebooks; these jobs are the other, run by Databricks'
own scheduler. `deploy` creates or fully replaces (`jobs/reset`) the two jobs, found by exact name
across every page of the job list so a second copy is never created; `diff` shows what deploy
would change; `run_job` triggers one (`run-now`), waits, and reports per-task timings taken from
the run record.

Schedules are given as standard 5-field cron and converted to the Quartz syntax Databricks
expects (`cron_to_quartz`), with an explicit, validated `timezone_id`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

import dagster as dg
from databricks.sdk import WorkspaceClient
from databricks.sdk.service import jobs

from nbpipeline.backends.base import NOTEBOOK_NAMES
from nbpipeline.backends.databricks import (
    API_ERRORS,
    DEFAULT_WORKSPACE_DIR,
    WORKSPACE_DIR_ENV,
    PollPolicy,
    RunDeadlineExceeded,
    cancel_run_quietly,
    check_workspace_dir,
    describe_api_error,
    fetch_error,
    is_terminal,
    life_cycle_of,
    local_notebooks,
    message_of,
    result_of,
    run_timings,
    sync_notebooks,
    wait_for_run,
)
from nbpipeline.errors import ConfigError, NbPipelineError, NotebookError, NotebookTimeout
from nbpipeline.identifiers import parse_schema, parse_table
from nbpipeline.settings import DEFAULT_SOURCE_TABLE

_LOG = logging.getLogger("nbpipeline.databricks_jobs")

MODES = ("sequential", "parallel")
JOB_NAMES = {"sequential": "nbpipeline-sequential", "parallel": "nbpipeline-parallel"}
JOB_CLUSTER_KEY = "nbpipeline_cluster"
# Databricks Runtime 17.3 LTS runs Spark 4.0 (Scala 2.13), the closest LTS to the local engine.
DEFAULT_SPARK_VERSION = "17.3.x-scala2.13"
# Node types are cloud-specific; this is the AWS default. Azure: Standard_D4ds_v5, GCP: n2-standard-4.
DEFAULT_NODE_TYPE_ID = "i3.xlarge"
SPARK_VERSION_ENV = "NBPIPELINE_DATABRICKS_SPARK_VERSION"
NODE_TYPE_ENV = "NBPIPELINE_DATABRICKS_NODE_TYPE_ID"
DEFAULT_HIGH_VALUE_THRESHOLD = "1000.00"


# --------------------------------------------------------------------------------------------
# Cron -> Quartz
# --------------------------------------------------------------------------------------------

_MONTHS = {
    m: i
    for i, m in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1
    )
}
_DAYS = {
    d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])
}  # cron: SUN=0
_QUARTZ_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")  # Quartz: SUN=1 .. SAT=7
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_CRON_HINT = "5 fields: minute hour day-of-month month day-of-week, e.g. '30 6 * * MON-FRI'"


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: Mapping[str, int] | None = None


_CRON_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, _MONTHS),
    _Field("day-of-week", 0, 7, _DAYS),  # 7 is Sunday too, as in every common cron
)


def _cron_error(expr: str, reason: str) -> ConfigError:
    return ConfigError(f"invalid cron {expr!r}: {reason}", hint=_CRON_HINT)


def _value(expr: str, fld: _Field, token: str) -> int:
    upper = token.upper()
    if fld.names is not None and upper in fld.names:
        return fld.names[upper]
    if not token.isdigit():
        names = f" or a name ({', '.join(fld.names)})" if fld.names else ""
        raise _cron_error(expr, f"{fld.name} value {token!r} is not a number{names}")
    number = int(token)
    if not fld.low <= number <= fld.high:
        raise _cron_error(expr, f"{fld.name} value {number} is outside {fld.low}-{fld.high}")
    return number


@dataclass(frozen=True)
class _Element:
    """One comma-separated item: `*`, `a`, `a-b`, with an optional `/step`."""

    start: int | None  # None: `*`
    end: int | None
    step: int | None

    def values(self, fld: _Field) -> list[int]:
        low = fld.low if self.start is None else self.start
        high = fld.high if self.end is None else self.end
        return list(range(low, high + 1, self.step or 1))


def _parse_element(expr: str, fld: _Field, item: str) -> _Element:
    if not item:
        raise _cron_error(expr, f"empty item in {fld.name}")
    body, _, step_text = item.partition("/")
    step = None
    if "/" in item:
        if not step_text.isdigit() or int(step_text) == 0:
            raise _cron_error(expr, f"{fld.name} step {step_text!r} must be a positive number")
        step = int(step_text)
    if body == "*":
        return _Element(None, None, step)
    if body in ("?", "L", "W") or any(c in body for c in "#LW?"):
        raise _cron_error(expr, f"{body!r} in {fld.name} is Quartz syntax, not standard cron")
    low_text, dash, high_text = body.partition("-")
    start = _value(expr, fld, low_text)
    if not dash:
        # `a/n` (cronie): from a to the field's maximum every n. Plain `a` is just a.
        return _Element(start, None if step else start, step)
    end = _value(expr, fld, high_text)
    if end < start:
        raise _cron_error(expr, f"{fld.name} range {body!r} runs backwards")
    return _Element(start, end, step)


def _quartz_plain(fld: _Field, elements: list[_Element]) -> str:
    """Minute, hour, day-of-month, month: same numbering in cron and Quartz."""
    out: list[str] = []
    for el in elements:
        if el.start is None:
            # Quartz writes `*/n` as `first/n`; its `*` needs no translation.
            out.append(f"{fld.low}/{el.step}" if el.step else "*")
        elif el.end is None:
            out.append(f"{el.start}/{el.step}")  # same meaning in Quartz
        elif el.step:
            # Ranges with steps are spelled out: a plain list is unambiguous in every parser.
            out.extend(str(v) for v in el.values(fld))
        elif el.start == el.end:
            out.append(str(el.start))
        else:
            out.append(f"{el.start}-{el.end}")
    return ",".join(out)


def _quartz_days(fld: _Field, elements: list[_Element]) -> str:
    """Day-of-week: cron SUN=0 (or 7) .. SAT=6 becomes Quartz SUN=1 .. SAT=7, written as names.

    The field is expanded to the set of days and re-written, so ranges that end on Sunday
    (`5-7`) and steps (`*/2`) come out right without relying on Quartz's wrap-around rules.
    """
    days = sorted({(v % 7) + 1 for el in elements for v in el.values(fld)})
    if len(days) == 7:
        return "*"
    runs: list[list[int]] = []
    for d in days:
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    parts: list[str] = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{_QUARTZ_DAYS[run[0] - 1]}-{_QUARTZ_DAYS[run[-1] - 1]}")
        else:
            parts.extend(_QUARTZ_DAYS[d - 1] for d in run)
    return ",".join(parts)


def cron_to_quartz(expr: str) -> str:
    """Convert a standard 5-field cron expression to a Databricks (Quartz) cron expression.

    Quartz adds a seconds field (always 0 here), numbers weekdays SUN=1..SAT=7, and requires `?`
    in exactly one of day-of-month and day-of-week. Standard cron runs on day-of-month OR
    day-of-week when both are restricted; Quartz cannot say that, so it is refused.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise _cron_error(str(expr), "empty expression")
    text = " ".join(expr.split())
    if text.startswith("@"):
        if text.lower() not in _MACROS:
            raise _cron_error(expr, f"unknown macro {text!r} (known: {', '.join(_MACROS)})")
        text = _MACROS[text.lower()]
    fields = text.split(" ")
    if len(fields) != 5:
        raise _cron_error(expr, f"expected 5 fields, got {len(fields)}")
    parsed: list[list[_Element]] = []
    for fld, raw in zip(_CRON_FIELDS, fields, strict=True):
        items = raw.split(",")
        elements = [_parse_element(expr, fld, item) for item in items]
        if len(elements) > 1 and any(el.start is None and el.step is None for el in elements):
            raise _cron_error(expr, f"'*' cannot be part of a list in {fld.name}")
        parsed.append(elements)
    minute, hour, dom, month, dow = (
        _quartz_plain(_CRON_FIELDS[0], parsed[0]),
        _quartz_plain(_CRON_FIELDS[1], parsed[1]),
        _quartz_plain(_CRON_FIELDS[2], parsed[2]),
        _quartz_plain(_CRON_FIELDS[3], parsed[3]),
        _quartz_days(_CRON_FIELDS[4], parsed[4]),
    )
    dom_any, dow_any = fields[2] == "*", fields[4] == "*"
    if not dom_any and not dow_any:
        raise _cron_error(
            expr,
            "both day-of-month and day-of-week are set; cron runs on either, which Quartz "
            "cannot express (use '*' in one of them)",
        )
    if dow_any:
        dow = "?"
    else:
        dom = "?"
    return f"0 {minute} {hour} {dom} {month} {dow}"


def check_timezone(name: str) -> str:
    """Return `name` if it is an IANA time zone (the IDs Databricks accepts), else ConfigError."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("timezone is empty", hint="e.g. UTC or Europe/Amsterdam")
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown timezone {name!r}", hint="use an IANA name such as UTC or Europe/Amsterdam"
        ) from None
    return name


# --------------------------------------------------------------------------------------------
# Job settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOptions:
    """What `deploy` writes; every value is validated by `validated()`."""

    workspace_dir: str = DEFAULT_WORKSPACE_DIR
    source_table: str = DEFAULT_SOURCE_TABLE
    target_schema: str = ""
    high_value_threshold: str = DEFAULT_HIGH_VALUE_THRESHOLD
    cron: str | None = None
    timezone: str = "UTC"
    paused: bool = True
    spark_version: str = DEFAULT_SPARK_VERSION
    node_type_id: str = DEFAULT_NODE_TYPE_ID
    num_workers: int = 1
    task_timeout_seconds: int = 3600
    job_timeout_seconds: int = 4 * 3600

    @classmethod
    def from_env(cls, **overrides: Any) -> JobOptions:
        """Defaults, then NBPIPELINE_DATABRICKS_* variables, then explicit (non-None) overrides."""
        env = {
            "workspace_dir": os.environ.get(WORKSPACE_DIR_ENV),
            "spark_version": os.environ.get(SPARK_VERSION_ENV),
            "node_type_id": os.environ.get(NODE_TYPE_ENV),
        }
        values = {k: v for k, v in env.items() if v}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def validated(self) -> JobOptions:
        parse_table(self.source_table, what="source_table")
        if self.target_schema:
            parse_schema(self.target_schema, what="target_schema")
        try:
            threshold = Decimal(str(self.high_value_threshold))
        except InvalidOperation:
            threshold = Decimal("NaN")
        if not threshold.is_finite() or threshold < 0:
            raise ConfigError(
                f"high_value_threshold {self.high_value_threshold!r} must be a number >= 0"
            )
        if self.cron is None and not self.paused:
            raise ConfigError("--unpaused needs a schedule: pass --cron too")
        if self.cron is not None:
            cron_to_quartz(self.cron)
        check_timezone(self.timezone)
        for name in ("spark_version", "node_type_id"):
            value = getattr(self, name)
            if not value or not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
                raise ConfigError(f"{name} {value!r} is not a valid Databricks identifier")
        if int(self.num_workers) < 0:
            raise ConfigError(f"num_workers must be >= 0 (got {self.num_workers})")
        for name in ("task_timeout_seconds", "job_timeout_seconds"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0")
        return replace(
            self,
            workspace_dir=check_workspace_dir(self.workspace_dir),
            high_value_threshold=str(self.high_value_threshold).strip(),
            num_workers=int(self.num_workers),
        )


def notebook_parameters(notebook: str, options: JobOptions) -> dict[str, str]:
    """The widget values a notebook task gets (`base_parameters`)."""
    params = {"source_table": options.source_table, "target_schema": options.target_schema}
    if notebook == "Notebook4":
        params["high_value_threshold"] = options.high_value_threshold
    return params


def build_job_settings(mode: str, options: JobOptions) -> dict[str, Any]:
    """The exact settings `deploy` writes for `mode` (sequential or parallel), as a JSON dict."""
    if mode not in JOB_NAMES:
        raise ConfigError(f"unknown job {mode!r}: expected one of {', '.join(MODES)}")
    cluster: dict[str, Any] = {
        "spark_version": options.spark_version,
        "node_type_id": options.node_type_id,
        "num_workers": options.num_workers,
        # Unity Catalog needs an access mode; single user (the job's run-as identity) suits jobs.
        "data_security_mode": "SINGLE_USER",
    }
    tasks: list[dict[str, Any]] = []
    for i, notebook in enumerate(NOTEBOOK_NAMES):
        task: dict[str, Any] = {
            "task_key": notebook,
            "description": f"nbpipeline {notebook}",
            "job_cluster_key": JOB_CLUSTER_KEY,
            "notebook_task": {
                "notebook_path": f"{options.workspace_dir}/{notebook}",
                "source": "WORKSPACE",
                "base_parameters": notebook_parameters(notebook, options),
            },
            "timeout_seconds": options.task_timeout_seconds,
            "max_retries": 0,
        }
        if mode == "sequential" and i > 0:
            task["depends_on"] = [{"task_key": NOTEBOOK_NAMES[i - 1]}]
        tasks.append(task)
    settings: dict[str, Any] = {
        "name": JOB_NAMES[mode],
        "description": (
            "nbpipeline notebooks Notebook1 -> Notebook4, "
            + ("one after another" if mode == "sequential" else "all at once")
            + ". Managed by `nbpipeline databricks deploy`; edits here are overwritten."
        ),
        "tags": {"managed_by": "nbpipeline", "nbpipeline_mode": mode},
        "max_concurrent_runs": 1,
        "timeout_seconds": options.job_timeout_seconds,
        "queue": {"enabled": True},
        "job_clusters": [{"job_cluster_key": JOB_CLUSTER_KEY, "new_cluster": cluster}],
        "tasks": tasks,
    }
    if options.cron is not None:
        settings["schedule"] = {
            "quartz_cron_expression": cron_to_quartz(options.cron),
            "timezone_id": options.timezone,
            "pause_status": "PAUSED" if options.paused else "UNPAUSED",
        }
    check_job_settings(settings)
    return settings


def check_job_settings(settings: Mapping[str, Any]) -> None:
    """The dict must survive databricks-sdk's JobSettings unchanged: no unknown or mistyped key."""
    round_trip = jobs.JobSettings.from_dict(dict(settings)).as_dict()
    if round_trip != settings:
        raise NbPipelineError(
            "internal error: job settings do not round-trip through databricks-sdk JobSettings"
        )


def all_job_settings(
    options: JobOptions, modes: Sequence[str] = MODES
) -> dict[str, dict[str, Any]]:
    """Settings of the jobs for `modes` (both by default), keyed by mode."""
    return {mode: build_job_settings(mode, options) for mode in modes}


# --------------------------------------------------------------------------------------------
# Finding, diffing and deploying
# --------------------------------------------------------------------------------------------


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


def _single(name: str, ids: list[int]) -> int | None:
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

    @property
    def exists(self) -> bool:
        return self.job_id is not None

    @property
    def in_sync(self) -> bool:
        return self.exists and not self.changes

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "name": self.name,
            "job_id": self.job_id,
            "exists": self.exists,
            "in_sync": self.in_sync,
            "changes": [asdict(c) for c in self.changes],
        }

    def format_text(self) -> str:
        if not self.exists:
            return f"{self.name}: not deployed; deploy would create it"
        if not self.changes:
            return f"{self.name} (job {self.job_id}): up to date"
        lines = [f"{self.name} (job {self.job_id}): {len(self.changes)} difference(s)"]
        lines += [f"  {c}" for c in self.changes]
        return "\n".join(lines)


def diff_jobs(
    ws: WorkspaceClient, options: JobOptions, modes: Sequence[str] = MODES
) -> list[JobDiff]:
    """How each deployed job differs from what `deploy` with `options` would write."""
    wanted = all_job_settings(options, modes)
    found = find_jobs(ws, [JOB_NAMES[m] for m in wanted])
    result = []
    for mode, settings in wanted.items():
        name = JOB_NAMES[mode]
        job_id = _single(name, found[name])
        if job_id is None:
            result.append(JobDiff(mode, name, None))
            continue
        deployed = ws.jobs.get(job_id).settings
        result.append(
            JobDiff(
                mode, name, job_id, diff_settings(settings, deployed.as_dict() if deployed else {})
            )
        )
    return result


@dataclass
class DeployResult:
    notebooks: dict[str, str]
    jobs: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"notebooks": self.notebooks, "jobs": self.jobs}

    def format_text(self) -> str:
        uploaded = [n for n, s in self.notebooks.items() if s == "uploaded"]
        lines = [
            f"notebooks: {len(uploaded)} uploaded, {len(self.notebooks) - len(uploaded)} unchanged"
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
    modes: Sequence[str] = MODES,
    log: logging.Logger | None = None,
) -> DeployResult:
    """Upload changed notebooks, then create or fully replace both jobs.

    An existing job is always `reset` (a full replacement, so nothing edited by hand survives),
    even when the diff is empty; the diff only decides whether it is reported as updated.
    """
    logger = log or _LOG
    notebooks = sync_notebooks(ws, options.workspace_dir, local_notebooks(), log=logger)
    wanted = all_job_settings(options, modes)
    found = find_jobs(ws, [JOB_NAMES[m] for m in wanted])
    # Check every name before writing anything, so a duplicate never leaves a half deploy.
    ids = {mode: _single(JOB_NAMES[mode], found[JOB_NAMES[mode]]) for mode in wanted}
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
    return DeployResult(notebooks=notebooks, jobs=results)


# --------------------------------------------------------------------------------------------
# Running a job
# --------------------------------------------------------------------------------------------


@dataclass
class TaskTiming:
    task_key: str
    run_id: int | None
    state: str
    result: str | None
    start_offset_s: float | None  # None: the task never started (e.g. upstream failed)
    queue_s: float
    setup_s: float
    execution_s: float
    cleanup_s: float
    end_offset_s: float | None
    run_url: str | None = None
    error: str | None = None


@dataclass
class JobRunReport:
    mode: str
    name: str
    job_id: int
    run_id: int
    run_url: str | None
    state: str
    result: str | None
    message: str
    start_time: float
    end_time: float
    duration_s: float
    queue_s: float
    tasks: list[TaskTiming]

    @property
    def succeeded(self) -> bool:
        return self.state == "TERMINATED" and self.result == "SUCCESS"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        head = (
            f"{self.name} run {self.run_id}: {self.result or self.state} "
            f"in {self.duration_s:.1f}s (queue {self.queue_s:.1f}s)"
        )
        lines = [head]
        if self.run_url:
            lines.append(self.run_url)
        lines.append(
            f"{'task':<10} {'result':<16} {'start':>8} {'setup':>8} {'execution':>10} "
            f"{'cleanup':>8} {'end':>8}"
        )
        for t in self.tasks:
            start = "-" if t.start_offset_s is None else f"{t.start_offset_s:+.1f}s"
            end = "-" if t.end_offset_s is None else f"{t.end_offset_s:+.1f}s"
            lines.append(
                f"{t.task_key:<10} {(t.result or t.state):<16} {start:>8} "
                f"{t.setup_s:>7.1f}s {t.execution_s:>9.1f}s {t.cleanup_s:>7.1f}s {end:>8}"
            )
            if t.error:
                lines.append(f"{'':<10} error: {t.error}")
        return "\n".join(lines)


def _offset(ms: int | None, origin_ms: int) -> float:
    return round(((ms or 0) - origin_ms) / 1000.0, 3)


def job_run_report(ws: WorkspaceClient, mode: str, job_id: int, run: jobs.Run) -> JobRunReport:
    """Timings of a finished job run, from the run record (Databricks' timestamps)."""
    start_ms = run.start_time or 0
    end_ms = run.end_time or 0
    tasks = []
    # In start order; tasks that never started go last, in the job's own order.
    order = {id(t): i for i, t in enumerate(run.tasks or [])}
    never = float("inf")
    for task in sorted(run.tasks or [], key=lambda t: (t.start_time or never, order[id(t)])):
        timings = run_timings(task)
        started = bool(task.start_time and start_ms)
        result = result_of(task)
        error = None
        # Tasks skipped because an upstream one failed have no error of their own.
        own_failure = result not in (None, "SUCCESS") and not str(result).startswith("UPSTREAM_")
        if own_failure and task.run_id and is_terminal(task):
            err, _ = fetch_error(ws, int(task.run_id))
            error = err or message_of(task) or None
        tasks.append(
            TaskTiming(
                task_key=task.task_key or "?",
                run_id=task.run_id,
                state=life_cycle_of(task),
                result=result,
                start_offset_s=_offset(task.start_time, start_ms) if started else None,
                end_offset_s=_offset(task.end_time, start_ms)
                if started and task.end_time
                else None,
                run_url=task.run_page_url,
                error=error,
                **timings,
            )
        )
    duration_ms = run.run_duration or (end_ms - start_ms if end_ms else 0)
    return JobRunReport(
        mode=mode,
        name=JOB_NAMES[mode],
        job_id=job_id,
        run_id=int(run.run_id or 0),
        run_url=run.run_page_url,
        state=life_cycle_of(run),
        result=result_of(run),
        message=message_of(run),
        start_time=start_ms / 1000.0,
        end_time=end_ms / 1000.0,
        duration_s=round(duration_ms / 1000.0, 3),
        queue_s=round((run.queue_duration or 0) / 1000.0, 3),
        tasks=tasks,
    )


def run_job(
    ws: WorkspaceClient,
    mode: str,
    *,
    timeout_seconds: float = 4 * 3600,
    policy: PollPolicy | None = None,
    log: logging.Logger | None = None,
    cancel_timeout: float = 30.0,
) -> JobRunReport:
    """Trigger the deployed job for `mode` (run-now), wait for it, and report its timings.

    Interrupting the wait (Ctrl-C, Dagster termination) cancels the Databricks run first. A run
    that does not finish within `timeout_seconds` is cancelled and NotebookTimeout is raised.
    A failed run is *returned* (with per-task errors) so the caller can show its timings.
    """
    logger = log or _LOG
    if mode not in JOB_NAMES:
        raise ConfigError(f"unknown job {mode!r}: expected one of {', '.join(MODES)}")
    name = JOB_NAMES[mode]
    job_id = _single(name, find_jobs(ws, [name])[name])
    if job_id is None:
        raise ConfigError(f"job {name} is not deployed", hint="run `nbpipeline databricks deploy`")
    try:
        # A fresh token per invocation: the SDK re-sends it on transient errors, so an HTTP
        # retry cannot start the job twice, while a second `run` command does start a new run.
        waiter = ws.jobs.run_now(job_id, idempotency_token=f"nbpipeline-{uuid.uuid4().hex}")
    except API_ERRORS as exc:
        raise NbPipelineError(f"could not start job {name}: {describe_api_error(exc)}") from None
    run_id = int(waiter.run_id)
    logger.info("started %s (job %s) as run %s", name, job_id, run_id)
    deadline = time.monotonic() + timeout_seconds
    try:
        run = wait_for_run(
            ws, run_id, deadline=deadline, policy=policy or PollPolicy(), log=logger, label=name
        )
    except RunDeadlineExceeded as exc:
        cancel_run_quietly(ws, run_id, log=logger, timeout=cancel_timeout)
        url = exc.run.run_page_url if exc.run is not None else None
        raise NotebookTimeout(
            f"no result after {timeout_seconds:.0f}s; the Databricks run was cancelled",
            notebook=name,
            run_url=url,
            run_id=run_id,
            hint=f"see {url}" if url else None,
        ) from None
    except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError):
        cancel_run_quietly(ws, run_id, log=logger, timeout=cancel_timeout)
        raise
    except API_ERRORS as exc:
        raise NbPipelineError(
            f"lost track of run {run_id} of {name} ({describe_api_error(exc)}); it may still be running"
        ) from None
    return job_run_report(ws, mode, job_id, run)


def failure_error(report: JobRunReport) -> NotebookError:
    """The error to raise for a job run that did not succeed, naming the first failed task."""
    failed = [t for t in report.tasks if t.result not in ("SUCCESS", None) and t.error]
    failed = failed or [t for t in report.tasks if t.result not in ("SUCCESS",)]
    if failed:
        first = failed[0]
        reason = f"{first.result or first.state} in job {report.name}"
        if first.error:
            reason += f": {first.error}"
        where = first.task_key
    else:
        reason = f"{report.result or report.state}: {report.message or 'no message'}"
        where = report.name
    return NotebookError(
        reason,
        notebook=where,
        run_url=report.run_url,
        run_id=report.run_id,
        hint=f"see {report.run_url}" if report.run_url else None,
    )
