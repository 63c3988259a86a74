"""A notebook backend that runs nothing: canned exit values, scripted failures, a call log."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from nbpipeline.backend import NotebookBackend, NotebookResult
from nbpipeline.errors import EngineError, NotebookError
from nbpipeline.tables import OUTPUT_TABLES

# Calls per notebook, module-level: Dagster copies resources, so an instance counter would reset.
CALLS: dict[str, int] = {}


class FakeBackend(NotebookBackend):
    """Returns a canned exit value; fails transiently `flaky` times first (counted per class)."""

    flaky: int = 0
    reason: str = ""
    name: str = "fake"
    address: str = "fake://engine"
    runs_notebooks: bool = True

    @property
    def backend_name(self) -> str:
        return self.name

    def engine_address(self) -> str:
        return self.address

    def run_notebook(
        self,
        notebook: str,
        parameters: Mapping[str, str],
        *,
        timeout_seconds: int = 3600,
        log: logging.Logger | None = None,
    ) -> NotebookResult:
        if not self.runs_notebooks:
            raise AssertionError("no notebook runs in these tests")
        n = CALLS[notebook] = CALLS.get(notebook, 0) + 1
        if self.reason:
            raise NotebookError(self.reason, notebook=notebook, cell=3)
        if n <= self.flaky:
            raise EngineError("cannot connect to the Spark engine at sc://x: UNAVAILABLE")
        tables = [
            {
                "asset": asset,
                "table": f"s.{asset}",
                "location": f"file:/w/s.db/{asset}",
                "rows_inserted": 3,
                "rows_updated": 2,
                "rows_deleted": 1,
                "delta_version": 7,
                "row_count": 10,
                "columns": [{"name": "k", "type": "bigint"}, {"name": "v", "type": "string"}],
            }
            for asset, nb in OUTPUT_TABLES.items()
            if nb == notebook
        ]
        return NotebookResult(
            notebook=notebook,
            location=f"/nb/{notebook}.py",
            backend="fake",
            engine="fake://engine",
            exit_value={
                "notebook": notebook,
                "started_at": "2025-01-01T00:00:00+00:00",
                "ended_at": "2025-01-01T00:00:02+00:00",
                "duration_s": 2.0,
                "source_table": parameters["source_table"],
                "source_version": 4,
                "rows_read": 12,
                "rows_rejected": 1,
                "tables": tables,
            },
            started_at=100.0,
            ended_at=103.5,
            extra={"run_url": "https://example.invalid/run/1", "run_id": 1},
        )


class NotebooksOnlyBackend(FakeBackend):
    """A backend without a Spark session of its own, as Databricks without a Spark Connect URL."""

    name: str = "remote-only"
    address: str = "https://workspace.invalid"
    runs_notebooks: bool = False
