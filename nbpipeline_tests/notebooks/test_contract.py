"""The four notebooks against DATA_CONTRACT.md, checked with an independent oracle.

One dirty seeded source per module; the notebooks run three times on it (first load, after a
change batch, rerun on an unchanged source) plus once on a Delta path source. Every output table
is compared with `contract_oracle` exactly, and the exit JSON figures with the oracle, a diff of
the tables and the tables' Delta history.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from nbpipeline import settings
from nbpipeline.local import seed
from nbpipeline.local.runtime import run_notebook
from nbpipeline_tests import contract_oracle as oracle
from nbpipeline_tests.helpers import assert_table_equal, collect, generated_code

pytestmark = pytest.mark.spark

OUTPUTS = {
    "Notebook1": ("daily_sales",),
    "Notebook2": ("customer_summary",),
    "Notebook3": ("product_performance",),
    "Notebook4": ("order_facts", "high_value_orders"),
}
ROWS = 3000


def run_all(spark, source: str, notebook_params: dict[str, dict[str, str]] | None = None) -> dict:
    """Run Notebook1..4 on `source`; {notebook: parsed exit JSON}."""
    exits = {}
    for notebook in OUTPUTS:
        params = {"source_table": source, **(notebook_params or {}).get(notebook, {})}
        raw = run_notebook(settings.notebooks_dir() / f"{notebook}.py", params, spark=spark)
        exits[notebook] = json.loads(raw)
    return exits


def output_name(source: str, table: str) -> str:
    return (
        source.rsplit("/", 1)[0] + f"/{table}`"
        if source.startswith("delta.`")
        else (source.rsplit(".", 1)[0] + f".{table}")
    )


def history(spark, name: str) -> list[dict[str, Any]]:
    return [r.asDict() for r in spark.sql(f"DESCRIBE HISTORY {name}").collect()]


def source_rows(spark, source: str) -> list[dict[str, Any]]:
    return collect(spark, source)


def snapshot(spark, source: str) -> dict[str, dict]:
    """Every output table: {table: {key: row with _updated_at}}."""
    out = {}
    for tables in OUTPUTS.values():
        for table in tables:
            rows = collect(spark, output_name(source, table))
            keys = oracle.TABLE_COLUMNS[table][0]
            stamps = {tuple(r[k] for k in keys): r["_updated_at"] for r in rows}
            out[table] = {
                key: {**row, "_updated_at": stamps[key]}
                for key, row in oracle.keyed(table, rows).items()
            }
    return out


def values(row: dict) -> dict:
    return {c: v for c, v in row.items() if c != "_updated_at"}


def without_updated_at(table: dict) -> dict:
    return {k: values(row) for k, row in table.items()}


def check_exits(
    spark, source: str, exits: dict, expected: oracle.Expected, counts: dict[str, dict]
) -> None:
    """Exit JSON figures against the oracle, the expected change counts and Delta history."""
    source_version = history(spark, source)[0]["version"]
    for notebook, tables in OUTPUTS.items():
        exit_value = exits[notebook]
        assert exit_value["notebook"] == notebook
        assert exit_value["source_table"] == source
        assert exit_value["source_version"] == source_version
        assert exit_value["rows_read"] == expected.rows_read
        assert exit_value["rows_rejected"] == expected.rows_rejected
        started = dt.datetime.fromisoformat(exit_value["started_at"])
        ended = dt.datetime.fromisoformat(exit_value["ended_at"])
        assert started <= ended and exit_value["duration_s"] >= 0
        assert [t["asset"] for t in exit_value["tables"]] == list(tables)
        for entry in exit_value["tables"]:
            table = entry["asset"]
            name = output_name(source, table)
            assert entry["table"] == name
            assert entry["location"]
            assert (entry["rows_read"], entry["rows_rejected"]) == (
                expected.rows_read,
                expected.rows_rejected,
            )
            assert {
                "inserted": entry["rows_inserted"],
                "updated": entry["rows_updated"],
                "deleted": entry["rows_deleted"],
            } == counts[table], table
            assert entry["row_count"] == len(expected[table])
            columns = [{"name": c, "type": t} for c, t in oracle.TABLE_TYPES[table].items()]
            columns.append({"name": "_updated_at", "type": "timestamp"})
            assert entry["columns"] == columns, table
            schema = spark.sql(f"SELECT * FROM {name}").schema
            assert [{"name": f.name, "type": f.dataType.simpleString()} for f in schema] == columns
            latest = history(spark, name)[0]
            assert entry["delta_version"] == latest["version"], table
            assert latest["operation"] == "MERGE"
            metrics = latest["operationMetrics"]
            assert {
                "inserted": int(metrics["numTargetRowsInserted"]),
                "updated": int(metrics["numTargetRowsUpdated"]),
                "deleted": int(metrics["numTargetRowsDeleted"]),
            } == counts[table], table


def run_window(exit_value: dict) -> tuple[dt.datetime, dt.datetime]:
    """The run's start and end as naive UTC datetimes (how _updated_at is collected)."""

    def naive(text: str) -> dt.datetime:
        return dt.datetime.fromisoformat(text).astimezone(dt.UTC).replace(tzinfo=None)

    return naive(exit_value["started_at"]), naive(exit_value["ended_at"])


