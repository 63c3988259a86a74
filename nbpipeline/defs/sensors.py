"""Event-driven runs: `parallel_notebooks` once for each new version of the source table.

The sensor (stopped by default; switch it on in the UI like the schedules) observes the source
exactly as the `orders` asset does and launches one run per new Delta version: the cursor holds
the last version it launched for, the run key (table and version) makes Dagster drop a second
request for the same version, and while a run of either notebook job for that version is queued
or running it waits. The run carries the version in `nbpipeline/source_version`, so its notebooks
read that version even if the source moves again meanwhile.

No `from __future__ import annotations`: Dagster reads the sensor's resource annotation as an
object.
"""

import json
from typing import Any

import dagster as dg

from nbpipeline.backend import NOTEBOOK_NAMES, NotebookBackend
from nbpipeline.defs.assets import op_config
from nbpipeline.defs.source import configured_source_table, observe_with_backend
from nbpipeline.defs.tags import MODE_TAG, PARALLEL_JOB, SEQUENTIAL_JOB, SOURCE_VERSION_TAG
from nbpipeline.errors import ConfigError
from nbpipeline.settings import DEFAULT_SOURCE_TABLE

SENSOR_NAME = "source_version_sensor"
#: How often the daemon may evaluate the sensor (each evaluation reads the Delta log once).
INTERVAL_SECONDS = 30
_ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def run_key(table: str, version: int | str) -> str:
    """One run per (source table, version): Dagster skips a request whose key it has seen."""
    return f"{table}@{version}"


def _run_source(run: dg.DagsterRun) -> str:
    """The source table a notebook run reads (its run config, else the notebooks' default)."""
    ops: Any = (run.run_config or {}).get("ops", {})
    for notebook in NOTEBOOK_NAMES:
        table = ops.get(notebook, {}).get("config", {}).get("source_table")
        if table:
            return str(table)
    return DEFAULT_SOURCE_TABLE


def active_run_for(instance: dg.DagsterInstance, table: str, version: str) -> str | None:
    """The id of a queued or running notebook run on `version` of `table`, if there is one."""
    for job in (PARALLEL_JOB, SEQUENTIAL_JOB):
        runs = instance.get_runs(
            filters=dg.RunsFilter(
                job_name=job, statuses=_ACTIVE, tags={SOURCE_VERSION_TAG: version}
            )
        )
        for run in runs:
            if _run_source(run) == table:
                return run.run_id
    return None


def evaluate(
    instance: dg.DagsterInstance, cursor: str | None, backend: NotebookBackend
) -> dg.SensorResult | dg.SkipReason:
    """One evaluation: a run request for a new source version, or the reason for none."""
    try:
        state = observe_with_backend(backend, configured_source_table())
    except ConfigError as exc:
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        return dg.SkipReason(f"cannot observe the source: {exc.message}{hint}")
    version = str(state.version)
    last: dict[str, Any] = json.loads(cursor) if cursor else {}
    if last.get("table") == state.table and last.get("version") == version:
        return dg.SkipReason(f"{state.table} is still at version {version}; its run was launched")
    busy = active_run_for(instance, state.table, version)
    if busy is not None:
        return dg.SkipReason(f"run {busy} on {state.table} version {version} is queued or running")
    request = dg.RunRequest(
        run_key=run_key(state.table, version),
        run_config={"ops": op_config({"source_table": state.table})},
        tags={SOURCE_VERSION_TAG: version, MODE_TAG: "parallel"},
    )
    return dg.SensorResult(
        run_requests=[request], cursor=json.dumps({"table": state.table, "version": version})
    )


@dg.sensor(
    name=SENSOR_NAME,
    job_name=PARALLEL_JOB,
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=(
        "Launches parallel_notebooks once for each new Delta version of the source table "
        "(NBPIPELINE_SOURCE_TABLE, default nbpipeline.orders), tagged with that version."
    ),
)
def source_version_sensor(
    context: dg.SensorEvaluationContext, notebook_backend: NotebookBackend
) -> dg.SensorResult | dg.SkipReason:
    return evaluate(context.instance, context.cursor, notebook_backend)
