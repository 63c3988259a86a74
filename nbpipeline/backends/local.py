"""Run notebooks on the local engine (or any Spark Connect server) with the local runtime."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, field_validator

from nbpipeline import engine, settings
from nbpipeline.backends.base import NOTEBOOK_NAMES, NotebookBackend, NotebookRun, parse_exit_value
from nbpipeline.errors import ConfigError
from nbpipeline.redact import redact
from nbpipeline.runtime import run_notebook


class LocalNotebookBackend(NotebookBackend):
    """Runs the project's notebooks through nbpipeline's notebook runtime on Spark Connect.

    Every step process opens its own light client session (under a second) to one shared engine,
    so parallel steps never start a JVM each.
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
    ) -> NotebookRun:
        path = self.notebook_path(notebook)
        started = time.time()
        spark = engine.get_spark(self.spark_remote, progress=log.info if log else None)
        pid = engine.local_engine_pid(self.spark_remote)
        try:
            return run_on_session(self, notebook, path, spark, parameters, timeout_seconds, started)
        except Exception as exc:
            # A dead engine surfaces as whatever gRPC error the running cell got; say what
            # actually happened instead.
            if pid is not None and not engine.engine_alive(pid):
                raise engine.went_away(pid, notebook, exc) from None
            raise


def run_on_session(
    backend: NotebookBackend,
    notebook: str,
    path: Path,
    spark: object,
    parameters: Mapping[str, str],
    timeout_seconds: int,
    started: float,
) -> NotebookRun:
    """Run a notebook file through the local runtime on `spark`; shared by every backend that
    executes notebooks in this process (the shared engine's client, or a per-process JVM)."""
    raw = run_notebook(path, parameters, spark=spark, timeout_seconds=timeout_seconds)
    return NotebookRun(
        notebook=notebook,
        location=str(path),
        backend=backend.backend_name,
        engine=backend.engine_address(),
        exit_value=parse_exit_value(raw, notebook=str(path)),
        started_at=started,
        ended_at=time.time(),
    )
