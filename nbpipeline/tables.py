"""The source and the five output tables: names, which notebook writes them, and their state."""

from __future__ import annotations

from typing import Any

from nbpipeline.identifiers import TableRef, parse_schema, parse_table

# Output table -> the notebook that writes it (Notebook4 writes two).
OUTPUT_TABLES: dict[str, str] = {
    "daily_sales": "Notebook1",
    "customer_summary": "Notebook2",
    "product_performance": "Notebook3",
    "order_facts": "Notebook4",
    "high_value_orders": "Notebook4",
}

# Output table -> its key columns (the MERGE key).
OUTPUT_KEYS: dict[str, tuple[str, ...]] = {
    "daily_sales": ("order_date", "region"),
    "customer_summary": ("customer_id",),
    "product_performance": ("product_id",),
    "order_facts": ("order_id",),
    "high_value_orders": ("order_id",),
}


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
    except Exception:  # noqa: BLE001 - absent (or not Delta): reported as not existing
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