def table_owner(table: str) -> str:
    return next(nb for nb, tables in OUTPUTS.items() if table in tables)


# --------------------------------------------------------------------------- the three runs


@pytest.fixture(scope="module", autouse=True)
def _generated_code(spark) -> Iterator[None]:
    """The contract is checked on the code path users run: generated code on."""
    with generated_code(spark):
        yield


@pytest.fixture(scope="module")
def source(spark) -> str:
    schema = f"t_contract_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE SCHEMA {schema}")
    table = f"{schema}.orders"
    seed.seed_orders(spark, table, rows=ROWS, dirty=True)
    return table


@pytest.fixture(scope="module")
def first_run(spark, source: str) -> dict:
    expected = oracle.expected(source_rows(spark, source))
    exits = run_all(spark, source)
    return {"expected": expected, "exits": exits, "tables": snapshot(spark, source)}


@pytest.fixture(scope="module")
def changed_run(spark, source: str, first_run: dict) -> dict:
    change = seed.apply_changes(spark, source, fraction=0.2)
    expected = oracle.expected(source_rows(spark, source))
    exits = run_all(spark, source)
    return {
        "change": change,
        "expected": expected,
        "exits": exits,
        "tables": snapshot(spark, source),
    }


@pytest.fixture(scope="module")
def rerun(spark, source: str, changed_run: dict) -> dict:
    exits = run_all(spark, source)
    return {"exits": exits, "tables": snapshot(spark, source)}


def test_first_run_matches_oracle(spark, source: str, first_run: dict) -> None:
    expected: oracle.Expected = first_run["expected"]
    # The seeded source exercises the contract: rejects, duplicates, and every output non-empty.
    assert expected.rows_read == ROWS and 20 < expected.rows_rejected < 100
    assert all(expected[t] for t in first_run["tables"])
    for table, rows in first_run["tables"].items():
        assert_table_equal(table, without_updated_at(rows), expected[table])
        start, end = run_window(first_run["exits"][table_owner(table)])
        assert all(start <= r["_updated_at"] <= end for r in rows.values()), table
    counts = {
        t: {"inserted": len(expected[t]), "updated": 0, "deleted": 0} for t in first_run["tables"]
    }
    check_exits(spark, source, first_run["exits"], expected, counts)


