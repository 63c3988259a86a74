"""The run life-cycle planner of the loopback Databricks workspace (fakes.databricks_http).

Runs follow realistic life cycles computed from the wall clock: PENDING (queue, then cluster
setup) -> RUNNING -> TERMINATING -> TERMINATED with result SUCCESS / FAILED / TIMEDOUT /
CANCELED, or INTERNAL_ERROR after setup, or SKIPPED at once. A task running `SequentialOrchestration`
or `ParallelOrchestration` starts Notebook1..4 as WORKFLOW_RUNs (what `dbutils.notebook.run` does)
one after another or all at once, and lasts as long as they do. Durations are configurable per
notebook (`Behaviour`). This module knows nothing of HTTP: it plans timelines, states and exit
values; the HTTP layer turns them into JSON responses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

RESULTS = ("SUCCESS", "FAILED", "TIMEDOUT", "CANCELED", "INTERNAL_ERROR", "SKIPPED")
ORCHESTRATIONS = ("SequentialOrchestration", "ParallelOrchestration")
CHILD_NOTEBOOKS = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")
CHILD_GAP_S = 0.05


@dataclass(frozen=True)
class Behaviour:
    """How a notebook's simulated run goes. Durations in (real) seconds."""

    result: str = "SUCCESS"
    queue_s: float = 0.0
    setup_s: float = 0.05
    execution_s: float = 0.2
    cleanup_s: float = 0.05
    error: str = "ZeroDivisionError: division by zero"
    error_trace: str = (
        "---------------------------------------------------------------------------\n"
        "ZeroDivisionError                         Traceback (most recent call last)\n"
        "File <command-1>, line 3\n----> 3 1 / 0\n\nZeroDivisionError: division by zero"
    )
    state_message: str | None = None
    # The `dbutils.notebook.exit` string: a str, a callable(base_parameters) -> str, or None
    # for a valid default that echoes the parameters back.
    exit_value: str | Callable[[dict[str, str]], str] | None = None


@dataclass
class Task:
    run_id: int
    task_key: str
    notebook_path: str
    params: dict[str, str]
    behaviour: Behaviour
    depends_on: list[str]
    timeout_s: float
    compute: dict[str, Any]
    spec: dict[str, Any]
    notebook_missing: bool = False
    # An orchestration notebook: the notebook runs it starts with dbutils.notebook.run, as
    # (name, seconds after its execution starts, execution seconds), and its own execution time.
    children: list[tuple[str, float, float]] = field(default_factory=list)
    orchestration_s: float | None = None


@dataclass
class Run:
    run_id: int
    job_id: int
    run_name: str
    run_type: str
    created: float
    tasks: list[Task]
    timeout_s: float
    idempotency_token: str | None
    number_in_job: int
    job_parameters: dict[str, str] = field(default_factory=dict)
    cancel_at: float | None = None


@dataclass
class Phases:
    """A task's timeline (epoch seconds). `ready` is when it may start; None: never starts."""

    ready: float | None
    queue_end: float = 0.0
    setup_end: float = 0.0
    exec_end: float = 0.0
    end: float = 0.0
    life: str = "TERMINATED"  # life cycle state once finished
    result: str | None = "SUCCESS"
    message: str = ""
    user_cancelled_or_timedout: bool = False


def ms(t: float | None) -> int:
    return int(round(t * 1000)) if t else 0


