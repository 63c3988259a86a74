"""Databricks-native jobs: the notebooks as task graphs, the orchestration notebooks, a comparison.

Dagster is one way to orchestrate the notebooks; these jobs are the other, run by Databricks'
own scheduler. Two layouts: `task-graph` (`nbpipeline-sequential` and `nbpipeline-parallel`, the
four notebooks as job tasks) and `orchestration` (the original design's jobs, one task each running
`SequentialOrchestration` or `ParallelOrchestration`, plus `nbpipeline-comparison`, which runs both
one after another on one pinned source version). `deploy` creates or fully replaces (`jobs/reset`)
the jobs, found by exact name across every page of the job list so a second copy is never created;
`diff` shows what deploy would change and whether the workspace notebooks drifted; `run_job`
triggers one (`run-now`), waits, and reports per-notebook timings taken from the run records.

Schedules are given as standard 5-field cron and converted to the Quartz syntax Databricks
expects (`cron_to_quartz`), with an explicit, validated `timezone_id`; two jobs never start at the
same minute (`check_schedules`), because every job MERGEs the same five tables.
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
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
from databricks.sdk import WorkspaceClient
from databricks.sdk.service import jobs

from nbpipeline import settings as nb_settings
from nbpipeline.backends.base import NOTEBOOK_NAMES
from nbpipeline.backends.databricks import (
    API_ERRORS,
    HOST_ENV,
    USER_WORKSPACE_DIR,
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
    notebooks_digest,
    resolve_workspace_dir,
    result_of,
    run_timings,
    sync_notebooks,
    wait_for_run,
    workspace_notebooks,
)
from nbpipeline.errors import ConfigError, NbPipelineError, NotebookError, NotebookTimeout
from nbpipeline.runtime import declared_widgets
from nbpipeline.settings import DEFAULT_SOURCE_TABLE

_LOG = logging.getLogger("nbpipeline.databricks_jobs")

TASK_GRAPH, ORCHESTRATION = "task-graph", "orchestration"
LAYOUTS = (TASK_GRAPH, ORCHESTRATION)
JOB_CLUSTER_KEY = "nbpipeline_cluster"
# Databricks Runtime 17.3 LTS runs Spark 4.0 (Scala 2.13), the closest LTS to the local engine.
DEFAULT_SPARK_VERSION = "17.3.x-scala2.13"
SPARK_VERSION_ENV = "NBPIPELINE_DATABRICKS_SPARK_VERSION"
NODE_TYPE_ENV = "NBPIPELINE_DATABRICKS_NODE_TYPE_ID"


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
class JobKind:
    """One deployable job: its name, layout and what kind of run it is for `compare`."""

    key: str
    name: str
    layout: str
    style: str  # sequential | parallel | comparison
    summary: str


JOB_KINDS: dict[str, JobKind] = {
    k.key: k
    for k in (
        JobKind(
            "sequential",
            "nbpipeline-sequential",
            TASK_GRAPH,
            "sequential",
            "Notebook1 -> Notebook4 as chained job tasks",
        ),
        JobKind(
            "parallel",
            "nbpipeline-parallel",
            TASK_GRAPH,
            "parallel",
            "Notebook1..4 as independent job tasks, all at once",
        ),
        JobKind(
            "orchestration-sequential",
            "nbpipeline-orchestration-sequential",
            ORCHESTRATION,
            "sequential",
            "one task running SequentialOrchestration (dbutils.notebook.run, one after another)",
        ),
        JobKind(
            "orchestration-parallel",
            "nbpipeline-orchestration-parallel",
            ORCHESTRATION,
            "parallel",
            "one task running ParallelOrchestration (dbutils.notebook.run from a thread pool)",
        ),
        JobKind(
            "comparison",
            "nbpipeline-comparison",
            ORCHESTRATION,
            "comparison",
            "pins the source version, then SequentialOrchestration, then ParallelOrchestration",
        ),
    )
}
MODES = tuple(JOB_KINDS)
JOB_NAMES = {k: kind.name for k, kind in JOB_KINDS.items()}
ORCHESTRATION_NOTEBOOKS = {
    "orchestration-sequential": "SequentialOrchestration",
    "orchestration-parallel": "ParallelOrchestration",
}
PIN_NOTEBOOK = "PinSourceVersion"
# What the pin task hands to the orchestration tasks of the comparison job (a task value).
SOURCE_VERSION_REF = "{{tasks.PinSourceVersion.values.source_version}}"
# The four tasks of one task-graph job run read the source as of the job run's start (UTC), so
# all five tables of that run derive from one source version, as in a Dagster run.
JOB_START_REF = "{{job.start_time.iso_datetime}}"
NOTEBOOKS_TAG = "nbpipeline_notebooks_sha256"

COMPUTE_KINDS = ("serverless", "job-cluster", "existing:<cluster-id>")
# The node type a job cluster gets on each cloud unless --node-type-id says otherwise: general
# purpose, 4 cores, local disk for Spark's shuffle and Delta's caches.
DEFAULT_NODE_TYPES = {"aws": "i3.xlarge", "azure": "Standard_D4ds_v5", "gcp": "n2-standard-4"}
# A failed notebook task is retried once after a minute. The Jobs API cannot retry on one error
# class only; the retry is there for Delta's concurrent-modification conflicts, and rerunning a
# notebook whose MERGE failed for another reason is harmless (a MERGE commits whole or not at all).
TASK_MAX_RETRIES = 1
TASK_RETRY_INTERVAL_MS = 60_000


def cloud_of(host: str) -> str | None:
    """aws, azure or gcp from a workspace URL; None for anything else."""
    name = (urlsplit(host if "://" in host else "https://" + host).hostname or "").lower()
    if name.endswith(".azuredatabricks.net"):
        return "azure"
    if name.endswith(".gcp.databricks.com"):
        return "gcp"
    if name.endswith(".cloud.databricks.com"):
        return "aws"
    return None


def parse_compute(value: str) -> tuple[str, str]:
    """('serverless'|'job-cluster'|'existing', cluster id or '') from the --compute value."""
    text = (value or "").strip()
    if text in ("serverless", "job-cluster"):
        return text, ""
    if text.startswith("existing:"):
        cluster_id = text.split(":", 1)[1].strip()
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9\-]*", cluster_id):
            return "existing", cluster_id
    raise ConfigError(
        f"invalid compute {value!r}: expected one of {', '.join(COMPUTE_KINDS)}",
        hint="e.g. --compute existing:0123-456789-abcdefgh",
    )


_EMAIL_RE = re.compile(r"[^@\s,;]+@[^@\s,;]+\.[^@\s,;]+")
_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_PARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class JobOptions:
    """What `deploy` and `bundle` write; every value is validated by `validated()`."""

    workspace_dir: str = USER_WORKSPACE_DIR
    source_table: str = DEFAULT_SOURCE_TABLE
    target_schema: str = ""
    high_value_threshold: str = ""  # empty: Notebook4's own widget default
    cron: str | None = None  # the comparison job's schedule
    crons: tuple[tuple[str, str], ...] = ()  # (job key, cron) for the other jobs
    timezone: str = "UTC"
    paused: bool = True
    layouts: tuple[str, ...] = LAYOUTS
    compute: str = "serverless"
    host: str = ""  # the workspace URL, for the job cluster's default node type
    spark_version: str = DEFAULT_SPARK_VERSION
    node_type_id: str = ""  # empty: the default of the workspace's cloud
    num_workers: int = 1
    notify: tuple[str, ...] = ()
    run_as: str = ""
    parameters: tuple[tuple[str, str], ...] = ()
    task_timeout_seconds: int = 3600
    job_timeout_seconds: int = 4 * 3600
    notebooks_sha256: str = ""

    @classmethod
    def from_env(cls, **overrides: Any) -> JobOptions:
        """Defaults, then NBPIPELINE_DATABRICKS_* variables, then explicit (non-None) overrides."""
        env = {
            "workspace_dir": os.environ.get(WORKSPACE_DIR_ENV),
            "spark_version": os.environ.get(SPARK_VERSION_ENV),
            "node_type_id": os.environ.get(NODE_TYPE_ENV),
            "host": os.environ.get(HOST_ENV),
        }
        values = {k: v for k, v in env.items() if v}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def compute_choice(self) -> tuple[str, str]:
        return parse_compute(self.compute)

    def resolved_node_type(self) -> str:
        if self.node_type_id:
            return self.node_type_id
        cloud = cloud_of(self.host) if self.host else None
        if cloud is None:
            where = f"{self.host} is not" if self.host else f"{HOST_ENV} is not set, so it is not"
            raise ConfigError(
                f"--compute job-cluster needs a node type: {where} a recognised AWS, Azure or "
                "GCP workspace URL",
                hint=f"pass --node-type-id (e.g. {', '.join(DEFAULT_NODE_TYPES.values())})",
            )
        return DEFAULT_NODE_TYPES[cloud]

    def validated(self) -> JobOptions:
        from nbpipeline.widgets import validate_widget_values

        if not str(self.high_value_threshold).strip():
            # The notebook's own default, read from its source: one value, not a copy of it.
            defaults = declared_widgets(nb_settings.notebooks_dir() / "Notebook4.py")
            if "high_value_threshold" not in defaults:
                raise ConfigError("Notebook4 declares no high_value_threshold widget")
            return replace(self, high_value_threshold=defaults["high_value_threshold"]).validated()
        validate_widget_values(
            {
                "source_table": self.source_table,
                "target_schema": self.target_schema,
                "high_value_threshold": self.high_value_threshold,
            }
        )
        unknown = [lay for lay in self.layouts if lay not in LAYOUTS]
        if unknown or not self.layouts:
            raise ConfigError(
                f"unknown layout(s) {', '.join(unknown) or '(none)'}: expected {', '.join(LAYOUTS)}"
            )
        scheduled = dict(self.crons)
        for key in scheduled:
            if key not in JOB_KINDS or key == "comparison":
                raise ConfigError(f"no per-job cron for {key!r}; --cron schedules the comparison")
        if self.cron is None and not scheduled and not self.paused:
            raise ConfigError("--unpaused needs a schedule: pass --cron too")
        for expr in [self.cron, *scheduled.values()]:
            if expr is not None:
                cron_to_quartz(expr)
        check_timezone(self.timezone)
        kind, _ = parse_compute(self.compute)
        names = {"spark_version": self.spark_version}
        if self.node_type_id:
            names["node_type_id"] = self.node_type_id
        for name, value in names.items():
            if not value or not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
                raise ConfigError(f"{name} {value!r} is not a valid Databricks identifier")
        if int(self.num_workers) < 0:
            raise ConfigError(f"num_workers must be >= 0 (got {self.num_workers})")
        if kind == "job-cluster":
            self.resolved_node_type()
        for address in self.notify:
            if not _EMAIL_RE.fullmatch(address):
                raise ConfigError(f"--notify {address!r} is not an e-mail address")
        if self.run_as and not (
            _EMAIL_RE.fullmatch(self.run_as) or _UUID_RE.fullmatch(self.run_as)
        ):
            raise ConfigError(
                f"--run-as {self.run_as!r}: expected a user's e-mail or a service principal's "
                "application id (UUID)"
            )
        for name, _value in self.parameters:
            if not _PARAM_RE.fullmatch(name):
                raise ConfigError(f"job parameter name {name!r} must be a plain identifier")
        for name in ("task_timeout_seconds", "job_timeout_seconds"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0")
        checked = replace(
            self,
            workspace_dir=check_workspace_dir(self.workspace_dir),
            high_value_threshold=str(self.high_value_threshold).strip(),
            num_workers=int(self.num_workers),
        )
        check_schedules(checked.schedules(), checked.timezone)
        return checked

    def modes(self) -> tuple[str, ...]:
        """The jobs the chosen layouts deploy, in order."""
        return tuple(k for k, kind in JOB_KINDS.items() if kind.layout in self.layouts)

    def schedules(self) -> dict[str, str]:
        """Job key -> cron of every job deploy schedules."""
        out = dict(self.crons)
        if self.cron is not None:
            out["comparison"] = self.cron
        return {k: v for k, v in out.items() if k in self.modes()}


# -- schedules that never start two table-sharing jobs together --------------------------------


def _fire_sets(expr: str) -> tuple[list[set[int]], bool, bool]:
    """The minute, hour, day-of-month, month and day-of-week sets of a 5-field cron."""
    cron_to_quartz(expr)  # validates, with the user-facing message
    text = " ".join(expr.split())
    text = _MACROS.get(text.lower(), text)
    fields = text.split(" ")
    sets = []
    for fld, raw in zip(_CRON_FIELDS, fields, strict=True):
        values = {v for item in raw.split(",") for v in _parse_element(expr, fld, item).values(fld)}
        sets.append({v % 7 for v in values} if fld.name == "day-of-week" else values)
    return sets, fields[2] == "*", fields[4] == "*"


def first_common_start(a: str, b: str) -> str | None:
    """'HH:MM' at which both crons (same time zone) start on some day, or None if they never do.

    Standard cron runs on day-of-month OR day-of-week; `cron_to_quartz` refuses both, so each
    schedule restricts at most one of them. A day-of-month set and a day-of-week set always meet
    on some date, so only two sets of the same kind can keep two schedules apart.
    """
    (sa, dom_any_a, dow_any_a), (sb, dom_any_b, dow_any_b) = _fire_sets(a), _fire_sets(b)
    minutes, hours, months = sa[0] & sb[0], sa[1] & sb[1], sa[3] & sb[3]
    if not (minutes and hours and months):
        return None
    if not dom_any_a and not dom_any_b and not sa[2] & sb[2]:
        return None
    if not dow_any_a and not dow_any_b and not sa[4] & sb[4]:
        return None
    return f"{min(hours):02d}:{min(minutes):02d}"


def check_schedules(schedules: Mapping[str, str], timezone: str) -> None:
    """Refuse schedules that start two jobs at the same minute: all of them write the same five
    tables, so one would fail on a Delta concurrent-write conflict and both timings would skew."""
    keys = list(schedules)
    for i, first in enumerate(keys):
        for second in keys[i + 1 :]:
            when = first_common_start(schedules[first], schedules[second])
            if when is not None:
                raise ConfigError(
                    f"schedules of {JOB_NAMES[first]} ({schedules[first]!r}) and "
                    f"{JOB_NAMES[second]} ({schedules[second]!r}) both start at {when} "
                    f"{timezone}; they write the same tables",
                    hint="give them different minutes or hours, or schedule only the "
                    "comparison job (--cron), which runs both orchestrations one after another",
                )


# -- building the settings ---------------------------------------------------------------------


def notebook_parameters(notebook: str, options: JobOptions) -> dict[str, str]:
    """The widget values a notebook task gets (`base_parameters`)."""
    params = {
        "source_table": options.source_table,
        "target_schema": options.target_schema,
        "source_version": JOB_START_REF,
    }
    if notebook == "Notebook4":
        params["high_value_threshold"] = options.high_value_threshold
    return params


def orchestration_parameters(options: JobOptions, *, source_version: str = "") -> dict[str, str]:
    """The widget values of an orchestration notebook task; it passes them on to the four."""
    params = {
        "source_table": options.source_table,
        "target_schema": options.target_schema,
        "high_value_threshold": options.high_value_threshold,
        "timeout_seconds": str(options.task_timeout_seconds or 3600),
    }
    if source_version:
        # Needs the `source_version` widget in the orchestration notebooks, which pass it on.
        params["source_version"] = source_version
    return params


def _cluster_spec(options: JobOptions) -> dict[str, Any]:
    return {
        "spark_version": options.spark_version,
        "node_type_id": options.resolved_node_type(),
        "num_workers": options.num_workers,
        # Unity Catalog needs an access mode; single user (the job's run-as identity) suits jobs.
        "data_security_mode": "SINGLE_USER",
    }


def _task(
    options: JobOptions,
    key: str,
    notebook: str,
    params: Mapping[str, str],
    *,
    depends_on: str | None = None,
    timeout: int | None = None,
    retries: bool = True,
    notebook_dir: str | None = None,
) -> dict[str, Any]:
    folder = options.workspace_dir if notebook_dir is None else notebook_dir
    task: dict[str, Any] = {
        "task_key": key,
        "description": f"nbpipeline {notebook}",
        "notebook_task": {
            "notebook_path": f"{folder}/{notebook}",
            "source": "WORKSPACE",
            "base_parameters": dict(params),
        },
        "timeout_seconds": options.task_timeout_seconds if timeout is None else timeout,
        "max_retries": TASK_MAX_RETRIES if retries else 0,
    }
    if retries:
        task["min_retry_interval_millis"] = TASK_RETRY_INTERVAL_MS
    kind, cluster_id = options.compute_choice()
    if kind == "existing":
        task["existing_cluster_id"] = cluster_id
    elif kind == "job-cluster":
        task["job_cluster_key"] = JOB_CLUSTER_KEY
    # serverless: a notebook task with no compute field runs on serverless jobs compute; notebook
    # tasks take their environment from the notebook (environment_key is for script/wheel tasks).
    if depends_on:
        task["depends_on"] = [{"task_key": depends_on}]
    return task


def _tasks(mode: str, options: JobOptions, notebook_dir: str | None) -> list[dict[str, Any]]:
    whole = options.job_timeout_seconds
    if mode in ("sequential", "parallel"):
        return [
            _task(
                options,
                nb,
                nb,
                notebook_parameters(nb, options),
                depends_on=NOTEBOOK_NAMES[i - 1] if mode == "sequential" and i else None,
                notebook_dir=notebook_dir,
            )
            for i, nb in enumerate(NOTEBOOK_NAMES)
        ]
    if mode in ORCHESTRATION_NOTEBOOKS:
        nb = ORCHESTRATION_NOTEBOOKS[mode]
        params = orchestration_parameters(options)
        return [_task(options, nb, nb, params, timeout=whole, notebook_dir=notebook_dir)]
    # comparison: one source version for both orchestrations, resolved once by the pin task.
    pinned = orchestration_parameters(options, source_version=SOURCE_VERSION_REF)
    pin_params = {"source_table": options.source_table, "source_version": ""}
    return [
        _task(
            options, PIN_NOTEBOOK, PIN_NOTEBOOK, pin_params, timeout=600, notebook_dir=notebook_dir
        ),
        _task(
            options,
            "SequentialOrchestration",
            "SequentialOrchestration",
            pinned,
            depends_on=PIN_NOTEBOOK,
            timeout=whole,
            notebook_dir=notebook_dir,
        ),
        _task(
            options,
            "ParallelOrchestration",
            "ParallelOrchestration",
            pinned,
            depends_on="SequentialOrchestration",
            timeout=whole,
            notebook_dir=notebook_dir,
        ),
    ]


def build_job_settings(
    mode: str, options: JobOptions, *, notebook_dir: str | None = None
) -> dict[str, Any]:
    """The exact settings `deploy` writes for job `mode`, as a JSON dict.

    `notebook_dir` replaces the workspace folder in notebook paths (the bundle's relative paths).
    """
    if mode not in JOB_KINDS:
        raise ConfigError(f"unknown job {mode!r}: expected one of {', '.join(MODES)}")
    kind = JOB_KINDS[mode]
    tags = {"managed_by": "nbpipeline", "nbpipeline_mode": mode}
    if options.notebooks_sha256:
        tags[NOTEBOOKS_TAG] = options.notebooks_sha256
    settings: dict[str, Any] = {
        "name": kind.name,
        "description": (
            f"nbpipeline: {kind.summary}. Managed by `nbpipeline databricks deploy`; "
            "edits here are overwritten."
        ),
        "tags": tags,
        "max_concurrent_runs": 1,
        "timeout_seconds": options.job_timeout_seconds * (2 if mode == "comparison" else 1),
        "queue": {"enabled": True},
    }
    if options.compute_choice()[0] == "job-cluster":
        settings["job_clusters"] = [
            {"job_cluster_key": JOB_CLUSTER_KEY, "new_cluster": _cluster_spec(options)}
        ]
    settings["tasks"] = _tasks(mode, options, notebook_dir)
    cron = options.schedules().get(mode)
    if cron is not None:
        settings["schedule"] = {
            "quartz_cron_expression": cron_to_quartz(cron),
            "timezone_id": options.timezone,
            "pause_status": "PAUSED" if options.paused else "UNPAUSED",
        }
    if options.notify:
        settings["email_notifications"] = {"on_failure": list(options.notify)}
    if options.run_as:
        who = "user_name" if "@" in options.run_as else "service_principal_name"
        settings["run_as"] = {who: options.run_as}
    if options.parameters:
        settings["parameters"] = [{"name": k, "default": v} for k, v in options.parameters]
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
    options: JobOptions, modes: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Settings of the jobs for `modes` (default: every job of the chosen layouts), by key."""
    chosen = options.modes() if modes is None else tuple(modes)
    return {mode: build_job_settings(mode, options) for mode in chosen}


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
    from nbpipeline.backends.databricks import _normalized_source

    changed = sorted(
        n
        for n, data in workspace.items()
        if data is not None and _normalized_source(data) != _normalized_source(local[n])
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
        job_id = _single(name, found[name])
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
    return DeployResult(notebooks=notebooks, jobs=results, workspace_dir=options.workspace_dir)


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
    # Orchestration tasks: the notebook runs they started (dbutils.notebook.run), from their own
    # run records; offsets are from the job run's start.
    children: list[TaskTiming] = field(default_factory=list)
    attempts: int = 1  # more than 1: the task was retried (start is its first attempt's)


@dataclass
class JobRunReport:
    mode: str  # sequential | parallel | comparison: how the notebooks ran
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
    job: str = ""  # the job's key (sequential, orchestration-parallel, comparison, ...)

    @property
    def succeeded(self) -> bool:
        return self.state == "TERMINATED" and self.result == "SUCCESS"

    def notebook_timings(self) -> list[TaskTiming]:
        """One timing per notebook run: the tasks themselves, or an orchestration's child runs."""
        out: list[TaskTiming] = []
        for task in self.tasks:
            if task.children:
                out += task.children
            elif task.task_key in NOTEBOOK_NAMES:
                out.append(task)
        return out

    def orchestration_parts(self) -> list[JobRunReport]:
        """A comparison run as two runs: its sequential and its parallel orchestration task."""
        parts = []
        for task in self.tasks:
            style = {"SequentialOrchestration": "sequential", "ParallelOrchestration": "parallel"}
            if task.task_key not in style or task.start_offset_s is None:
                continue
            origin = task.start_offset_s
            children = [
                replace(
                    c,
                    start_offset_s=None
                    if c.start_offset_s is None
                    else round(c.start_offset_s - origin, 3),
                    end_offset_s=None
                    if c.end_offset_s is None
                    else round(c.end_offset_s - origin, 3),
                )
                for c in task.children
            ]
            end = task.end_offset_s if task.end_offset_s is not None else origin
            parts.append(
                replace(
                    self,
                    mode=style[task.task_key],
                    name=f"{self.name}/{task.task_key}",
                    run_id=int(task.run_id or self.run_id),
                    run_url=task.run_url,
                    state=task.state,
                    result=task.result,
                    start_time=self.start_time + origin,
                    end_time=self.start_time + end,
                    duration_s=round(end - origin, 3),
                    queue_s=task.queue_s,
                    tasks=[
                        replace(
                            task,
                            children=children,
                            start_offset_s=0.0,
                            end_offset_s=round(end - origin, 3),
                        )
                    ],
                )
            )
        return parts

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
            f"{'task':<24} {'result':<16} {'start':>8} {'setup':>8} {'execution':>10} "
            f"{'cleanup':>8} {'end':>8}"
        )
        rows = []
        for t in self.tasks:
            rows.append(t)
            rows += [replace(c, task_key="  " + c.task_key) for c in t.children]
        for t in rows:
            start = "-" if t.start_offset_s is None else f"{t.start_offset_s:+.1f}s"
            end = "-" if t.end_offset_s is None else f"{t.end_offset_s:+.1f}s"
            lines.append(
                f"{t.task_key:<24} {(t.result or t.state):<16} {start:>8} "
                f"{t.setup_s:>7.1f}s {t.execution_s:>9.1f}s {t.cleanup_s:>7.1f}s {end:>8}"
            )
            if t.attempts > 1:
                lines.append(f"{'':<24} {t.attempts} attempts (retried)")
            if t.error:
                lines.append(f"{'':<24} error: {t.error}")
        return "\n".join(lines)


def _offset(ms: int | None, origin_ms: int) -> float:
    return round(((ms or 0) - origin_ms) / 1000.0, 3)


def _task_timing(ws: WorkspaceClient, task: jobs.RunTask, start_ms: int) -> TaskTiming:
    timings = run_timings(task)
    started = bool(task.start_time and start_ms)
    result = result_of(task)
    error = None
    # Tasks skipped because an upstream one failed have no error of their own.
    own_failure = result not in (None, "SUCCESS") and not str(result).startswith("UPSTREAM_")
    if own_failure and task.run_id and is_terminal(task):
        err, _ = fetch_error(ws, int(task.run_id))
        error = err or message_of(task) or None
    return TaskTiming(
        task_key=task.task_key or "?",
        run_id=task.run_id,
        state=life_cycle_of(task),
        result=result,
        start_offset_s=_offset(task.start_time, start_ms) if started else None,
        end_offset_s=_offset(task.end_time, start_ms) if started and task.end_time else None,
        run_url=task.run_page_url,
        error=error,
        **timings,
    )


def child_runs(ws: WorkspaceClient, task: jobs.RunTask, start_ms: int) -> list[TaskTiming]:
    """The notebook runs an orchestration task started with `dbutils.notebook.run`.

    They are `WORKFLOW_RUN`s of Notebook1..4 in the orchestration notebook's own folder, started
    while the task ran; their timings come from their own run records.
    """
    path = task.notebook_task.notebook_path if task.notebook_task else None
    if not path or not task.start_time:
        return []
    folder = path.rsplit("/", 1)[0]
    end_ms = task.end_time or int(time.time() * 1000)
    found: dict[str, TaskTiming] = {}
    for child in ws.jobs.list_runs(
        run_type=jobs.RunType.WORKFLOW_RUN,
        start_time_from=int(task.start_time),
        start_time_to=int(end_ms),
        expand_tasks=True,
    ):
        inner = child.tasks[0] if child.tasks else None
        nb = inner.notebook_task if inner is not None else None
        child_path = nb.notebook_path if nb is not None else ""
        name = child_path.rsplit("/", 1)[-1]
        if child_path.rsplit("/", 1)[0] != folder or name not in NOTEBOOK_NAMES:
            continue
        record = inner if inner is not None else child
        timing = _task_timing(ws, record, start_ms)  # type: ignore[arg-type]
        timing = replace(timing, task_key=name, run_id=child.run_id, run_url=child.run_page_url)
        # The latest run of each notebook (a retried orchestration task starts them again).
        if name not in found or (timing.start_offset_s or 0) > (found[name].start_offset_s or 0):
            found[name] = timing
    return sorted(found.values(), key=lambda t: (t.start_offset_s or 0.0, t.task_key))


def job_key_of(name: str | None) -> str | None:
    return next((k for k, v in JOB_NAMES.items() if v == name), None)


def job_run_report(ws: WorkspaceClient, mode: str, job_id: int, run: jobs.Run) -> JobRunReport:
    """Timings of a finished job run, from the run records (Databricks' timestamps).

    `mode` is the job's key. For an orchestration task the per-notebook timings are its child
    runs (`child_runs`).
    """
    start_ms = run.start_time or 0
    end_ms = run.end_time or 0
    tasks = []
    # In start order; tasks that never started go last, in the job's own order.
    # A retried task (max_retries) is listed once per attempt; its last attempt is its outcome,
    # and the time it took is from its first attempt's start.
    latest: dict[str, jobs.RunTask] = {}
    first_start: dict[str, int] = {}
    attempts: dict[str, int] = {}
    for task in run.tasks or []:
        key = task.task_key or "?"
        attempts[key] = attempts.get(key, 0) + 1
        if task.start_time:
            first_start[key] = min(first_start.get(key, task.start_time), task.start_time)
        if key not in latest or (task.attempt_number or 0) >= (latest[key].attempt_number or 0):
            latest[key] = task
    order = {id(t): i for i, t in enumerate(latest.values())}
    never = float("inf")
    for task in sorted(latest.values(), key=lambda t: (t.start_time or never, order[id(t)])):
        timing = _task_timing(ws, task, start_ms)
        key = task.task_key or "?"
        if attempts[key] > 1:
            timing.attempts = attempts[key]
            if key in first_start and start_ms:
                timing.start_offset_s = _offset(first_start[key], start_ms)
        if task.task_key in ("SequentialOrchestration", "ParallelOrchestration"):
            timing.children = child_runs(ws, task, start_ms)
        tasks.append(timing)
    duration_ms = run.run_duration or (end_ms - start_ms if end_ms else 0)
    kind = JOB_KINDS.get(mode)
    return JobRunReport(
        mode=kind.style if kind else mode,
        name=kind.name if kind else (run.run_name or mode),
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
        job=mode,
    )


def report_for_run(ws: WorkspaceClient, run_id: int) -> JobRunReport:
    """The report of any nbpipeline job run, by run id (the job is found from the run)."""
    run = ws.jobs.get_run(run_id)
    job_id = int(run.job_id or 0)
    name = run.run_name
    if job_id:
        try:
            job = ws.jobs.get(job_id)
            name = job.settings.name if job.settings else name
        except API_ERRORS:
            pass
    key = job_key_of(name)
    if key is None:
        raise ConfigError(
            f"run {run_id} is not a run of an nbpipeline job (job {name!r})",
            hint=f"nbpipeline jobs: {', '.join(JOB_NAMES.values())}",
        )
    return job_run_report(ws, key, job_id, run)


def comparison_reports(ws: WorkspaceClient, run_ids: Sequence[int]) -> list[JobRunReport]:
    """[sequential, parallel] reports from one comparison-job run or two runs of other jobs."""
    reports = [report_for_run(ws, int(r)) for r in run_ids]
    if len(reports) == 1:
        (report,) = reports
        if report.job != "comparison":
            raise ConfigError(
                f"run {report.run_id} is a run of {report.name}; one run id must be a run of "
                f"{JOB_NAMES['comparison']}",
                hint="or give two run ids: a sequential and a parallel run",
            )
        parts = report.orchestration_parts()
        if len(parts) != 2:
            raise ConfigError(
                f"comparison run {report.run_id} did not run both orchestrations "
                f"({report.result or report.state})",
                hint=f"see {report.run_url}" if report.run_url else None,
            )
        return parts
    if len(reports) != 2:
        raise ConfigError("give one comparison run id or two job run ids")
    return reports


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


# --------------------------------------------------------------------------------------------
# Databricks Asset Bundle
# --------------------------------------------------------------------------------------------

BUNDLE_NAME = "nbpipeline"
BUNDLE_JOBS_FILE = "resources/nbpipeline.jobs.yml"


def bundle_job_resources(
    options: JobOptions, modes: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The jobs as bundle job resources: deploy's settings with notebook paths relative to the
    resource file (the bundle uploads `src/` and rewrites them to workspace paths)."""
    out: dict[str, dict[str, Any]] = {}
    for mode, settings in all_job_settings(options, modes).items():
        for task in settings["tasks"]:
            name = task["notebook_task"]["notebook_path"].rsplit("/", 1)[-1]
            task["notebook_task"]["notebook_path"] = f"../src/{name}.py"
        out[mode.replace("-", "_")] = settings
    return out


def write_bundle(out: Any, options: JobOptions, *, modes: Sequence[str] | None = None) -> list[Any]:
    """Write a Databricks Asset Bundle to folder `out`; return the files written.

    databricks.yml (dev and prod targets), src/ (every notebook), and one resource file with the
    same jobs as `deploy`. Deploy it with the Databricks CLI: `databricks bundle deploy -t dev`.
    """
    from pathlib import Path

    import yaml

    root = Path(out)
    local = local_notebooks()
    options = replace(options, notebooks_sha256=notebooks_digest(local))
    resources = bundle_job_resources(options, modes)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} exists and is not a folder")
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "resources").mkdir(exist_ok=True)
    written = []
    for name, data in sorted(local.items()):
        path = root / "src" / f"{name}.py"
        path.write_bytes(data)
        written.append(path)
    workspace: dict[str, Any] = {}
    if options.host:
        workspace["host"] = options.host
    prod: dict[str, Any] = {
        "mode": "production",
        "workspace": {
            **workspace,
            # Production deploys once per workspace, not into a per-user development copy.
            "root_path": "/Workspace/Users/${workspace.current_user.userName}/.bundle/"
            "${bundle.name}/${bundle.target}",
        },
    }
    if options.run_as:
        who = "user_name" if "@" in options.run_as else "service_principal_name"
        prod["run_as"] = {who: options.run_as}
    bundle = {
        "bundle": {"name": BUNDLE_NAME},
        "include": ["resources/*.yml"],
        "targets": {
            # Development mode prefixes job names with the user and pauses schedules.
            "dev": {
                "mode": "development",
                "default": True,
                **({"workspace": workspace} if workspace else {}),
            },
            "prod": prod,
        },
    }
    header = (
        "# Written by `nbpipeline databricks bundle`: the nbpipeline notebooks (src/) and jobs\n"
        "# (resources/). Deploy: databricks bundle deploy -t dev (or -t prod).\n"
    )
    path = root / "databricks.yml"
    path.write_text(header + yaml.safe_dump(bundle, sort_keys=False))
    written.append(path)
    path = root / BUNDLE_JOBS_FILE
    path.write_text(
        "# The same jobs as `nbpipeline databricks deploy`.\n"
        + yaml.safe_dump({"resources": {"jobs": resources}}, sort_keys=False)
    )
    written.append(path)
    return written
