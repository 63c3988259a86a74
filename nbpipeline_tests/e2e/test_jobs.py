"""The jobs executed for real on a persistent instance configured by the project's dagster.yaml.

The step processes of the multiprocess executor inherit NBPIPELINE_HOME and NBPIPELINE_ENGINE_PORT
from this process (conftest sets them), so they reach this session's engine. Wall times are
printed (`pytest -s`) so the figures can be compared across machines.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
import pytest

from nbpipeline.defs.checks import VALID_ROW_SQL
from nbpipeline.defs.tags import SOURCE_VERSION_TAG
from nbpipeline.tables import OUTPUT_KEYS, OUTPUT_TABLES
from nbpipeline_tests.helpers import latest_version, step_windows

pytestmark = [pytest.mark.spark, pytest.mark.dagster, pytest.mark.slow]

NOTEBOOKS = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")


def assert_contract_invariants(spark: Any, schema: str, source: str) -> None:
    for name, keys in OUTPUT_KEYS.items():
        cols = ", ".join(keys)
        dups = spark.sql(
            f"SELECT COUNT(*) AS n FROM (SELECT {cols} FROM {schema}.{name} "
            f"GROUP BY {cols} HAVING COUNT(*) > 1)"
        ).collect()[0]["n"]
        assert dups == 0, f"{name} has duplicate keys"
    valid = spark.sql(
        f"SELECT COUNT(DISTINCT order_id) AS n FROM {source} WHERE {VALID_ROW_SQL}"
    ).collect()[0]["n"]
    assert spark.table(f"{schema}.order_facts").count() == valid
    orphans = spark.sql(
        f"SELECT COUNT(*) AS n FROM {schema}.high_value_orders h "
        f"LEFT ANTI JOIN {schema}.order_facts f ON h.order_id = f.order_id"
    ).collect()[0]["n"]
    assert orphans == 0


def test_parallel_job_runs_in_step_processes(spark, job_pair: dict) -> None:
    """The session's parallel run (conftest `job_pair`), read back from its event log."""
    instance, source, run_id = job_pair["instance"], job_pair["source"], job_pair["ids"]["parallel"]
    schema = source.split(".")[0]
    mats = {
        e.asset_materialization.asset_key.to_user_string(): {
            k: getattr(v, "value", v) for k, v in e.asset_materialization.metadata.items()
        }
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    }
    checks = [
        e.dagster_event.asset_check_evaluation_data
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    ]
    record = instance.get_run_record_by_id(run_id)
    wall = record.end_time - record.start_time

    assert set(mats) == set(OUTPUT_TABLES)
    source_version = latest_version(spark, source)
    for name, m in mats.items():
        table = f"{schema}.{name}"
        assert m["dagster/row_count"] == spark.table(table).count() > 0
        assert m["delta_version"] == latest_version(spark, table)
        assert m["rows_read"] == job_pair["seeded"]["rows"]
        assert m["source_version"] == source_version
        assert m["backend"] == "local"
    assert len(checks) == 12 and all(c.passed for c in checks)
    assert_contract_invariants(spark, schema, source)

    run = instance.get_run_by_id(run_id)
    assert run.tags["nbpipeline/mode"] == "parallel"
    assert run.tags[SOURCE_VERSION_TAG] == str(source_version)
    windows = step_windows(instance, run_id)
    notebook_windows = [windows[nb] for nb in NOTEBOOKS]
    # Each step ran in a process of its own, and the notebooks overlapped in time.
    pids = {pid for _, _, pid in notebook_windows}
    assert len(pids) == 4 and os.getpid() not in pids
    assert max(s for s, _, _ in notebook_windows) < min(e for _, e, _ in notebook_windows)
    # The steps claimed their tables' pools, created with the project's default limit of 1.
    for nb in NOTEBOOKS:
        info = instance.event_log_storage.get_concurrency_info(f"nbpipeline/{nb}")
        assert info.slot_count == 1
    steps = {k: round(e - s, 1) for k, (s, e, _) in sorted(windows.items())}
    print(f"\nparallel_notebooks: {wall:.1f}s wall; steps {steps}")


# Overlapping runs of both jobs (pools, tags, progress lines): test_overlap.py.