def plan(run: Run) -> dict[int, Phases]:
    """Every task's timeline, fixed by creation time, behaviours and any cancel request."""
    plans: dict[int, Phases] = {}
    by_key = {t.task_key: t for t in run.tasks}
    cancel = run.cancel_at

    def plan_task(task: Task) -> Phases:
        if task.run_id in plans:
            return plans[task.run_id]
        deps = [plan_task(by_key[k]) for k in task.depends_on]
        if deps:
            dep_end = max(d.end for d in deps)
            bad = [d for d in deps if d.result != "SUCCESS"]
            if bad:
                result = (
                    "UPSTREAM_CANCELED"
                    if any(d.result == "CANCELED" for d in bad)
                    else "UPSTREAM_FAILED"
                )
                p = Phases(
                    None,
                    end=dep_end,
                    life="SKIPPED",
                    result=result,
                    message="Upstream task(s) failed.",
                )
                plans[task.run_id] = p
                return p
            ready = dep_end
        else:
            ready = run.created
        if cancel is not None and cancel <= ready:
            p = Phases(
                None,
                end=cancel,
                life="TERMINATED",
                result="CANCELED",
                message="Run cancelled.",
                user_cancelled_or_timedout=True,
            )
            plans[task.run_id] = p
            return p
        b = task.behaviour
        p = Phases(ready)
        if b.result == "SKIPPED":
            p.queue_end = p.setup_end = p.exec_end = p.end = ready
            p.life, p.result = "SKIPPED", None
            p.message = (
                b.state_message
                or "Skipped because the maximum number of concurrent runs was reached."
            )
            plans[task.run_id] = p
            return p
        p.queue_end = ready + b.queue_s
        p.setup_end = p.queue_end + b.setup_s
        if b.result == "INTERNAL_ERROR":
            p.exec_end = p.end = p.setup_end
            p.life, p.result = "INTERNAL_ERROR", "FAILED"
            p.message = b.state_message or (
                "Run failed due to an internal error: Cluster 0101-loopback terminated. "
                "Reason: Cloud provider launch failure"
            )
        else:
            execution = b.execution_s if task.orchestration_s is None else task.orchestration_s
            result = b.result
            if task.notebook_missing:
                result, execution = "FAILED", min(execution, 0.05)
            if b.result == "CANCELED":
                execution = execution / 2
            if task.timeout_s and b.queue_s + b.setup_s + execution > task.timeout_s:
                # Databricks stops the run when its timeout_seconds elapse.
                result = "TIMEDOUT"
                execution = max(0.0, task.timeout_s - b.setup_s - b.queue_s)
            p.exec_end = p.setup_end + execution
            p.result = result
            p.message = b.state_message or {
                "SUCCESS": "",
                "FAILED": "Workload failed, see run output for details",
                "TIMEDOUT": f"Run timed out after {task.timeout_s:g} seconds",
                "CANCELED": "Run cancelled by user@example.com.",
            }.get(result, "")
            p.user_cancelled_or_timedout = result in ("TIMEDOUT", "CANCELED")
        if cancel is not None and cancel < p.exec_end:
            # A cancel cuts the phase in progress short, then the cluster cleans up.
            if cancel < p.queue_end:
                p.queue_end = p.setup_end = p.exec_end = cancel
            elif cancel < p.setup_end:
                p.setup_end = p.exec_end = cancel
            else:
                p.exec_end = cancel
            p.life, p.result = "TERMINATED", "CANCELED"
            p.message, p.user_cancelled_or_timedout = "Run cancelled.", True
        if p.life != "INTERNAL_ERROR":
            p.end = p.exec_end + b.cleanup_s
        plans[task.run_id] = p
        return p

    for task in run.tasks:
        plan_task(task)
    return plans


def state_at(p: Phases, now: float) -> tuple[str, str | None, str]:
    if now >= p.end and (p.ready is None or now >= p.ready):
        return p.life, p.result, p.message
    if p.ready is None or now < p.ready:
        return "PENDING", None, "Waiting for upstream tasks"
    if now < p.queue_end:
        return "PENDING", None, "Waiting in the queue"
    if now < p.setup_end:
        return "PENDING", None, "Waiting for cluster"
    if now < p.exec_end:
        return "RUNNING", None, "In run"
    return "TERMINATING", None, "Cleaning up"


def status(life: str, result: str | None, message: str) -> dict[str, Any]:
    state = {"INTERNAL_ERROR": "TERMINATED", "SKIPPED": "TERMINATED"}.get(life, life)
    status: dict[str, Any] = {"state": state}
    if state == "TERMINATED":
        code = {
            "SUCCESS": "SUCCESS",
            "FAILED": "RUN_EXECUTION_ERROR",
            "TIMEDOUT": "TIMED_OUT",
            "CANCELED": "CANCELED",
        }.get(result or "", "INTERNAL_ERROR" if life == "INTERNAL_ERROR" else "SKIPPED")
        status["termination_details"] = {
            "code": code,
            "message": message,
            "type": "SUCCESS" if code == "SUCCESS" else "CLIENT_ERROR",
        }
    return status


def orchestration_exit(task: Task) -> dict[str, Any]:
    mode = "sequential" if task.notebook_path.endswith("SequentialOrchestration") else "parallel"
    return {
        "mode": mode,
        "wall_s": task.orchestration_s,
        "notebooks": [
            {"notebook": n, "start_offset_s": round(o, 3), "duration_s": round(e, 3)}
            for n, o, e in task.children
        ],
    }


def default_exit(task: Task, p: Phases) -> dict[str, Any]:
    name = task.notebook_path.rsplit("/", 1)[-1]
    return {
        "notebook": name,
        "started_at": p.setup_end,
        "ended_at": p.exec_end,
        "duration_s": round(p.exec_end - p.setup_end, 3),
        "source_table": task.params.get("source_table"),
        "source_version": 1,
        "rows_read": 0,
        "rows_rejected": 0,
        "parameters": dict(task.params),
        "tables": [],
    }