@pytest.mark.slow
def test_change_batch_matches_oracle(
    spark, source: str, first_run: dict, changed_run: dict
) -> None:
    change = changed_run["change"]
    assert change["updated"] > 0 and change["inserted"] == round(ROWS * 0.2 / 2)
    expected: oracle.Expected = changed_run["expected"]
    assert expected.rows_read == ROWS + change["inserted"]
    counts = {}
    for table, after in changed_run["tables"].items():
        before = first_run["tables"][table]
        assert_table_equal(table, without_updated_at(after), expected[table])
        counts[table] = oracle.diff(without_updated_at(before), without_updated_at(after))
        start, end = run_window(changed_run["exits"][table_owner(table)])
        for key, row in after.items():
            if key in before and values(before[key]) == values(row):
                assert row["_updated_at"] == before[key]["_updated_at"], (table, key)
            else:
                assert start <= row["_updated_at"] <= end, (table, key)
    # The batch exercises inserts, updates and deletes (orders that stopped qualifying, days and
    # regions left only with changed orders); deterministic for the seeds used.
    assert all(
        counts[t]["inserted"] and counts[t]["updated"] for t in ("daily_sales", "order_facts")
    )
    assert counts["high_value_orders"]["deleted"] and counts["daily_sales"]["deleted"]
    assert counts["customer_summary"]["updated"] and counts["product_performance"]["updated"]
    check_exits(spark, source, changed_run["exits"], expected, counts)


@pytest.mark.slow
def test_rerun_on_unchanged_source_changes_nothing(
    spark, source: str, changed_run: dict, rerun: dict
) -> None:
    zero = {"inserted": 0, "updated": 0, "deleted": 0}
    check_exits(
        spark,
        source,
        rerun["exits"],
        changed_run["expected"],
        {t: zero for t in changed_run["tables"]},
    )
    for table, rows in rerun["tables"].items():
        # Same values and the same _updated_at: no row was rewritten.
        assert rows == changed_run["tables"][table], table


# Hand-made rows appended to the Delta path source: boundary cases of the contract that random
# data hits rarely or never. Ids are far above the seeded ones.
CUST, PROD, ORDER = 9_000_000, 90_000, 90_000_000
DAY = dt.datetime(2024, 3, 1, 12, 0, 0)
EMPTY_DAY = dt.datetime(2030, 1, 1, 8, 0, 0)


def edge_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(customer: int, product: int, status: str, **values: Any) -> None:
        row = {
            "order_id": ORDER + len(rows),
            "customer_id": CUST + customer,
            "product_id": PROD + product,
            "category": "books",
            "region": "north",
            "order_ts": DAY,
            "quantity": 1,
            "unit_price": Decimal("10.00"),
            "discount": Decimal("0.000"),
            "status": status,
            "updated_at": DAY + dt.timedelta(hours=1),
        }
        row.update(values)
        rows.append(row)

    # Customer 1: two categories tie on net revenue (the alphabetically first wins); a larger
    # order without category does not count; microsecond timestamps survive.
    add(1, 1, "delivered", category="toys", unit_price=Decimal("30.00"))
    add(1, 1, "shipped", category="books", unit_price=Decimal("30.00"))
    add(
        1,
        2,
        "placed",
        category=None,
        unit_price=Decimal("100.00"),
        order_ts=DAY + dt.timedelta(microseconds=123457),
    )
    # Customer 2: only a returned order (counted, no revenue); customer 3: only cancelled.
    add(2, 2, "returned", category="garden")
    add(3, 3, "cancelled", category="garden")
    # Product 4: 32 counted orders, 1 returned -> 0.03125 -> 0.0313 (half-up); product 5: 1 of 3.
    for i in range(32):
        add(4, 4, "returned" if i == 0 else "delivered", category="sports", region=None)
    for i in range(3):
        add(4, 5, "returned" if i == 0 else "delivered", category="sports")
    # Product 6: only NULL categories; product 7: NULL and a category; product 3: only cancelled.
    add(5, 6, "delivered", category=None)
    add(5, 7, "delivered", category=None)
    add(5, 7, "returned", category="home")
    # Net amount rounding half-up: 1.00 * (1 - 0.135) = 0.865 -> 0.87.
    add(6, 8, "delivered", unit_price=Decimal("1.00"), discount=Decimal("0.135"))
    # High-value boundary at 250.00: equal qualifies, a cent less or not revenue-bearing does not.
    add(7, 9, "delivered", unit_price=Decimal("250.00"))
    add(7, 9, "placed", unit_price=Decimal("125.00"), quantity=2)
    add(7, 9, "shipped", unit_price=Decimal("249.99"))
    add(7, 9, "returned", unit_price=Decimal("5000.00"))
    add(7, 9, "cancelled", unit_price=Decimal("5000.00"))
    # Amounts far beyond double precision.
    add(
        8,
        10,
        "delivered",
        quantity=1_000_000,
        unit_price=Decimal("99999999.99"),
        discount=Decimal("0.001"),
    )
    # A day whose only orders are cancelled has no daily_sales row.
    add(9, 11, "cancelled", order_ts=EMPTY_DAY)
    add(9, 11, "cancelled", order_ts=EMPTY_DAY, region=None)
    return rows


