"""A small run of `python -m nbpipeline.cli.loadtest`: the script behind the 20M-row and 20-runs
figures works end to end and its figures are real (runs on the instance, memory incl. the JVM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import psutil
import pytest

from nbpipeline.defs.tags import LOADTEST_TAG
from nbpipeline.local import engine

pytestmark = [pytest.mark.spark, pytest.mark.dagster, pytest.mark.slow]


def test_loadtest_smoke(spark, schema: str, instance: dg.DagsterInstance) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbpipeline.cli.loadtest",
            *("--rows", "300", "--runs", "1", "--series-rows", "300"),
            *("--changes", "0.1", "--schema", schema, "--json"),
        ],
        env={**os.environ, "DAGSTER_HOME": instance.root_directory},
        capture_output=True,
        text=True,
        timeout=1800,  # minutes on a busy shared machine; ~3 tiny runs otherwise
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and result["rows"] == 300
    runs = result["runs"]
    assert [(r["phase"], r["mode"]) for r in runs] == [
        ("volume", "sequential"),
        ("volume", "parallel"),
        ("series", "sequential"),
    ]
    jvm_mb = psutil.Process(engine.status()["pid"]).memory_info().rss / 2**20
    for run in runs:
        assert run["success"] and not run["failed_checks"] and run["wall_s"] > 0
        # Where the time went: every notebook step (its checks run inside it), each within the
        # run's wall.
        steps = run["steps_s"]
        assert {"Notebook1", "Notebook4"} <= set(steps), steps
        assert all(0 < s <= run["wall_s"] for s in steps.values()), (steps, run["wall_s"])
        # The engine JVM is counted: the peak is at least most of its resident size.
        assert run["peak_rss_mb"] > 0.5 * jvm_mb
        stored = instance.get_run_by_id(run["run_id"])
        assert stored.status == dg.DagsterRunStatus.SUCCESS
        assert stored.tags[LOADTEST_TAG] == run["phase"]
    assert result["peak_rss_mb"] == max(r["peak_rss_mb"] for r in runs)
    # The series run read the source after its change batch: 300 orders + 15 new ones.
    assert spark.table(f"{schema}.orders").count() == 315
    assert spark.table(f"{schema}.orders_load").count() == 300


def test_engine_errors_count_failures_not_detached_result_streams(tmp_path) -> None:
    from nbpipeline.perf.loadtest import engine_errors

    log = tmp_path / "server.log"
    log.write_text(
        "26/11/27 04:00:00 WARN HiveConf: before the run\n"
        "26/11/27 04:00:01 ERROR ErrorUtils: Spark Connect RPC error during: "
        "async-grpc-response-sender. UserId: . SessionId: s.\n"
        "org.apache.spark.SparkSQLException: [INVALID_CURSOR.DISCONNECTED] The cursor is invalid.\n"
        "26/11/27 04:00:02 ERROR Executor: Exception in task 3.0 in stage 7.0\n"
        "java.lang.OutOfMemoryError: Java heap space\n"
    )
    offset = len(log.read_text().splitlines(keepends=True)[0])
    assert engine_errors(log, offset) == [
        "26/11/27 04:00:02 ERROR Executor: Exception in task 3.0 in stage 7.0",
        "java.lang.OutOfMemoryError: Java heap space",
    ]
    assert engine_errors(tmp_path / "absent.log", 0) == []