def orchestration_children(
    name: str, behaviour_of: Callable[[str], Behaviour]
) -> tuple[list[tuple[str, float, float]], float | None]:
    """An orchestration notebook's child runs as (name, start offset, execution seconds), and its
    own execution time; ([], None) for any other notebook."""
    children: list[tuple[str, float, float]] = []
    if name not in ORCHESTRATIONS:
        return children, None
    # dbutils.notebook.run starts each child as an ephemeral run on the same compute:
    # no queue or cluster setup, a short start-up gap each.
    offset = 0.0
    for child in CHILD_NOTEBOOKS:
        b = behaviour_of(child)
        children.append((child, offset + CHILD_GAP_S, b.execution_s))
        if name == "SequentialOrchestration":
            offset += CHILD_GAP_S + b.execution_s
    return children, max(o + e for _, o, e in children) + CHILD_GAP_S


def child_runs(
    run: Run,
    behaviour_of: Callable[[str], Behaviour],
    new_id: Callable[[], int],
    new_job_id: Callable[[], int],
) -> list[Run]:
    """The WORKFLOW_RUNs an orchestration task starts; each appears once its start is due."""
    plans = plan(run)
    runs: list[Run] = []
    for task in run.tasks:
        p = plans[task.run_id]
        if not task.children or p.ready is None:
            continue
        folder = task.notebook_path.rsplit("/", 1)[0]
        for name, offset, execution in task.children:
            params = {k: v for k, v in task.params.items() if k != "timeout_seconds"}
            if name != "Notebook4":
                params.pop("high_value_threshold", None)
            behaviour = replace(
                behaviour_of(name),
                queue_s=0.0,
                setup_s=0.0,
                cleanup_s=0.0,
                execution_s=execution,
            )
            spec = {
                "task_key": name,
                "notebook_task": {
                    "notebook_path": f"{folder}/{name}",
                    "base_parameters": params,
                },
            }
            child_task = Task(
                run_id=new_id(),
                task_key=name,
                notebook_path=f"{folder}/{name}",
                params=params,
                behaviour=behaviour,
                depends_on=[],
                timeout_s=0,
                compute={},
                spec=spec,
            )
            child = Run(
                run_id=new_id(),
                job_id=new_job_id(),
                run_name=name,
                run_type="WORKFLOW_RUN",
                created=p.setup_end + offset,
                tasks=[child_task],
                timeout_s=0,
                idempotency_token=None,
                number_in_job=1,
            )
            runs.append(child)
    return runs


def parent_state(
    run: Run, task_states: list[tuple[str, str | None, str]]
) -> tuple[bool, str, str | None, str]:
    """A run's (done, life cycle state, result, message) from its tasks' states."""
    done = all(s[0] in ("TERMINATED", "SKIPPED", "INTERNAL_ERROR") for s in task_states)
    result: str | None
    if done:
        results = [s[1] for s in task_states]
        lives = [s[0] for s in task_states]
        if len(run.tasks) == 1:
            life, result, message = task_states[0]
        else:
            life = "INTERNAL_ERROR" if "INTERNAL_ERROR" in lives else "TERMINATED"
            if all(r == "SUCCESS" for r in results):
                result, message = "SUCCESS", ""
            elif run.cancel_at is not None or "CANCELED" in results:
                result, message = "CANCELED", "Run cancelled."
            elif "TIMEDOUT" in results:
                result, message = "TIMEDOUT", "Run timed out."
            else:
                result = "FAILED"
                failed = sum(
                    1
                    for r in results
                    if r not in ("SUCCESS",) and not str(r).startswith("UPSTREAM")
                )
                message = f"{failed} out of {len(results)} tasks failed"
    else:
        result = None
        # Once any task has got past PENDING the parent run stays RUNNING to the end.
        if any(s[0] != "PENDING" for s in task_states):
            life, message = "RUNNING", "In run"
        else:
            life, message = "PENDING", task_states[0][2]
    return done, life, result, message


def task_output(task: Task, p: Phases, result: str | None) -> dict[str, Any]:
    """What runs/get-output adds for a finished task: its exit value, or its error."""
    out: dict[str, Any] = {}
    if result == "SUCCESS":
        b = task.behaviour
        raw = b.exit_value(task.params) if callable(b.exit_value) else b.exit_value
        if raw is None and task.children:
            raw = json.dumps(orchestration_exit(task))
        if raw is None:
            raw = json.dumps(default_exit(task, p))
        out["notebook_output"] = {"result": raw, "truncated": False}
    elif result == "FAILED":
        if task.notebook_missing:
            out["error"] = (
                "com.databricks.WorkflowException: com.databricks.NotebookExecutionException: "
                f'FAILED: Unable to access the notebook "{task.notebook_path}".'
            )
        else:
            out["error"] = task.behaviour.error
            out["error_trace"] = task.behaviour.error_trace
    return out
