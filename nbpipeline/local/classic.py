"""Run notebooks on a Spark JVM inside each step process: the benchmark's reference mode.

This is how PySpark is commonly used from Dagster: every step process builds its own local
SparkSession. It is kept only so `nbpipeline bench` can measure what the shared engine saves
(`per-process-spark`); it is not a product mode. Its catalog is in memory (an embedded Derby
metastore admits one JVM at a time), so it needs a Delta path source (delta.`/abs/path`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field

from nbpipeline import settings
from nbpipeline.backend import NOTEBOOK_NAMES, NotebookBackend, NotebookResult
from nbpipeline.errors import ConfigError
from nbpipeline.identifiers import parse_table
from nbpipeline.local import engine
from nbpipeline.local.backend import run_on_session


class PerProcessSparkBackend(NotebookBackend):
    """Starts a local Spark JVM with Delta in the calling process (once per process)."""

    cores: str = Field(default="*", description="local[N] cores of each step's own JVM")
    driver_memory: str = Field(default="2g", description="driver memory of each step's own JVM")

    @property
    def backend_name(self) -> str:
        return "per-process-spark"

    def engine_address(self) -> str:
        return f"local[{self.cores}] in the step process"

    def run_notebook(
        self,
        notebook: str,
        parameters: Mapping[str, str],
        *,
        timeout_seconds: int = 3600,
        log: logging.Logger | None = None,
    ) -> NotebookResult:
        if notebook not in NOTEBOOK_NAMES:
            raise ConfigError(f"unknown notebook {notebook!r}; expected one of {NOTEBOOK_NAMES}")
        source = parse_table(parameters.get("source_table", settings.DEFAULT_SOURCE_TABLE))
        if source.path is None or parameters.get("target_schema"):
            raise ConfigError(
                "the per-process-spark backend reads and writes Delta paths only: "
                "pass source_table=delta.`/abs/path` and no target_schema"
            )
        path = Path(settings.notebooks_dir()) / f"{notebook}.py"
        # Timed from before the JVM starts: that start-up is what this mode exists to show.
        started = time.time()
        spark = engine.classic_session(cores=self.cores, driver_memory=self.driver_memory)
        return run_on_session(self, notebook, path, spark, parameters, timeout_seconds, started)
