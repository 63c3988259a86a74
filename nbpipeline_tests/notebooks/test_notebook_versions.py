"""The notebooks' snapshot and version rules, run through the local runtime on the engine.

- `source_version`: empty reads the latest version, a number reads exactly that version, a UTC
  timestamp the latest version committed at or before it; a version that does not exist is one
  clear line before anything is written.
- The version reported for each output is the commit its own MERGE made, even when another
  writer commits to the table between the MERGE and the notebook's reading of the history; the
  checks are evaluated on that version and high_value_orders derives from this run's rows.
- A source value the contract's type cannot hold is a rejected row, with ANSI mode on and off.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from nbpipeline import settings
from nbpipeline.errors import NotebookError
from nbpipeline.local import seed
from nbpipeline.local.runtime import run_notebook
from nbpipeline_tests import contract_oracle as oracle
from nbpipeline_tests.helpers import assert_table_equal, collect

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def run(spark, notebook: str, params: dict[str, str], folder: Path | None = None) -> dict:
    path = (folder or settings.notebooks_dir()) / f"{notebook}.py"
    return json.loads(run_notebook(path, params, spark=spark))


def history(spark, table: str) -> list[dict[str, Any]]:
    return [r.asDict() for r in spark.sql(f"DESCRIBE HISTORY {table}").collect()]


def table_at(spark, table: str, version: int) -> dict:
    return oracle.keyed(table.rsplit(".", 1)[1], collect(spark, f"{table} VERSION AS OF {version}"))


def test_source_version_widget(spark, schema: str) -> None:
    source = f"{schema}.orders"
    seed.seed_orders(spark, source, rows=400, seed=5, dirty=True)  # version 0
    seed.apply_changes(spark, source, fraction=0.3, seed=6)  # version 1
    commits = {h["version"]: h["timestamp"] for h in history(spark, source)}
    assert sorted(commits) == [0, 1]
    v0_rows = collect(spark, f"{source} VERSION AS OF 0")
    params = {"source_table": source, "target_schema": schema}

    out = run(spark, "Notebook4", {**params, "source_version": "0"})
    assert out["source_version"] == 0 and out["source_version_requested"] == "0"
    expected = oracle.expected(v0_rows)
    assert out["rows_read"] == expected.rows_read == 400
    assert_table_equal(
        "order_facts",
        table_at(spark, f"{schema}.order_facts", out["tables"][0]["delta_version"]),
        expected["order_facts"],
    )

    # A timestamp between the two commits reads version 0; one after both reads version 1.
    between = commits[0] + (commits[1] - commits[0]) / 2
    stamp = between.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert run(spark, "Notebook1", {**params, "source_version": stamp})["source_version"] == 0
    later = (commits[1] + dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert run(spark, "Notebook1", {**params, "source_version": later})["source_version"] == 1
    assert run(spark, "Notebook1", params)["source_version"] == 1

    before = {
        t: history(spark, f"{schema}.{t}")[0]["version"] for t in ("daily_sales", "order_facts")
    }
    bad = [
        ("7", "source version 7 of"),
        ("2000-01-01T00:00:00Z", "has no version committed at or before 2000-01-01 00:00:00"),
        ("last", "invalid source_version 'last'"),
    ]
    for value, message in bad:
        with pytest.raises(NotebookError) as err:
            run(spark, "Notebook4", {**params, "source_version": value})
        assert message in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)
    after = {t: history(spark, f"{schema}.{t}")[0]["version"] for t in before}
    assert after == before  # nothing written


def notebooks_with_writer(tmp_path: Path) -> Path:
    """A copy of the notebooks in which, right after each MERGE and before the notebook reads
    the table's history, another writer commits to the same table: it deletes the row with the
    greatest order_id."""
    folder = tmp_path / "notebooks"
    shutil.copytree(settings.notebooks_dir(), folder)
    common = folder / "_common.py"
    text = common.read_text()
    anchor = "        version, committed = committed_version(target, marker, before, counts)\n"
    assert text.count(anchor) == 1
    hook = (
        "        _last = spark.sql(f'SELECT MAX(order_id) FROM {target}').collect()[0][0]\n"
        "        spark.sql(f'DELETE FROM {target} WHERE order_id = {_last}')\n"
    )
    common.write_text(text.replace(anchor, hook + anchor))
    return folder


def test_reported_version_is_this_merges_commit(spark, schema: str, tmp_path: Path) -> None:
    source = f"{schema}.orders"
    seed.seed_orders(spark, source, rows=500, seed=8, dirty=True)
    params = {"source_table": source, "target_schema": schema}
    run(spark, "Notebook4", params)
    seed.apply_changes(spark, source, fraction=0.3, seed=9)
    folder = notebooks_with_writer(tmp_path)
    out = run(spark, "Notebook4", params, folder)
    expected = oracle.expected(collect(spark, source))
    for entry in out["tables"]:
        table = f"{schema}.{entry['asset']}"
        ours, theirs = history(spark, table)[1], history(spark, table)[0]
        assert theirs["operation"] == "DELETE" and ours["operation"] == "MERGE"
        assert entry["delta_version"] == ours["version"] == theirs["version"] - 1
        assert entry["committed"] is True
        assert ours["userMetadata"].startswith(f"nbpipeline Notebook4 {entry['asset']} ")
        # The checks looked at our version (one row more than the table now has).
        assert entry["row_count"] == len(expected[entry["asset"]])
        assert all(c["passed"] for c in entry["checks"]), entry["checks"]
        assert all(
            f"version {ours['version']}" in c["metadata"]["checked"] for c in entry["checks"]
        )
        assert_table_equal(
            entry["asset"], table_at(spark, table, entry["delta_version"]), expected[entry["asset"]]
        )
    # high_value_orders came from this run's rows, not order_facts after the other writer.
    facts, high = out["tables"]
    assert facts["checks"][2]["name"] == "row_count_matches_source"
    assert high["checks"][2]["name"] == "subset_of_order_facts"


OVERFLOW_COLUMNS = """
    CAST(id AS BIGINT) AS order_id, CAST(id % 3 AS BIGINT) AS customer_id,
    CAST(id % 4 AS BIGINT) AS product_id, 'books' AS category, 'north' AS region,
    TIMESTAMP '2026-01-01 12:00:00' AS order_ts,
    CAST(CASE id WHEN 1 THEN 3000000000 WHEN 3 THEN 2000000000 ELSE 2 END AS BIGINT) AS quantity,
    CAST(CASE id WHEN 2 THEN 123456789.50 WHEN 3 THEN 99999999.99 ELSE 600.00 END
         AS DECIMAL(14,2)) AS unit_price,
    CAST(0.100 AS DECIMAL(4,3)) AS discount, 'placed' AS status,
    TIMESTAMP '2026-01-02 00:00:00' AS updated_at
