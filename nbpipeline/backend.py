"""The one abstract resource for running a notebook, and what a run returns.

Assets depend on `NotebookBackend` only; which implementation is bound (local or Databricks) is
decided in one place (`nbpipeline.defs.resources`), so the asset graph never changes with the
backend.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from nbpipeline.errors import NotebookError

NOTEBOOK_NAMES = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")


@dataclass
class NotebookResult:
    """The outcome of one successful notebook run, whatever the backend.

    `exit_value` is the notebook's `dbutils.notebook.exit` JSON, parsed, passed on unchanged by
    every backend. Its shape: notebook, started_at, ended_at, duration_s, source_table,
    source_version (the Delta version read), source_version_requested (the widget value),
    rows_read, rows_rejected and `tables`, a list with one entry per table written: asset, table,
    location, rows_read, rows_rejected, rows_inserted, rows_updated, rows_deleted, delta_version
    (the commit this run's MERGE made, or the version it left when `committed` is false),
    committed, row_count (of that version), columns (name, type) and `checks`, the asset checks
    the notebook evaluated on that version (name, passed (null: not evaluated), severity
    ERROR/WARN, description, metadata).
    """

    notebook: str
    location: str
    backend: str
    engine: str
    exit_value: dict[str, Any]
    started_at: float
    ended_at: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tables(self) -> list[dict[str, Any]]:
        return list(self.exit_value.get("tables", []))


def parse_exit_value(raw: str | None, *, notebook: str) -> dict[str, Any]:
    """Parse a notebook's exit string; a notebook that exits without JSON is an error."""
    if raw is None or raw == "":
        raise NotebookError(
            "finished without calling dbutils.notebook.exit(json)", notebook=notebook
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NotebookError(f"exit value is not JSON: {raw[:200]!r}", notebook=notebook) from exc
    if not isinstance(value, dict) or not isinstance(value.get("tables"), list):
        raise NotebookError(f"exit value has no 'tables' list: {raw[:200]!r}", notebook=notebook)
    return value


class NotebookBackend(dg.ConfigurableResource, ABC):
    """Runs one of the project's notebooks with widget parameters and returns its exit value."""

    @property
    @abstractmethod
    def backend_name(self) -> str:
        """Short name shown in metadata: `local` or `databricks`."""

    @abstractmethod
    def engine_address(self) -> str:
        """Where notebooks run, safe to show (no secrets): a Spark Connect URL or workspace host."""

    @abstractmethod
    def run_notebook(
        self,
        notebook: str,
        parameters: Mapping[str, str],
        *,
        timeout_seconds: int = 3600,
        log: logging.Logger | None = None,
    ) -> NotebookResult:
        """Run `notebook` (one of NOTEBOOK_NAMES) with widget values `parameters`.

        Raises `NotebookError` (with notebook, cell and, on Databricks, run URL) on failure.
        """
