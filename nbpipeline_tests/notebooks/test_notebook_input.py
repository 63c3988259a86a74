"""Bad input is refused by the notebooks with a one-line error, before anything is written."""

from __future__ import annotations

import json

import pytest

from nbpipeline.errors import ConfigError, NotebookError
from nbpipeline.local.runtime import run_notebook
from nbpipeline.settings import notebooks_dir

pytestmark = pytest.mark.spark

COLUMNS = """
    CAST(id AS BIGINT) AS order_id, CAST(id % 3 AS BIGINT) AS customer_id,
    CAST(id % 4 AS BIGINT) AS product_id, 'books' AS category, 'north' AS region,
    TIMESTAMP '2026-01-01 12:00:00' AS order_ts, CAST(2 AS INT) AS quantity,
    CAST(600.00 AS DECIMAL(10,2)) AS unit_price, CAST(0.100 AS DECIMAL(4,3)) AS discount,
    'placed' AS status, TIMESTAMP '2026-01-02 00:00:00' AS updated_at
"""


def make_source(spark, table: str, columns: str = COLUMNS, rows: int = 20) -> None:
    spark.sql(f"CREATE OR REPLACE TABLE {table} USING DELTA AS SELECT {columns} FROM range({rows})")


def versions(spark, schema: str) -> dict[str, int]:
    return {
        t: spark.sql(f"DESCRIBE HISTORY {schema}.{t} LIMIT 1").collect()[0]["version"]
        for t in ("order_facts", "high_value_orders")
    }


@pytest.fixture
def written(spark, schema: str) -> str:
    """A schema whose outputs were written once from a good source."""
    make_source(spark, f"{schema}.orders")
    out = json.loads(
        run_notebook(
            notebooks_dir() / "Notebook4.py", {"source_table": f"{schema}.orders"}, spark=spark
        )
    )
    assert [t["rows_inserted"] for t in out["tables"]] == [20, 20]
    return schema


def _bad_cases(schema: str) -> list[tuple[dict[str, str], str]]:
    return [
        ({"source_table": f"{schema}.nope"}, f"source table {schema}.nope does not exist"),
        ({"source_table": f"{schema}.no_discount"}, "is missing column(s): discount"),
        (
            {"source_table": f"{schema}.text_qty"},
            "source column quantity has type string, which is incompatible with INT",
        ),
        ({"source_table": f"{schema}.orders; DROP TABLE x"}, "invalid source_table"),
        (
            {"source_table": f"{schema}.orders", "high_value_threshold": "lots"},
            "invalid high_value_threshold 'lots'",
        ),
        (
            {"source_table": f"{schema}.orders", "high_value_threshold": "-1"},
            "invalid high_value_threshold '-1'",
        ),
        (
            {"source_table": f"{schema}.orders", "target_schema": "a b"},
            "invalid target_schema 'a b'",
        ),
    ]


def test_bad_input_is_refused_and_nothing_is_written(spark, written: str) -> None:
    schema = written
    cols = COLUMNS.replace(", CAST(0.100 AS DECIMAL(4,3)) AS discount", "")
    make_source(spark, f"{schema}.no_discount", cols)
    make_source(
        spark,
        f"{schema}.text_qty",
        COLUMNS.replace("CAST(2 AS INT) AS quantity", "'2' AS quantity"),
    )
    before = versions(spark, schema)
    for params, message in _bad_cases(schema):
        params = {"target_schema": schema, **params}
        with pytest.raises(NotebookError) as err:
            run_notebook(notebooks_dir() / "Notebook4.py", params, spark=spark)
        text = str(err.value)
        assert message in text, (params, text)
        assert len(text.splitlines()) == 1, text  # one line, no JVM stack trace
    assert versions(spark, schema) == before


def test_unknown_parameter_is_refused(spark, written: str) -> None:
    with pytest.raises(ConfigError, match="unknown parameter.*threshold"):
        run_notebook(notebooks_dir() / "Notebook1.py", {"threshold": "1"}, spark=spark)


@pytest.mark.slow
def test_extra_columns_ignored_and_empty_or_all_invalid_source_gives_empty_outputs(
    spark, written: str
) -> None:
    schema = written
    make_source(spark, f"{schema}.wide", COLUMNS + ", 'x' AS note")
    out = json.loads(
        run_notebook(
            notebooks_dir() / "Notebook4.py",
            {"source_table": f"{schema}.wide", "target_schema": schema},
            spark=spark,
        )
    )
    assert out["rows_read"] == 20 and out["tables"][0]["rows_updated"] == 0
    make_source(
        spark, f"{schema}.invalid", COLUMNS.replace("'placed' AS status", "'lost' AS status")
    )
    out = json.loads(
        run_notebook(
            notebooks_dir() / "Notebook4.py",
            {"source_table": f"{schema}.invalid", "target_schema": schema},
            spark=spark,
        )
    )
    assert out["rows_read"] == 20 and out["rows_rejected"] == 20
    assert [t["rows_deleted"] for t in out["tables"]] == [20, 20]
    assert [t["row_count"] for t in out["tables"]] == [0, 0]
    assert spark.table(f"{schema}.order_facts").count() == 0
    make_source(spark, f"{schema}.empty", rows=0)
    out = json.loads(
        run_notebook(
            notebooks_dir() / "Notebook1.py",
            {"source_table": f"{schema}.empty", "target_schema": schema},
            spark=spark,
        )
    )
    assert out["rows_read"] == 0 and out["tables"][0]["row_count"] == 0
