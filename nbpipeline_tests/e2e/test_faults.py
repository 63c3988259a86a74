"""Real faults on a real run: a step process SIGKILLed mid-MERGE, a notebook raising in the
parallel job, the engine JVM killed under a run, and bounded retries of transient failures.

The engine-kill test kills an engine, so it runs on an engine of its own (own NBPIPELINE_HOME and
port, 1 GiB), never the session engine other modules share; the SIGKILL test kills a step process
only and runs on the session engine. Runs are launched
with `nbpipeline run` in a child process, as a user would, so the test process can watch the
run's event log and the tables' folders and strike at the right moment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from nbpipeline import settings
from nbpipeline.defs.assets import ALL_ASSETS, STEP_RETRY_POLICY, is_transient, op_config
from nbpipeline.local import engine, seed
from nbpipeline.local.runtime import run_notebook
from nbpipeline_tests.fakes.backend import CALLS, FakeBackend
from nbpipeline_tests.helpers import (
    JIT_ENV,
    RUN_TIMEOUT_S,
    SHORT_JVM_OPTIONS,
    Gates,
    assert_matches_contract,
    copy_notebooks,
    events,
    failure_text,
    free_port,
    gate_code,
    insert_cell,
    latest_version,
    launch,
    only_run,
    step_pid,
    stop_group,
    wait_for,
)

__all__ = ["launch", "stop_group", "wait_for", "assert_matches_contract"]

ROWS = 1000
NOTEBOOKS = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")
TABLES = ("daily_sales", "customer_summary", "product_performance", "order_facts")


@pytest.fixture
def own_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private home and engine for one test; the session's env is restored afterwards. Its
    JVMs (the first and the one the next run starts) live a minute each: C1-only JIT."""
    keys = ("NBPIPELINE_HOME", "NBPIPELINE_ENGINE_PORT", "NBPIPELINE_ENGINE_MEMORY")
    saved = {k: os.environ.get(k) for k in (*keys, JIT_ENV, "NBPIPELINE_SPARK_REMOTE")}
    home = tmp_path_factory.mktemp("faults_home")
    os.environ.update(
        NBPIPELINE_HOME=str(home),
        NBPIPELINE_ENGINE_PORT=str(free_port()),
        NBPIPELINE_ENGINE_MEMORY="1g",
        **{JIT_ENV: SHORT_JVM_OPTIONS},
    )
    os.environ.pop("NBPIPELINE_SPARK_REMOTE", None)
    try:
        engine.get_spark()
        yield home
    finally:
        engine.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fresh_source(rows: int = ROWS) -> tuple[Any, str, str]:
    """A new schema on the current engine with a dirty seeded source; (spark, schema, source)."""
    spark = engine.get_spark()
    schema = f"faults_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE SCHEMA {schema}")
    source = f"{schema}.orders"
    seed.seed_orders(spark, source, rows=rows, seed=31, dirty=True)
    return spark, schema, source


def commit_files(folder: Path) -> list[str]:
    """A Delta table's commit files, read from disk (no engine involved)."""
    return sorted(p.name for p in (folder / "_delta_log").glob("*.json"))


def table_dir(spark: Any, table: str) -> Path:
    location = spark.sql(f"DESCRIBE DETAIL {table}").collect()[0]["location"]
    return Path(location.removeprefix("file:"))


def broken_notebooks(folder: Path, gates: Path) -> Path:
    """A copy of the notebooks in which Notebook2 has a bug (a query on a column that does not
    exist, in a cell of its own before its MERGE) and Notebook4's MERGE into order_facts is held
    mid-statement: its source goes through a Python UDF that, inside the engine's executor,
    marks gate `merge` reached and waits until the test opens it."""
    copy_notebooks(folder)
    insert_cell(
        folder / "Notebook2.py",
        "# An order with a NULL category",
        'spark.sql(f"SELECT no_such_column FROM {run.clean_view}").collect()',
    )
    nb4 = folder / "Notebook4.py"
    hold = gate_code("merge", gates).replace("\n", "\n    ")
    insert_cell(
        nb4,
        "facts = run.merge(",
        f"def _hold(order_id):\n    {hold}return True\n\n"
        'spark.udf.register("nbp_test_hold", _hold, "boolean")\n'
        'spark.sql(f"CREATE OR REPLACE TEMP VIEW nbp_test_held AS "\n'
        '          f"SELECT * FROM {run.clean_view} WHERE nbp_test_hold(order_id)")',
    )
    text = nb4.read_text()
    facts_source = (
        '        FROM {run.clean_view}\n    """,\n    amounts=["gross_amount", "net_amount"],'
    )
    assert facts_source in text, "Notebook4's order_facts MERGE changed: update the test"
    nb4.write_text(
        text.replace(facts_source, facts_source.replace("{run.clean_view}", "nbp_test_held"), 1)
    )
    return folder


