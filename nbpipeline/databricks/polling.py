"""Waiting for a Databricks run: adaptive polling, its timings, and cancelling it when we stop
watching. The backend's one-time runs and the CLI's job runs both go through `watch_run`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import dagster as dg
from databricks.sdk import WorkspaceClient
from databricks.sdk.service import jobs

from nbpipeline.databricks.client import API_ERRORS, describe_api_error
from nbpipeline.errors import NbPipelineError, NotebookError, NotebookTimeout

_LOG = logging.getLogger("nbpipeline.databricks")

# Life cycle states after which a run never changes again. INTERNAL_ERROR is terminal too: the
# SDK's own waiter treats it as a failure state, not as "keep waiting".
TERMINAL_STATES = frozenset(
    {
        jobs.RunLifeCycleState.TERMINATED,
        jobs.RunLifeCycleState.SKIPPED,
        jobs.RunLifeCycleState.INTERNAL_ERROR,
    }
)


@dataclass(frozen=True)
class PollPolicy:
    """Adaptive polling: `initial` seconds, times `backoff` per unchanged poll, at most `maximum`.

    Short first intervals catch fast failures (bad parameters, a missing notebook) quickly; the
    growth keeps a two-hour run from costing thousands of API calls; the cap bounds how late a
    finished run is noticed. The interval drops back to `initial` whenever the state changes,
    because a transition (e.g. PENDING -> RUNNING) is when the next one is most likely.
    """

    initial: float = 1.0
    maximum: float = 15.0
    backoff: float = 1.5


class RunDeadlineExceeded(Exception):
    def __init__(self, run: jobs.Run | None) -> None:
        super().__init__("deadline exceeded")
        self.run = run


def life_cycle_of(run: jobs.Run | jobs.RunTask) -> str:
    """The run's life cycle state name ('PENDING', 'TERMINATED', ...), from `state` or `status`."""
    if run.state is not None and run.state.life_cycle_state is not None:
        return run.state.life_cycle_state.value
    if run.status is not None and run.status.state is not None:
        return run.status.state.value
    return "UNKNOWN"


def result_of(run: jobs.Run | jobs.RunTask) -> str | None:
    if run.state is not None and run.state.result_state is not None:
        return run.state.result_state.value
    details = run.status.termination_details if run.status is not None else None
    if details is not None and details.code is not None:
        return details.code.value
    return None


def message_of(run: jobs.Run | jobs.RunTask) -> str:
    if run.state is not None and run.state.state_message:
        return run.state.state_message
    details = run.status.termination_details if run.status is not None else None
    return (details.message or "") if details is not None else ""


def is_terminal(run: jobs.Run | jobs.RunTask) -> bool:
    return life_cycle_of(run) in {s.value for s in TERMINAL_STATES}


def wait_for_run(
    ws: WorkspaceClient,
    run_id: int,
    *,
    deadline: float,
    policy: PollPolicy,
    log: logging.Logger,
    label: str,
    sleep: Callable[[float], None] = time.sleep,
) -> jobs.Run:
    """Poll `run_id` until it reaches a terminal state; `RunDeadlineExceeded` at `deadline`.

    `deadline` is a `time.monotonic()` value. Sleeps are `time.sleep`, so KeyboardInterrupt and
    Dagster's interrupt (raised from a signal handler) arrive promptly; callers cancel the run.
    """
    interval = policy.initial
    last_state: str | None = None
    announced_url = False
    while True:
        run = ws.jobs.get_run(run_id)
        state = life_cycle_of(run)
        if not announced_url and run.run_page_url:
            log.info("%s: Databricks run %s: %s", label, run_id, run.run_page_url)
            announced_url = True
        if state != last_state:
            log.info("%s: run %s is %s", label, run_id, state)
            last_state = state
            interval = policy.initial
        if is_terminal(run):
            return run
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RunDeadlineExceeded(run)
        sleep(min(interval, remaining))
        interval = min(interval * policy.backoff, policy.maximum)


def cancel_run_quietly(
    ws: WorkspaceClient, run_id: int, *, log: logging.Logger, timeout: float = 30.0
) -> bool:
    """Ask Databricks to cancel `run_id`; never raises, never blocks longer than `timeout`.

    Used on interrupt and timeout paths, where the original exception must win. The request runs
    in a helper thread because the SDK retries transient errors for minutes, and an interrupted
    process must not hang that long.
    """
    outcome: dict[str, BaseException | None] = {}

    def _cancel() -> None:
        try:
            ws.jobs.cancel_run(run_id)
            outcome["error"] = None
        except BaseException as exc:  # reported below; must not escape the helper thread
            outcome["error"] = exc

    worker = threading.Thread(target=_cancel, name=f"cancel-run-{run_id}", daemon=True)
    worker.start()
    worker.join(timeout)
    if "error" not in outcome:
        log.warning("cancelling Databricks run %s did not finish within %.0fs", run_id, timeout)
        return False
    if outcome["error"] is not None:
        log.warning("could not cancel Databricks run %s: %s", run_id, outcome["error"])
        return False
    log.warning("cancelled Databricks run %s", run_id)
    return True


