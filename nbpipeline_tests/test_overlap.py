"""Overlapping runs for real: five pairs of both jobs launched at the same moment, plus a
scheduled tick fired by a real `dagster-daemon` while they run, all on one instance and one
source. Every run must succeed (waiting its turn per table), the outputs must meet the contract
with no duplicate key, and, the source being unchanged, only the first MERGE per table may
change rows: the later ones commit zero-change MERGEs and `_updated_at` does not move.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from nbpipeline.instance import WORKSPACE_YAML
from nbpipeline.schedules import PARALLEL_CRON_ENV, SOURCE_TABLE_ENV, TIMEZONE_ENV
from nbpipeline.settings import PROJECT_ROOT
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests.test_faults import assert_matches_contract, launch, stop_group, wait_for
from nbpipeline_tests.test_jobs import step_windows

pytestmark = [pytest.mark.spark, pytest.mark.dagster, pytest.mark.slow]

ROWS = 400
PAIRS = 5
SCHEDULE = "parallel_notebooks_schedule"
SCHEDULE_TAG = "dagster/schedule_name"
NOTEBOOKS = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")


def _next_minute(at_least_s: float) -> dt.datetime:
    """The first whole UTC minute at least `at_least_s` from now."""
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=at_least_s)
    return soon.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)


def _dagster(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dagster", *args, "-w", str(WORKSPACE_YAML)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def merge_history(spark: Any, table: str) -> list[dict[str, Any]]:
    rows = spark.sql(f"DESCRIBE HISTORY {table}").collect()
    return sorted(
        (r.asDict() for r in rows if r["operation"] == "MERGE"), key=lambda r: r["version"]
    )


def test_five_pairs_and_a_scheduled_tick_overlap_safely(spark, schema, instance) -> None:
    from nbpipeline.seed import seed_orders

    source = f"{schema}.orders"
    seed_orders(spark, source, rows=ROWS, seed=13, dirty=True)
    home = Path(instance.root_directory)

    # A real tick: the daemon evaluates the schedule at a whole minute (a cron for that one
    # minute, so it fires once) and launches the run through the instance's run queue.
    tick = _next_minute(at_least_s=90)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        PARALLEL_CRON_ENV: f"{tick.minute} {tick.hour} * * *",
        TIMEZONE_ENV: "UTC",
        SOURCE_TABLE_ENV: source,
    }
    started = _dagster(["schedule", "start", SCHEDULE], env)
    out, _ = started.communicate(timeout=180)
    assert started.returncode == 0, out
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(WORKSPACE_YAML)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # stopped as a group: it starts a code server of its own
    )
    try:
        t0 = time.monotonic()
        procs = [
            launch(mode, source, home) for _ in range(PAIRS) for mode in ("sequential", "parallel")
        ]
        try:
            outputs = [p.communicate(timeout=1200) for p in procs]
        finally:
            stop_group(procs)
        manual_wall = time.monotonic() - t0

        def scheduled_done() -> dg.DagsterRun | None:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={SCHEDULE_TAG: SCHEDULE}))
            return runs[0] if runs and runs[0].is_finished else None

        scheduled = wait_for(scheduled_done, "the scheduled run to finish", 600, every=1)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)

    run_ids = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        run_ids.append(stdout.strip().splitlines()[-1])
    assert scheduled.status == dg.DagsterRunStatus.SUCCESS, scheduled.run_id
    assert scheduled.job_name == "parallel_notebooks"
    assert scheduled.tags["nbpipeline/mode"] == "parallel"
    run_ids.append(scheduled.run_id)
    assert len(set(run_ids)) == 2 * PAIRS + 1

    # The tick came while manual runs were going on (its run was created then; the run queue
    # may hold it until fewer than max_concurrent_runs are in progress), and no table ever had
    # two writers at once.
    windows = {run_id: step_windows(instance, run_id) for run_id in run_ids}
    manual = [w for run_id, w in windows.items() if run_id != scheduled.run_id]
    ticked = instance.get_run_record_by_id(scheduled.run_id).create_timestamp.timestamp()
    first = min(s for w in manual for s, _, _ in w.values())
    last = max(e for w in manual for _, e, _ in w.values())
    assert first < ticked < last, (first, ticked, last)
    for nb in NOTEBOOKS:
        spans = sorted((w[nb][0], w[nb][1]) for w in windows.values())
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"two runs ran {nb} at once"

    # The contract, with no duplicate key (keyed() raises on one).
    assert_matches_contract(spark, schema, source, tuple(OUTPUT_TABLES))
    # Idempotence: the source never changed, so after the first MERGE every MERGE of every
    # run changed nothing, and every row keeps the first run's _updated_at.
    for table in OUTPUT_TABLES:
        merges = merge_history(spark, f"{schema}.{table}")
        assert len(merges) == 2 * PAIRS + 1, table
        for later in merges[1:]:
            metrics = later["operationMetrics"]
            changed = [
                metrics[k]
                for k in ("numTargetRowsInserted", "numTargetRowsUpdated", "numTargetRowsDeleted")
            ]
            assert changed == ["0", "0", "0"], (table, later["version"], metrics)
        stamps = spark.sql(
            f"SELECT COUNT(DISTINCT _updated_at) AS n FROM {schema}.{table}"
        ).collect()[0]["n"]
        assert stamps == 1, table
    waits = "".join(err for _, err in outputs).count("blocked by limit for pool")
    print(  # noqa: T201 - figures for the closing note (pytest -s)
        f"\n{PAIRS} pairs + 1 scheduled tick: manual runs {manual_wall:.1f}s wall, "
        f"{waits} pool waits; tick at {tick:%H:%M} UTC"
    )