"""


@pytest.mark.parametrize("ansi", ["true", "false"])
def test_values_the_contract_types_cannot_hold_are_rejected(spark, schema: str, ansi: str) -> None:
    """Row 1: quantity beyond INT; row 2: unit_price beyond DECIMAL(10,2); row 3: a gross amount
    beyond DECIMAL(18,2). Each is a rejected row, whatever spark.sql.ansi.enabled says."""
    source = f"{schema}.orders"
    spark.sql(f"CREATE TABLE {source} USING DELTA AS SELECT {OVERFLOW_COLUMNS} FROM range(10)")
    rows = collect(spark, source)
    expected = oracle.expected(rows, Decimal("1000.00"))
    assert expected.rows_rejected == 3 and len(expected["order_facts"]) == 7
    saved = spark.conf.get("spark.sql.ansi.enabled")
    spark.conf.set("spark.sql.ansi.enabled", ansi)
    try:
        outs = [
            run(spark, nb, {"source_table": source})
            for nb in ("Notebook1", "Notebook2", "Notebook3", "Notebook4")
        ]
    finally:
        spark.conf.set("spark.sql.ansi.enabled", saved)
    for out in outs:
        assert (out["rows_read"], out["rows_rejected"]) == (10, 3)
        for entry in out["tables"]:
            name = entry["asset"]
            assert_table_equal(
                name, oracle.keyed(name, collect(spark, f"{schema}.{name}")), expected[name]
            )
            assert all(c["passed"] for c in entry["checks"]), entry["checks"]