def ms_to_s(value: int | None) -> float:
    return round((value or 0) / 1000.0, 3)


def run_timings(run: jobs.Run | jobs.RunTask) -> dict[str, float]:
    """Durations in seconds, straight from Databricks' own fields (not from our polling loop)."""
    return {
        "queue_s": ms_to_s(run.queue_duration),
        "setup_s": ms_to_s(run.setup_duration),
        "execution_s": ms_to_s(run.execution_duration),
        "cleanup_s": ms_to_s(run.cleanup_duration),
    }


def fetch_error(ws: WorkspaceClient, task_run_id: int) -> tuple[str | None, str | None]:
    """(error, error_trace) of a finished task run; (None, None) if Databricks has none."""
    try:
        out = ws.jobs.get_run_output(task_run_id)
    except API_ERRORS:
        return None, None
    return out.error, out.error_trace


def find_live_run(
    ws: WorkspaceClient, notebook_path: str, parameters: Mapping[str, str]
) -> int | None:
    """A one-time run of `notebook_path` with exactly `parameters` that is still active, if any.

    Listed from the workspace (active submit runs), so it finds runs started by an earlier step
    attempt or an earlier Dagster run whose step lost track of them.
    """
    try:
        runs = ws.jobs.list_runs(
            active_only=True, run_type=jobs.RunType.SUBMIT_RUN, expand_tasks=True
        )
        for run in runs:
            for task in run.tasks or []:
                nb = task.notebook_task
                if (
                    nb is not None
                    and nb.notebook_path == notebook_path
                    and dict(nb.base_parameters or {}) == dict(parameters)
                    and not is_terminal(task)
                ):
                    return int(run.run_id or 0) or None
    except API_ERRORS as exc:
        _LOG.warning("could not list active runs (%s)", describe_api_error(exc))
    return None


def watch_run(
    ws: WorkspaceClient,
    run_id: int,
    *,
    label: str,
    deadline: float,
    waited: str,
    policy: PollPolicy,
    log: logging.Logger,
    cancel_timeout: float,
    cancel_when_lost: bool,
) -> jobs.Run:
    """Wait for `run_id` to end and return it; never leave a run going that nobody watches.

    Past `deadline` (a `time.monotonic()` value) the run is cancelled and NotebookTimeout says no
    result came after `waited`. An interrupt (Ctrl-C, Dagster's termination) cancels the run and
    propagates. When polling fails, `cancel_when_lost` decides: cancel the run and wait briefly
    until it is over (so a retry sees it ended), raising NotebookError; or leave it running and
    raise NbPipelineError saying so (a job run someone can still follow in the workspace).
    """
    try:
        return wait_for_run(ws, run_id, deadline=deadline, policy=policy, log=log, label=label)
    except RunDeadlineExceeded as exc:
        cancel_run_quietly(ws, run_id, log=log, timeout=cancel_timeout)
        url = exc.run.run_page_url if exc.run is not None else None
        raise NotebookTimeout(
            f"no result after {waited}; the Databricks run was cancelled",
            notebook=label,
            run_url=url,
            run_id=run_id,
            hint=f"see {url}" if url else None,
        ) from None
    except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError):
        cancel_run_quietly(ws, run_id, log=log, timeout=cancel_timeout)
        raise
    except API_ERRORS as exc:
        if not cancel_when_lost:
            raise NbPipelineError(
                f"lost track of run {run_id} of {label} ({describe_api_error(exc)}); "
                "it may still be running"
            ) from None
        # If even the cancel fails, the next attempt or re-execution finds the run live
        # (find_live_run) and waits for it.
        cancelled = cancel_run_quietly(ws, run_id, log=log, timeout=cancel_timeout)
        if cancelled:
            with contextlib.suppress(*API_ERRORS, RunDeadlineExceeded):
                wait_for_run(
                    ws,
                    run_id,
                    deadline=time.monotonic() + cancel_timeout,
                    policy=policy,
                    log=log,
                    label=label,
                )
        outcome = (
            "it was cancelled"
            if cancelled
            else "cancelling it failed too; a retry or re-execution re-attaches to it"
        )
        raise NotebookError(
            f"lost track of Databricks run {run_id} ({describe_api_error(exc)}); {outcome}",
            notebook=label,
            run_id=run_id,
        ) from None
