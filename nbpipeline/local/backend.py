"""Run notebooks on the local engine (or any Spark Connect server) with the local runtime."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import psutil
from pydantic import Field, PrivateAttr, field_validator

from nbpipeline import settings
from nbpipeline.backend import NOTEBOOK_NAMES, NotebookBackend, NotebookResult, parse_exit_value
from nbpipeline.errors import ConfigError
from nbpipeline.local import engine
from nbpipeline.local.runtime import run_notebook
from nbpipeline.redact import redact

#: Step metadata: the engine's CPU seconds while the step ran, the cores it could use, and the
#: step process's own CPU seconds (read back by `nbpipeline compare` for its what-if estimates).
ENGINE_CPU_KEY = "engine_cpu_s"
ENGINE_CORES_KEY = "engine_cores"
CLIENT_CPU_KEY = "client_cpu_s"
ENGINE_JIT_CPU_KEY = "engine_jit_cpu_s"


class LocalNotebookBackend(NotebookBackend):
    """Runs the project's notebooks through nbpipeline's notebook runtime on Spark Connect.

    Every step process opens its own light client (under a second) to one shared engine, so
    parallel steps never start a JVM each. All steps of one Dagster run attach to one server-side
    Spark Connect session (its id derived from the run id): the engine sets up and plans in one
    session per run, as the orchestration notebooks' thread pool does, instead of one per step.
    A step's failure stays its own: the notebooks' temp views are named per notebook, and a
    timeout cancels only its own operations (by tag).
    """

    spark_remote: str | None = Field(
        default=None,
        description=(
            "Spark Connect URL (sc://host:port) of a running Spark with Delta Lake. Empty: the "
            "embedded local engine under NBPIPELINE_HOME, started on first use "
            "(NBPIPELINE_SPARK_REMOTE also sets it)."
        ),
    )
    notebooks_dir: str | None = Field(
        default=None,
        description="Folder holding Notebook1..4.py. Empty: the project's notebooks/ folder.",
    )

    _run_id: str | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._run_id = context.run_id

    @field_validator("spark_remote")
    @classmethod
    def _check_remote(cls, value: str | None) -> str | None:
        if value and not value.startswith("sc://"):
            raise ValueError(f"spark_remote {value!r} must be a Spark Connect URL (sc://host:port)")
        return value or None

    @property
    def backend_name(self) -> str:
        return "local"

    def engine_address(self) -> str:
        # Shown in logs and metadata: a Spark Connect URL may carry a token.
        return redact(engine.engine_url(self.spark_remote))

    def notebook_path(self, notebook: str) -> Path:
        if notebook not in NOTEBOOK_NAMES:
            raise ConfigError(f"unknown notebook {notebook!r}; expected one of {NOTEBOOK_NAMES}")
        folder = Path(self.notebooks_dir) if self.notebooks_dir else settings.notebooks_dir()
        path = folder / f"{notebook}.py"
        if not path.exists():
            raise ConfigError(f"no notebook at {path}", hint="set notebooks_dir on the resource")
        return path

    def run_notebook(
        self,
        notebook: str,
        parameters: Mapping[str, str],
        *,
        timeout_seconds: int = 3600,
        log: logging.Logger | None = None,
    ) -> NotebookResult:
        path = self.notebook_path(notebook)
        started = time.time()
        session_id = run_session_id(self._run_id) if self._run_id else None
        spark = engine.get_spark(
            self.spark_remote, progress=log.info if log else None, session_id=session_id
        )
        pid = engine.local_engine_pid(self.spark_remote)
        engine_cpu, engine_jit = _cpu_seconds(pid), _jit_cpu_seconds(pid)
        client_cpu = time.process_time()
        try:
            run = run_on_session(self, notebook, path, spark, parameters, timeout_seconds, started)
        except Exception as exc:
            # A dead engine surfaces as whatever gRPC error the running cell got; say what
            # actually happened instead.
            if pid is not None and not engine.engine_alive(pid):
                raise engine.went_away(pid, notebook, exc) from None
            raise
        # What the step cost in CPU: the engine's (while the step ran; in a run whose steps
        # overlap it includes the others' work) and this process's (the notebook's Python).
        after, jit_after = _cpu_seconds(pid), _jit_cpu_seconds(pid)
        if pid is not None and engine_cpu is not None and after is not None:
            run.extra[ENGINE_CPU_KEY] = round(after - engine_cpu, 3)
            run.extra[ENGINE_CORES_KEY] = _engine_cores(pid)
            if engine_jit is not None and jit_after is not None:
                # A compiler thread that ended takes its seconds with it: never below zero.
                run.extra[ENGINE_JIT_CPU_KEY] = round(max(jit_after - engine_jit, 0.0), 3)
        run.extra[CLIENT_CPU_KEY] = round(time.process_time() - client_cpu, 3)
        if session_id:
            run.extra["spark_session_id"] = session_id
        return run


#: Namespace of the per-run Spark Connect session ids (uuid5 of the Dagster run id).
_SESSION_NAMESPACE = uuid.UUID("6d1c3a52-57a4-4c0e-9a43-2f1f0b6e9b1d")


def run_session_id(run_id: str) -> str:
    """The Spark Connect session id every step of Dagster run `run_id` shares: deterministic,
    so each step process finds it from the run id alone, and a UUID4 as Spark Connect expects."""
    derived = uuid.uuid5(_SESSION_NAMESPACE, run_id)
    return str(uuid.UUID(bytes=derived.bytes, version=4))


def _engine_cores(pid: int) -> int | None:
    """The cores the local engine `pid` can use: its task slots (`--master local[N]`), at most
    the CPUs it may run on (its affinity)."""
    with contextlib.suppress(psutil.Error, ValueError, AttributeError):
        proc = psutil.Process(pid)
        # No affinity on macOS: every CPU.
        affinity = getattr(proc, "cpu_affinity", None)
        usable = len(affinity()) if affinity else (os.cpu_count() or 1)
        for arg in proc.cmdline():
            if arg.startswith("local[") and arg.endswith("]"):
                slots = arg[len("local[") : -1]
                return usable if slots == "*" else min(usable, int(slots))
    return None


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds process `pid` has used so far (None if unknown)."""
    if pid is None:
        return None
    with contextlib.suppress(psutil.Error):
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    return None


def _jit_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds the JVM `pid`'s JIT compiler threads have used so far: compiling is paid once
    per engine, not per run, so `compare` keeps it out of a warm engine's least work. None where
    threads cannot be named (no /proc, another user's process)."""
    if pid is None:
        return None
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                if not (task / "comm").read_text().startswith(("C1 Compiler", "C2 Compiler")):
                    continue
                # utime and stime, fields 14 and 15, after the parenthesised name.
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
    except OSError:
        return None
    return total / os.sysconf("SC_CLK_TCK")


def run_on_session(
    backend: NotebookBackend,
    notebook: str,
    path: Path,
    spark: object,
    parameters: Mapping[str, str],
    timeout_seconds: int,
    started: float,
) -> NotebookResult:
    """Run a notebook file through the local runtime on `spark`; shared by every backend that
    executes notebooks in this process (the shared engine's client, or a per-process JVM)."""
    raw = run_notebook(path, parameters, spark=spark, timeout_seconds=timeout_seconds)
    return NotebookResult(
        notebook=notebook,
        location=str(path),
        backend=backend.backend_name,
        engine=backend.engine_address(),
        exit_value=parse_exit_value(raw, notebook=str(path)),
        started_at=started,
        ended_at=time.time(),
    )