@pytest.mark.spark
@pytest.mark.dagster
@pytest.mark.slow
def test_sigkill_mid_merge_and_raising_notebook_then_reexecute_from_failure(
    spark, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """One parallel run, two faults: Notebook2 raises in a cell, and Notebook4's step process is
    SIGKILLed while its MERGE into order_facts executes in the engine (held there, in a test copy
    of the notebook, by a gate inside the MERGE's source, so the kill never races a window).

    Right after the kill nothing new is committed to either table; once the gate opens, the
    orphaned MERGE commits whole or not at all (Spark Connect may finish a submitted statement
    whose client died; a Delta commit is atomic). Dagster retries the crashed step (retry policy), which completes
    Notebook4; Notebook1 and 3 commit; the run fails on Notebook2 alone, with notebook, cell and
    error in one line. After the bug is fixed, "re-execute from failure" reruns Notebook2 only
    and every table meets the contract. The held MERGE occupies one task slot of the session
    engine for a moment; other tests' queries share the other.
    """
    spark, schema, source = fresh_source()
    # A previous state for Notebook4's tables, then a change batch so its MERGE has work to do.
    run_notebook(settings.notebooks_dir() / "Notebook4.py", {"source_table": source}, spark=spark)
    seed.apply_changes(spark, source, fraction=0.3, seed=7)
    facts, hv = f"{schema}.order_facts", f"{schema}.high_value_orders"
    before = {t: latest_version(spark, t) for t in (facts, hv)}
    hv_rows = spark.table(hv).count()
    facts_dir, hv_dir = table_dir(spark, facts), table_dir(spark, hv)
    commits = {facts: commit_files(facts_dir), hv: commit_files(hv_dir)}

    home = Path(instance.root_directory)
    gates = Gates(tmp_path / "gates")
    nb_dir = broken_notebooks(tmp_path / "notebooks", gates.folder)
    proc = launch("parallel", source, home, NBPIPELINE_NOTEBOOKS_DIR=str(nb_dir))
    try:
        run_id = wait_for(lambda: only_run(instance), "the run to be created", every=0.2)
        # The MERGE into order_facts is executing in the engine and held there by the gate.
        gates.wait_reached("merge", runs=[proc])
        pid = step_pid(instance, run_id, "Notebook4")
        assert pid, "Notebook4's MERGE runs but its step has no STEP_START event"
        os.kill(pid, signal.SIGKILL)
        # Read from disk, before the held MERGE may go on: nothing was committed meanwhile.
        assert commit_files(facts_dir) == commits[facts]
        assert commit_files(hv_dir) == commits[hv]
        gates.open("merge")  # the orphaned MERGE may now finish (or be dropped); so may the retry
        # Both tables' current versions read whole (the retry may have committed a new one).
        assert spark.sql(f"SELECT * FROM {hv} VERSION AS OF {before[hv]}").count() == hv_rows
        spark.sql(f"SELECT * FROM {facts}").collect()
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        gates.open("merge")
        stop_group([proc])
    assert proc.returncode == 1, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == run_id
    run = instance.get_run_by_id(run_id)
    assert run.status == dg.DagsterRunStatus.FAILURE
    engine_events = [
        e.message or "" for e in events(instance, run_id, dg.DagsterEventType.ENGINE_EVENT)
    ]
    assert any(
        "child process for step Notebook4 was terminated by signal 9 (SIGKILL)" in m
        for m in engine_events
    ), engine_events
    retried = {e.step_key for e in events(instance, run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY)}
    assert retried == {"Notebook4"}  # the crash was retried; the notebook error was not
    succeeded = {e.step_key for e in events(instance, run_id, dg.DagsterEventType.STEP_SUCCESS)}
    assert {"Notebook1", "Notebook3", "Notebook4"} <= succeeded
    failures = {
        e.step_key: failure_text(e)
        for e in events(instance, run_id, dg.DagsterEventType.STEP_FAILURE)
    }
    assert set(failures) == {"Notebook2"}, failures
    # The raising notebook: notebook, cell and error, in one line, no JVM frames.
    nb2 = failures["Notebook2"]
    assert re.search(r"Notebook2\.py, cell \d+: AnalysisException", nb2), nb2
    assert "no_such_column" in nb2
    assert "\n" not in nb2 and "JVM" not in nb2
    assert stderr.strip().splitlines()[-1].startswith("error: step Notebook2 failed: Notebook2")
    mats = {
        e.event_specific_data.materialization.asset_key.to_user_string()
        for e in events(instance, run_id, dg.DagsterEventType.ASSET_MATERIALIZATION)
    }
    assert mats == {"daily_sales", "product_performance", "order_facts", "high_value_orders"}
    assert not spark.catalog.tableExists(f"{schema}.customer_summary")
    # Every commit since is a whole MERGE and readable: the orphan (if it landed) and the retry.
    for row in spark.sql(f"DESCRIBE HISTORY {facts}").collect():
        assert row["version"] <= before[facts] or row["operation"] == "MERGE"
        spark.sql(f"SELECT * FROM {facts} VERSION AS OF {row['version']}").collect()
    assert latest_version(spark, hv) == before[hv] + 1
    orphan = latest_version(spark, facts) - before[facts] - 1  # 1: the orphan landed too
    assert orphan in (0, 1)
    assert_matches_contract(
        spark,
        schema,
        source,
        ("daily_sales", "product_performance", "order_facts", "high_value_orders"),
    )

    # Fix the bug (the real notebooks again) and re-execute from failure. In a fresh process, as
    # a user would: step processes fork from a server that keeps the environment of whoever
    # started it first in this pytest process (another test's engine, maybe).
    script = (
        "import sys, dagster as dg\n"
        "from nbpipeline import definitions\n"
        "instance = dg.DagsterInstance.get()\n"
        "with dg.execute_job(dg.reconstructable(definitions.parallel_notebooks_job), "
        "instance=instance, reexecution_options=dg.ReexecutionOptions.from_failure("
        f"{run_id!r}, instance)) as result:\n"
        "    print(result.run_id)\n"
        "    sys.exit(0 if result.success else 1)\n"
    )
    rerun = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rerun_id = rerun.stdout.strip().splitlines()[-1]
    rerun_steps = {e.step_key for e in events(instance, rerun_id, dg.DagsterEventType.STEP_START)}
    rerun_mats = {
        e.event_specific_data.materialization.asset_key.to_user_string()
        for e in events(instance, rerun_id, dg.DagsterEventType.ASSET_MATERIALIZATION)
    }
    assert "Notebook2" in rerun_steps
    assert not {"Notebook1", "Notebook3", "Notebook4"} & rerun_steps
    assert rerun_mats == {"customer_summary"}
    assert_matches_contract(spark, schema, source, (*TABLES, "high_value_orders"))
    print(
        f"\nSIGKILL mid-MERGE: orphaned order_facts MERGE "
        f"{'committed whole' if orphan else 'never committed'}; the crashed step was retried"
    )


@pytest.mark.spark
@pytest.mark.dagster
@pytest.mark.slow
def test_engine_killed_under_a_run_fails_it_clearly_and_the_next_run_restarts_it(
    own_engine: Path, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Kill the engine JVM while the parallel job's notebooks run: the run fails saying the
    engine went away (no retry loop); the next run starts the engine again and succeeds; no
    table is corrupt. It replaces its own engine.

    The strike is placed with gates: in a test copy of the notebooks each one stops before its
    first MERGE, so all four are known to be at work (their sessions open) when the JVM dies."""
    spark, schema, source = fresh_source(rows=600)
    home = Path(instance.root_directory)
    state_file = own_engine / "engine" / "server.json"
    old_pid = json.loads(state_file.read_text())["pid"]
    gates = Gates(tmp_path / "gates")
    nb_dir = copy_notebooks(tmp_path / "notebooks")
    for nb in NOTEBOOKS:
        anchor = "facts = run.merge(" if nb == "Notebook4" else "run.merge("
        insert_cell(nb_dir / f"{nb}.py", anchor, gate_code(nb, gates.folder))

    proc = launch("parallel", source, home, NBPIPELINE_NOTEBOOKS_DIR=str(nb_dir))
    try:
        wait_for(lambda: only_run(instance), "the run to be created", every=0.2)
        run_id = only_run(instance)
        gates.wait_reached(*NOTEBOOKS, runs=[proc])
        os.killpg(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: not engine.engine_alive(old_pid), "the engine process to end", 60)
        gates.open(*NOTEBOOKS)
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        gates.open(*NOTEBOOKS)
        stop_group([proc])
    assert proc.returncode == 1, stderr[-3000:]
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: step Notebook") and "the local engine went away" in error
    assert "nbpipeline engine start" in error
    failures = {
        e.step_key: failure_text(e)
        for e in events(instance, run_id, dg.DagsterEventType.STEP_FAILURE)
    }
    assert failures, "no step failed"
    for step, text in failures.items():
        assert text.startswith(f"{step}: "), text
        assert f"the local engine went away (process {old_pid} ended" in text, text
        assert "\n" not in text
    # Not retried: a killed engine is reported, not restarted behind the user's back.
    assert not events(instance, run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY)
    fail_seconds = time.monotonic() - killed_at

    # The next run starts the engine again and succeeds.
    started = time.monotonic()
    proc = launch("parallel", source, home)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop_group([proc])
    assert proc.returncode == 0, stderr[-3000:]
    new_pid = json.loads(state_file.read_text())["pid"]
    assert new_pid != old_pid and engine.engine_alive(new_pid)
    spark = engine.get_spark()  # the old session died with the old engine
    for table in (*TABLES, "high_value_orders"):
        # Every version in the history is readable (none half-written).
        for row in spark.sql(f"DESCRIBE HISTORY {schema}.{table}").collect():
            version = row["version"]
            spark.sql(f"SELECT * FROM {schema}.{table} VERSION AS OF {version}").collect()
    assert_matches_contract(spark, schema, source, (*TABLES, "high_value_orders"))
    print(
        f"\nengine kill: run failed {fail_seconds:.1f}s after the kill; "
        f"next run (engine restart included) {time.monotonic() - started:.1f}s"
    )


# --------------------------------------------------------------------------- retries


def _materialize_notebook1(backend: FakeBackend) -> tuple[dg.ExecuteInProcessResult, list[str]]:
    """Materialize daily_sales through `backend`; the result and the run's log messages."""
    CALLS.clear()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=dg.AssetSelection.assets("daily_sales"),
        resources={"notebook_backend": backend},
        run_config={"ops": op_config({"source_table": "s.orders"}, notebooks=("Notebook1",))},
        instance=instance,
        raise_on_error=False,
    )
    return result, [e.user_message for e in instance.all_logs(result.run_id)]


@pytest.mark.slow
@pytest.mark.dagster
def test_transient_failures_are_retried_a_bounded_number_of_times_with_the_reason_logged() -> None:
    """A connection loss that never heals: 1 + 3 attempts (the real policy: ~14 s of backoff),
    each with its reason in the run log, then the step fails."""
    result, log = _materialize_notebook1(FakeBackend(flaky=99))
    assert not result.success
    assert CALLS["Notebook1"] == 1 + STEP_RETRY_POLICY.max_retries
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == STEP_RETRY_POLICY.max_retries
    lines = [m for m in log if "transient failure" in m]
    assert len(lines) == 1 + STEP_RETRY_POLICY.max_retries
    assert "attempt 1 (retrying): cannot connect to the Spark engine" in lines[0]
    assert "UNAVAILABLE" in lines[0]
    assert "attempt 4 (no retries left)" in lines[-1]


def test_engine_gone_message_keeps_the_grpc_status_not_the_wrapper() -> None:
    raw = (
        "notebooks/Notebook1.py, cell 4: SparkConnectGrpcException: <_MultiThreadedRendezvous of "
        'RPC that terminated with:\n\tstatus = StatusCode.UNAVAILABLE\n\tdetails = "failed to '
        'connect to all addresses; last error: Connection refused"\n\tdebug_error_string = "x"\n>'
    )
    error = engine.went_away(4242, "Notebook1", RuntimeError(raw))
    assert not is_transient(error)
    assert str(error).startswith(
        "Notebook1: the local engine went away (process 4242 ended; client saw: UNAVAILABLE: "
        "failed to connect to all addresses; last error: Connection refused) (hint: the next "
        "run starts it again"
    )
    assert "\n" not in str(error)
