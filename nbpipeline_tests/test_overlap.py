"""Overlapping runs for real: both jobs launched at the same moment, five times over, plus a
scheduled tick fired by a real `dagster-daemon` during the manual runs, all on one instance and
one source. Every run must succeed (waiting its turn per table), no table may ever have two
writers at once, the outputs must meet the contract with no duplicate key, and, the source being
unchanged, only the first MERGE per table may change rows: the later ones commit zero-change
MERGEs and `_updated_at` does not move.

The five launches are rounds (the pair of a round starts together; the next round starts when
both have finished), so each round's steps contend for the pools as two users' runs would, without
ten runs' Python processes queueing for two cores; the rounds go on until the scheduled run has
been created, so the tick always lands among manual runs.
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

from nbpipeline.assets import SOURCE_VERSION_TAG
from nbpipeline.instance import WORKSPACE_YAML
from nbpipeline.schedules import PARALLEL_CRON_ENV, SOURCE_TABLE_ENV, TIMEZONE_ENV
from nbpipeline.settings import PROJECT_ROOT
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests.test_faults import assert_matches_contract, launch, stop_group, wait_for
from nbpipeline_tests.test_jobs import latest_version, step_windows

pytestmark = [pytest.mark.spark, pytest.mark.dagster, pytest.mark.slow]

ROWS = 400
ROUNDS = 5
MAX_ROUNDS = 12  # a daemon that never ticks fails the test instead of looping forever
# The tick's minute is at least this far ahead of the schedule's start, so the first round's runs
# exist before it (a daemon that starts late still launches the tick: Dagster catches up ticks
# since the schedule was started).
TICK_LEAD_S = 45
MODES = ("sequential", "parallel")
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


def test_both_jobs_five_times_over_and_a_scheduled_tick_overlap_safely(
    spark, schema, instance
) -> None:
    overlap_scenario(spark, schema, instance)


def overlap_scenario(spark: Any, schema: str, instance: dg.DagsterInstance) -> None:
    """The scenario on any instance (its DAGSTER_HOME is what the runs and the daemon use)."""
    from nbpipeline.seed import seed_orders

    source = f"{schema}.orders"
    seed_orders(spark, source, rows=ROWS, seed=13, dirty=True)
    source_version = str(latest_version(spark, source))
    home = Path(instance.root_directory)

    # A real tick: the daemon evaluates the schedule at a whole minute (a cron for that one
    # minute, so it fires once) and launches the run through the instance's run queue. The cron
    # is read when the daemon loads the definitions; `schedule start` only records the state.
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        TIMEZONE_ENV: "UTC",
        SOURCE_TABLE_ENV: source,
    }
    started = _dagster(["schedule", "start", SCHEDULE], env)
    out, _ = started.communicate(timeout=300)
    assert started.returncode == 0, out
    tick = _next_minute(at_least_s=TICK_LEAD_S)
    env[PARALLEL_CRON_ENV] = f"{tick.minute} {tick.hour} * * *"
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(WORKSPACE_YAML)],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # stopped as a group: it starts a code server of its own
    )

    def scheduled_run() -> dg.DagsterRun | None:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={SCHEDULE_TAG: SCHEDULE}))
        return runs[0] if runs else None

    rounds: list[dict[str, tuple[int, str, str]]] = []  # mode -> (returncode, stdout, stderr)
    try:
        t0 = time.monotonic()
        ticked = False
        while len(rounds) < MAX_ROUNDS and not (len(rounds) >= ROUNDS and ticked):
            # Seen before this round starts, so the scheduled run was created before the last
            # round's runs ended.
            ticked = scheduled_run() is not None
            procs = {mode: launch(mode, source, home) for mode in MODES}
            try:
                outs = {mode: proc.communicate(timeout=900) for mode, proc in procs.items()}
            finally:
                stop_group(list(procs.values()))
            rounds.append({m: (procs[m].returncode, *outs[m]) for m in MODES})
        manual_wall = time.monotonic() - t0
        scheduled = wait_for(
            lambda: (run := scheduled_run()) is not None and run.is_finished and run,
            "the scheduled run to finish",
            600,
            every=1,
        )
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)

    assert ticked, f"no scheduled run after {len(rounds)} rounds (tick at {tick:%H:%M} UTC)"
    run_ids = []
    for number, outcome in enumerate(rounds, 1):
        for mode, (returncode, stdout, stderr) in outcome.items():
            assert returncode == 0, (number, mode, stderr[-3000:])
            run_id = stdout.strip().splitlines()[-1]
            run_ids.append(run_id)
            # Progress was printed per step as the run went on.
            for nb in NOTEBOOKS:
                assert f"{nb}: started" in stderr and f"{nb}: succeeded" in stderr, stderr
            # ... and only those: no Dagster console lines from the step processes.
            assert " - DEBUG - " not in stderr, stderr[-3000:]
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
            assert run.job_name == f"{mode}_notebooks"
            assert run.tags["nbpipeline/mode"] == mode
            # Every run read the same, unchanged source: they pair up by this tag.
            assert run.tags[SOURCE_VERSION_TAG] == source_version
    assert scheduled.status == dg.DagsterRunStatus.SUCCESS, scheduled.run_id
    assert scheduled.job_name == "parallel_notebooks"
    assert scheduled.tags["nbpipeline/mode"] == "parallel"
    run_ids.append(scheduled.run_id)
    assert len(set(run_ids)) == 2 * len(rounds) + 1

    # The tick came while manual runs were going on (its run was created then; the run queue
    # may hold it until fewer than max_concurrent_runs are in progress), and no table ever had
    # two writers at once, within a round or across the scheduled run.
    windows = {run_id: step_windows(instance, run_id) for run_id in run_ids}
    manual = [w for run_id, w in windows.items() if run_id != scheduled.run_id]
    ticked_at = instance.get_run_record_by_id(scheduled.run_id).create_timestamp.timestamp()
    first = min(s for w in manual for s, _, _ in w.values())
    last = max(e for w in manual for _, e, _ in w.values())
    assert first < ticked_at < last, (first, ticked_at, last)
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
        assert len(merges) == 2 * len(rounds) + 1, table
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
    waits = sum(err.count("blocked by limit for pool") for r in rounds for _, _, err in r.values())
    print(  # noqa: T201 - figures for the closing note (pytest -s)
        f"\n{len(rounds)} rounds of both jobs + 1 scheduled tick: manual runs "
        f"{manual_wall:.1f}s wall, {waits} pool waits; tick at {tick:%H:%M} UTC"
    )
