"""The Databricks-native jobs' specifications: which jobs exist and the settings deploy writes.

Dagster is one way to orchestrate the notebooks; these jobs are the other, run by Databricks'
own scheduler. Two layouts: `task-graph` (`nbpipeline-sequential` and `nbpipeline-parallel`, the
four notebooks as job tasks) and `orchestration` (the original design's jobs, one task each running
`SequentialOrchestration` or `ParallelOrchestration`, plus `nbpipeline-comparison`, which runs both
one after another on one pinned source version). Deploying them is `nbpipeline.databricks.deploy`,
running one `nbpipeline.databricks.runs`, a bundle of them `nbpipeline.databricks.bundle`.

Schedules are given as standard 5-field cron and converted to the Quartz syntax Databricks
expects (`nbpipeline.databricks.quartz`), with an explicit, validated `timezone_id`; two jobs
never start at the same minute (`check_schedules`), because every job MERGEs the same five tables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from databricks.sdk.service import jobs

from nbpipeline import settings as nb_settings
from nbpipeline.backend import NOTEBOOK_NAMES
from nbpipeline.cron import check_timezone, first_common_start
from nbpipeline.databricks.client import (
    HOST_ENV,
    USER_WORKSPACE_DIR,
    WORKSPACE_DIR_ENV,
    check_workspace_dir,
)
from nbpipeline.databricks.kinds import (
    COMPUTE_KINDS,
    DEFAULT_NODE_TYPES,
    JOB_KEYS,
    JOB_KINDS,
    JOB_NAMES,
    LAYOUTS,
)
from nbpipeline.databricks.quartz import cron_to_quartz
from nbpipeline.errors import ConfigError, NbPipelineError
from nbpipeline.local.runtime import declared_widgets
from nbpipeline.settings import DEFAULT_SOURCE_TABLE
from nbpipeline.widgets import validate_widget_values

JOB_CLUSTER_KEY = "nbpipeline_cluster"
# Databricks Runtime 17.3 LTS runs Spark 4.0 (Scala 2.13), the closest LTS to the local engine.
DEFAULT_SPARK_VERSION = "17.3.x-scala2.13"
SPARK_VERSION_ENV = "NBPIPELINE_DATABRICKS_SPARK_VERSION"
NODE_TYPE_ENV = "NBPIPELINE_DATABRICKS_NODE_TYPE_ID"


# --------------------------------------------------------------------------------------------
# Job settings
# --------------------------------------------------------------------------------------------


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
        values: dict[str, Any] = {k: v for k, v in env.items() if v}
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
        raise ConfigError(f"unknown job {mode!r}: expected one of {', '.join(JOB_KEYS)}")
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


def describe_job_settings(settings: Mapping[str, Any]) -> str:
    """A few lines a person reads: the tasks and their order, the compute, the schedule."""
    lines = [f"{settings['name']}:"]
    for task in settings["tasks"]:
        deps = ", ".join(d["task_key"] for d in task.get("depends_on", []))
        when = f"after {deps}" if deps else "at start"
        lines.append(
            f"  {task['task_key']:<24} {when:<32} {task['notebook_task']['notebook_path']}"
        )
    first = settings["tasks"][0]
    if settings.get("job_clusters"):
        cluster = settings["job_clusters"][0]["new_cluster"]
        lines.append(
            f"  compute: job cluster {cluster['spark_version']}, {cluster['node_type_id']} x "
            f"{cluster['num_workers']} worker{'' if cluster['num_workers'] == 1 else 's'}"
        )
    elif first.get("existing_cluster_id"):
        lines.append(f"  compute: existing cluster {first['existing_cluster_id']}")
    else:
        lines.append("  compute: serverless")
    schedule = settings.get("schedule")
    if schedule:
        lines.append(
            f"  schedule: {schedule['quartz_cron_expression']} ({schedule['timezone_id']}, "
            f"{schedule['pause_status']})"
        )
    else:
        lines.append("  schedule: none (manual runs only)")
    return "\n".join(lines)
