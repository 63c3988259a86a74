"""The source and the five output tables: one registry of each table's facts, and their state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nbpipeline.identifiers import TableRef, parse_schema, parse_table

# Asset check names; the notebooks evaluate them and report them by these names.
UNIQUE_KEYS = "unique_keys"
NO_NEGATIVE_REVENUE = "no_negative_revenue"
MATCHES_SOURCE = "row_count_matches_source"
SUBSET_OF_ORDER_FACTS = "subset_of_order_facts"


def pool_name(notebook: str) -> str:
    """The concurrency pool of a notebook step. Each table is written by exactly one notebook,
    so one pool per notebook (limit 1) means no two runs MERGE the same table at once."""
    return f"nbpipeline/{notebook}"


@dataclass(frozen=True)
class OutputTable:
    """One output table: what the assets, checks, pools and CLI need to know about it."""

    name: str
    notebook: str
    #: The MERGE key.
    keys: tuple[str, ...]
    description: str
    #: The asset checks its notebook evaluates on it, in the order results are reported.
    checks: tuple[str, ...] = (UNIQUE_KEYS, NO_NEGATIVE_REVENUE)

    @property
    def pool(self) -> str:
        return pool_name(self.notebook)


OUTPUTS: dict[str, OutputTable] = {
    t.name: t
    for t in (
        OutputTable(
            "daily_sales",
            "Notebook1",
            ("order_date", "region"),
            "One row per (order_date, region) with counted orders: orders, returned orders, and "
            "units / gross / net revenue of revenue-bearing orders. Written by Notebook1.",
        ),
        OutputTable(
            "customer_summary",
            "Notebook2",
            ("customer_id",),
            "One row per customer with counted orders: order count, first / last order, "
            "lifetime value and favourite category. Written by Notebook2.",
        ),
        OutputTable(
            "product_performance",
            "Notebook3",
            ("product_id",),
            "One row per product with counted orders: category, orders, units sold, net revenue "
            "and return rate. Written by Notebook3.",
        ),
        OutputTable(
            "order_facts",
            "Notebook4",
            ("order_id",),
            "One row per valid, deduplicated order (all statuses) with its derived amounts. "
            "Written by Notebook4.",
            checks=(UNIQUE_KEYS, NO_NEGATIVE_REVENUE, MATCHES_SOURCE),
        ),
        OutputTable(
            "high_value_orders",
            "Notebook4",
            ("order_id",),
            "Revenue-bearing orders whose net amount is at least high_value_threshold. Written "
            "by Notebook4.",
            checks=(UNIQUE_KEYS, NO_NEGATIVE_REVENUE, SUBSET_OF_ORDER_FACTS),
        ),
    )
}

# Views of OUTPUTS for callers that need one fact per table.
#: Output table -> the notebook that writes it (Notebook4 writes two).
OUTPUT_TABLES: dict[str, str] = {t.name: t.notebook for t in OUTPUTS.values()}
#: Output table -> its key columns (the MERGE key).
OUTPUT_KEYS: dict[str, tuple[str, ...]] = {t.name: t.keys for t in OUTPUTS.values()}


def notebook_tables(notebook: str) -> list[str]:
    """The output tables a notebook writes, in the contract's order."""
    return [t.name for t in OUTPUTS.values() if t.notebook == notebook]


def output_ref(source: TableRef | str, name: str, target_schema: str = "") -> TableRef:
    """Where output `name` lives: in `target_schema` if given, else beside the source (as the
    notebooks decide)."""
    source = parse_table(source) if isinstance(source, str) else source
    if target_schema:
        parts = parse_schema(target_schema, what="target_schema").split(".")
        catalog, schema = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
        return TableRef(table=name, schema=schema, catalog=catalog)
    return source.sibling(name)


def table_info(spark: Any, ref: TableRef) -> dict[str, Any]:
    """name, location, Delta version and row count of a table (exists=False if it is absent)."""
    info: dict[str, Any] = {
        "name": ref.sql,
        "exists": False,
        "location": None,
        "version": None,
        "rows": None,
    }
    try:
        history = spark.sql(f"DESCRIBE HISTORY {ref.sql} LIMIT 1").collect()
    except Exception:  # absent (or not Delta): reported as not existing
        return info
    info["exists"] = True
    info["version"] = int(history[0]["version"]) if history else None
    info["rows"] = int(spark.sql(f"SELECT COUNT(*) AS n FROM {ref.sql}").collect()[0]["n"])
    info["location"] = table_location(spark, ref)
    return info


def table_location(spark: Any, ref: TableRef) -> str | None:
    """The storage location of a table (a path for path tables)."""
    if ref.path is not None:
        return ref.path
    rows = spark.sql(f"DESCRIBE TABLE EXTENDED {ref.sql}").collect()
    for row in rows:
        if row[0] == "Location":
            return row[1]
    return None
