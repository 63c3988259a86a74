"""Running a deployed Databricks-native job and reading its timings from the run records.

`run_deployed_job` triggers one (`run-now`), waits, and reports per-notebook timings taken from
Databricks' own timestamps; `comparison_reports` and `run_timing_from_report` feed those runs to
`nbpipeline compare`, beside Dagster runs.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from databricks.sdk import WorkspaceClient
from databricks.sdk.service import jobs

from nbpipeline.backend import NOTEBOOK_NAMES
from nbpipeline.databricks.client import API_ERRORS, describe_api_error
from nbpipeline.databricks.deploy import find_jobs, single_job_id
from nbpipeline.databricks.kinds import JOB_KEYS, JOB_KINDS, JOB_NAMES
from nbpipeline.databricks.polling import (
    PollPolicy,
    fetch_error,
    is_terminal,
    life_cycle_of,
    message_of,
    result_of,
    run_timings,
    watch_run,
)
from nbpipeline.errors import ConfigError, NbPipelineError, NotebookError
from nbpipeline.perf.comparison import Comparison, RunTiming, StepTiming

_LOG = logging.getLogger("nbpipeline.databricks")


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
        queue_s=timings["queue_s"],
        setup_s=timings["setup_s"],
        execution_s=timings["execution_s"],
        cleanup_s=timings["cleanup_s"],
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


def run_deployed_job(
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
        raise ConfigError(f"unknown job {mode!r}: expected one of {', '.join(JOB_KEYS)}")
    name = JOB_NAMES[mode]
    job_id = single_job_id(name, find_jobs(ws, [name])[name])
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
    run = watch_run(
        ws,
        run_id,
        label=name,
        deadline=time.monotonic() + timeout_seconds,
        waited=f"{timeout_seconds:.0f}s",
        policy=policy or PollPolicy(),
        log=logger,
        cancel_timeout=cancel_timeout,
        cancel_when_lost=False,
    )
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


def run_timing_from_report(report: JobRunReport) -> RunTiming:
    """A Databricks job run as a RunTiming, so `compare` puts it in the same table as a Dagster
    run. An orchestration job's steps are the notebook runs its orchestration notebook started."""
    steps = [
        StepTiming(
            step=t.task_key,
            start_offset_s=t.start_offset_s or 0.0,
            duration_s=round((t.end_offset_s or 0.0) - (t.start_offset_s or 0.0), 3),
            status="success" if t.result == "SUCCESS" else (t.result or t.state).lower(),
        )
        for t in report.notebook_timings()
        if t.start_offset_s is not None
    ]
    return RunTiming(
        run_id=str(report.run_id),
        job=report.name,
        mode=report.mode,
        source_version=None,
        status=(report.result or report.state).lower(),
        started_at=report.start_time,
        queue_s=report.queue_s,
        wall_s=report.duration_s,
        steps=steps,
    )


def compare_job_runs(ws: WorkspaceClient, run_ids: Sequence[int]) -> Comparison:
    """Sequential vs parallel from one comparison-job run or two runs of other jobs."""
    sequential, parallel = (run_timing_from_report(r) for r in comparison_reports(ws, run_ids))
    return Comparison(sequential=sequential, parallel=parallel)
