"""Materialization metadata built from a notebook run: pure functions, no Dagster context.

Every backend returns a `NotebookResult` whose exit JSON has the same shape, so the same functions
describe a materialization whether the notebook ran on the local engine or on Databricks (where
`NotebookResult.extra` adds the run URL and the like).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import dagster as dg

from nbpipeline.backend import NotebookResult

#: Row figures every table entry of an exit JSON carries.
ROW_COUNTERS = ("rows_read", "rows_rejected", "rows_inserted", "rows_updated", "rows_deleted")

SOURCE_TABLE_KEY = "source_table"
SOURCE_VERSION_KEY = "source_version"
# Dagster's well-known keys (its TableMetadataSet / UriMetadataSet), shown specially by the UI.
TABLE_KEY = "dagster/table_name"
ROW_COUNT_KEY = "dagster/row_count"
COLUMN_SCHEMA_KEY = "dagster/column_schema"
URI_KEY = "dagster/uri"
DELTA_VERSION_KEY = "delta_version"


def column_schema(columns: Any) -> dg.TableSchema | None:
    """`[{"name": ..., "type": ...}]` from an exit JSON -> a Dagster TableSchema (None if absent)."""
    if not isinstance(columns, list) or not columns:
        return None
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=str(c.get("name")), type=str(c.get("type", "unknown")))
            for c in columns
            if isinstance(c, Mapping) and c.get("name")
        ]
    )


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def extra_metadata(extra: Mapping[str, Any]) -> dict[str, Any]:
    """Backend-specific figures (run URL, run id, cluster, ...) as metadata values."""
    out: dict[str, Any] = {}
    for key, value in extra.items():
        if value is None:
            continue
        if (
            isinstance(value, str)
            and key.endswith("url")
            and value.startswith(("http://", "https://"))
        ):
            out[key] = dg.MetadataValue.url(value)
        elif isinstance(value, bool | int | float | str):
            out[key] = value
        else:
            # Nested values stay readable in the UI instead of failing metadata normalisation.
            out[key] = dg.MetadataValue.json(json.loads(json.dumps(value, default=str)))
    return out


def table_metadata(run: NotebookResult, table: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata of one output table's materialization, from the run and its exit-JSON entry.

    Row counters, the Delta version committed, table name, location (`dagster/uri`), row count and
    column schema, the source table and version read, where and how the notebook ran, the
    notebook's own start / end / duration and the backend's wall time, plus `run.extra`.
    """
    exit_value = run.exit_value
    meta: dict[str, Any] = {}
    for counter in ROW_COUNTERS:
        # rows_read / rows_rejected are per notebook; an entry may omit them.
        value = _int_or_none(table.get(counter, exit_value.get(counter)))
        if value is not None:
            meta[counter] = value
    version = _int_or_none(table.get("delta_version"))
    if version is not None:
        meta[DELTA_VERSION_KEY] = version
    if table.get("table"):
        meta[TABLE_KEY] = str(table["table"])
    row_count = _int_or_none(table.get("row_count"))
    if row_count is not None:
        meta[ROW_COUNT_KEY] = row_count
    schema = column_schema(table.get("columns"))
    if schema is not None:
        meta[COLUMN_SCHEMA_KEY] = schema
    if table.get("location"):
        meta[URI_KEY] = str(table["location"])
    if exit_value.get("source_table"):
        meta[SOURCE_TABLE_KEY] = str(exit_value["source_table"])
    source_version = _int_or_none(exit_value.get("source_version"))
    if source_version is not None:
        meta[SOURCE_VERSION_KEY] = source_version
    meta["notebook"] = run.notebook
    meta["notebook_path"] = dg.MetadataValue.path(run.location)
    meta["backend"] = run.backend
    meta["engine"] = run.engine
    for key in ("started_at", "ended_at"):
        if exit_value.get(key):
            meta[f"notebook_{key}"] = str(exit_value[key])
    duration = _float_or_none(exit_value.get("duration_s"))
    if duration is not None:
        meta["notebook_duration_s"] = duration
    # The backend's view: includes session set-up, cluster start or queueing on Databricks.
    meta["backend_wall_time_s"] = round(run.ended_at - run.started_at, 3)
    meta.update(extra_metadata(run.extra))
    return meta


def metadata_value(value: Any) -> Any:
    """The plain Python value of a stored metadata entry (MetadataValue or raw)."""
    return getattr(value, "value", value)
