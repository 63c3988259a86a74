"""The source table: which one the pipeline reads, and observing it (it is never written).

The source belongs to the user. The `orders` asset and the source-version sensor only read it:
its latest Delta version (the asset's data version, so the UI marks the outputs stale when the
source moves), its row count at that version and the time of that commit. Observing needs a
Spark session onto the source's catalog: the local engine, or NBPIPELINE_SPARK_REMOTE on other
backends; without one the observation fails saying so, and no data version is recorded.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

from nbpipeline.errors import ConfigError
from nbpipeline.identifiers import parse_table
from nbpipeline.settings import DEFAULT_SOURCE_TABLE

#: The source table of scheduled and sensor-launched runs and of the `orders` observation.
SOURCE_TABLE_ENV = "NBPIPELINE_SOURCE_TABLE"


def configured_source_table() -> str:
    """NBPIPELINE_SOURCE_TABLE, else the notebooks' default source; a bad name is a ConfigError."""
    raw = os.environ.get(SOURCE_TABLE_ENV, "").strip()
    if not raw:
        return DEFAULT_SOURCE_TABLE
    try:
        return parse_table(raw, what="source_table").sql
    except ConfigError as exc:
        raise ConfigError(f"{SOURCE_TABLE_ENV}: {exc.message}", hint=exc.hint) from None


@dataclass(frozen=True)
class SourceState:
    """One observation of the source table."""

    table: str
    version: int
    rows: int
    last_commit: dt.datetime  # UTC
    location: str | None

    def metadata(self) -> dict[str, Any]:
        """Observation metadata, with Dagster's standard keys where there is one."""
        import dagster as dg

        from nbpipeline.defs.metadata import ROW_COUNT_KEY, TABLE_KEY, URI_KEY

        out: dict[str, Any] = {
            "delta_version": self.version,
            "rows": self.rows,
            "last_commit": dg.MetadataValue.timestamp(self.last_commit),
            TABLE_KEY: self.table,
            ROW_COUNT_KEY: self.rows,
        }
        if self.location:
            out[URI_KEY] = self.location
        return out


def observe_source(spark: Any, table: str) -> SourceState:
    """The source's latest Delta version, its row count at that version and the commit's time.

    A missing table is a ConfigError naming it; nothing is written.
    """
    from nbpipeline.local import seed
    from nbpipeline.tables import table_location

    ref = parse_table(table, what="source_table")
    if not seed.table_exists(spark, ref):
        raise ConfigError(
            f"source table {ref.sql} does not exist",
            hint=f"point {SOURCE_TABLE_ENV} at your table, or create demo data: "
            f"nbpipeline seed --rows 10000 --table {ref.sql}",
        )
    latest = (
        spark.sql(f"DESCRIBE HISTORY {ref.sql} LIMIT 1")
        .selectExpr("version", "unix_millis(timestamp) AS ms")
        .collect()[0]
    )
    version = int(latest["version"])
    # Counted at that version, so the three figures describe one snapshot.
    rows = int(
        spark.sql(f"SELECT COUNT(*) AS n FROM {ref.sql} VERSION AS OF {version}").collect()[0]["n"]
    )
    return SourceState(
        table=ref.sql,
        version=version,
        rows=rows,
        last_commit=dt.datetime.fromtimestamp(int(latest["ms"]) / 1000, tz=dt.UTC),
        location=table_location(spark, ref),
    )


def observe_with_backend(backend: Any, table: str) -> SourceState:
    """`observe_source` on the Spark session of the backend's catalog.

    The Databricks backend runs notebooks only and has no Spark session of its own; without
    NBPIPELINE_SPARK_REMOTE this is a ConfigError saying so (never a made-up version).
    """
    from nbpipeline.defs.resources import spark_session

    try:
        spark = spark_session(backend)
    except ConfigError as exc:
        raise ConfigError(f"cannot observe {table}: {exc.message}", hint=exc.hint) from None
    return observe_source(spark, table)