def check_edge_cases(expected: oracle.Expected) -> None:
    """Pin the contract's boundary cases (the oracle could share a notebook's misreading)."""
    customers, products = expected["customer_summary"], expected["product_performance"]
    facts, high = expected["order_facts"], expected["high_value_orders"]
    assert customers[(CUST + 1,)]["favourite_category"] == "books"
    assert customers[(CUST + 1,)]["last_order_ts"] == DAY + dt.timedelta(microseconds=123457)
    assert customers[(CUST + 2,)]["orders"] == 1
    assert (
        customers[(CUST + 2,)]["lifetime_value"] == 0
        and not customers[(CUST + 2,)]["favourite_category"]
    )
    assert (CUST + 3,) not in customers and (PROD + 3,) not in products
    assert products[(PROD + 4,)]["return_rate"] == 0.0313
    assert products[(PROD + 5,)]["return_rate"] == 0.3333
    assert products[(PROD + 6,)]["category"] is None and products[(PROD + 7,)]["category"] == "home"
    net = {row["net_amount"] for row in facts.values() if row["order_id"] >= ORDER}
    assert Decimal("0.87") in net
    gross = {row["gross_amount"] for row in facts.values() if row["order_id"] >= ORDER}
    assert Decimal("99999999990000.00") in gross
    hv = sorted(row["net_amount"] for row in high.values() if row["order_id"] >= ORDER)
    assert hv == [Decimal("250.00"), Decimal("250.00"), Decimal("99899999990010.00")]
    daily = expected["daily_sales"]
    assert (DAY.date(), None) in daily and (DAY.date(), "north") in daily
    assert not any(day == EMPTY_DAY.date() for day, _ in daily)


@pytest.mark.slow
def test_delta_path_source(spark, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder: Path = tmp_path_factory.mktemp("contract_paths")
    source = f"delta.`{folder}/orders`"
    seed.seed_orders(spark, source, rows=600, seed=11, dirty=True)
    schema = ", ".join(f"{name} {kind}" for name, kind in seed.ORDER_COLUMNS)
    spark.createDataFrame(edge_rows(), schema=schema).write.format("delta").mode("append").save(
        f"{folder}/orders"
    )
    threshold = Decimal("250.00")
    exits = run_all(spark, source, {"Notebook4": {"high_value_threshold": str(threshold)}})
    expected = oracle.expected(source_rows(spark, source), threshold)
    check_edge_cases(expected)
    tables = snapshot(spark, source)
    for table, rows in tables.items():
        assert (folder / table / "_delta_log").is_dir(), table
        assert_table_equal(table, without_updated_at(rows), expected[table])
    counts = {t: {"inserted": len(expected[t]), "updated": 0, "deleted": 0} for t in tables}
    check_exits(spark, source, exits, expected, counts)
    for exit_value in exits.values():
        for entry in exit_value["tables"]:
            assert entry["location"].rstrip("/").endswith(f"{folder}/{entry['asset']}")
