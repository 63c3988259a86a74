"""One run, one snapshot: every step of a run reads the same source version while an upstream
writer keeps committing to the source, in the sequential and the parallel job alike."""

from __future__ import annotations

import threading
import time
from typing import Any

import dagster as dg
import pytest

from nbpipeline import definitions
from nbpipeline.defs.assets import op_config, run_created_at
from nbpipeline.defs.tags import SOURCE_VERSION_TAG, SOURCE_VERSIONS_TAG
from nbpipeline.local.seed import seed_orders
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests import contract_oracle as oracle
from nbpipeline_tests.helpers import assert_table_equal, collect, materializations

pytestmark = [pytest.mark.spark, pytest.mark.dagster, pytest.mark.slow]


class Writer(threading.Thread):
    """Appends one valid order to the source about every half second until stopped."""

    def __init__(self, spark: Any, source: str) -> None:
        super().__init__(daemon=True)
        self.spark, self.source = spark, source
        self.stop = threading.Event()
        self.commits = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        order_id = 50_000_000
        try:
            while not self.stop.wait(0.5):
                order_id += 1
                self.spark.sql(
                    f"INSERT INTO {self.source} VALUES ({order_id}, 7, 7, 'books', 'north', "
                    "TIMESTAMP '2026-01-01 10:00:00', 1, 5000.00, 0.000, 'placed', "
                    "TIMESTAMP '2026-01-01 10:00:00')"
                )
                self.commits += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("job", ["sequential_notebooks_job", "parallel_notebooks_job"])
def test_every_step_reads_one_source_version_while_the_source_changes(
    spark, schema: str, instance, job: str
) -> None:
    source = f"{schema}.orders"
    seed_orders(spark, source, rows=1500, seed=31, dirty=True)
    writer = Writer(spark, source)
    writer.start()
    try:
        time.sleep(1.5)
        with dg.execute_job(
            dg.reconstructable(getattr(definitions, job)),
            instance=instance,
            run_config={"ops": op_config({"source_table": source})},
        ) as result:
            assert result.success, [e.message for e in result.get_step_failure_events()]
            run_id = result.run_id
            mats = materializations(result)
            checks = result.get_asset_check_evaluations()
    finally:
        writer.stop.set()
        writer.join()
    assert writer.error is None, writer.error
    assert set(mats) == set(OUTPUT_TABLES)
    versions = {m["source_version"] for m in mats.values()}
    assert len(versions) == 1, mats
    (version,) = versions
    # The version is the latest committed when the run was created; the writer committed
    # after it while the run went on, so a step pinning "the latest" would have read another.
    created = run_created_at(instance, run_id).replace(tzinfo=None)
    history = spark.sql(f"DESCRIBE HISTORY {source}").collect()
    assert version == max(h["version"] for h in history if h["timestamp"] <= created)
    assert any(h["version"] > version for h in history), "the writer never committed"
    tags = instance.get_run_by_id(run_id).tags
    assert tags[SOURCE_VERSION_TAG] == str(version)
    assert SOURCE_VERSIONS_TAG not in tags
    assert len(checks) == 12 and all(c.passed for c in checks)
    # Each output, at the version its MERGE committed, is the oracle's on that source version.
    expected = oracle.expected(collect(spark, f"{source} VERSION AS OF {version}"))
    for name, m in mats.items():
        assert m["rows_read"] == expected.rows_read
        got = oracle.keyed(
            name, collect(spark, f"{schema}.{name} VERSION AS OF {m['delta_version']}")
        )
        assert_table_equal(name, got, expected[name])
