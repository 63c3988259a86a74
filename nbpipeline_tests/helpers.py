"""Helpers shared by test modules (tests import from here, never from another test module).

Runs are launched with `nbpipeline run` in a child process, as a user starts them, so a test can
watch the run's event log and strike at a known moment. Faults are placed with *gates*: a test
copy of the notebooks (`NBPIPELINE_NOTEBOOKS_DIR`) in which a cell announces that it has been
reached and then holds the step until the test opens the gate, so a test never races a window.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from nbpipeline import settings
from nbpipeline_tests import contract_oracle as oracle

RUN_TIMEOUT_S = 900  # a busy shared machine slows engine starts and runs to minutes
GATE_TIMEOUT_S = 600  # a gate nobody opens fails the notebook instead of holding it forever
# Every JVM reads it; the suite sets its JVMs' JIT through it (docs/testing.md, "The JVMs' JIT").
JIT_ENV = "JAVA_TOOL_OPTIONS"
# The test run's own JVMs: compile only what stays hot for many tests, not each test's queries.
SUITE_JIT_OPTIONS = "-XX:CompileThresholdScaling=4"
# The engines a test starts and stops within a minute or two: C1 alone compiles Spark's hot code
# for a fraction of C2's CPU, and a JVM that short-lived never earns C2's compilation back.
SHORT_JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=240m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_version(spark: Any, table: str) -> int:
    return int(spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").collect()[0]["version"])


def launch(mode: str, source: str, dagster_home: Path, *args: str, **env: str):
    """`nbpipeline run MODE` in a child process (its own run worker, as a user starts it), in a
    process group of its own so `stop_group` can end it with its step processes."""
    return subprocess.Popen(
        [sys.executable, "-m", "nbpipeline.cli", "run", mode, "--source", source, *args],
        env={**os.environ, "DAGSTER_HOME": str(dagster_home), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_group(procs: list[subprocess.Popen[str]]) -> None:
    """End launched runs still going (a test that failed midway), step processes included."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def wait_for(
    predicate: Callable[[], Any], what: str, timeout_s: float = RUN_TIMEOUT_S, every: float = 0.05
) -> Any:
    """Poll until `predicate()` is truthy and return it; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def only_run(instance: dg.DagsterInstance) -> str | None:
    runs = instance.get_runs(limit=1)
    return runs[0].run_id if runs else None


def events(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType) -> list[Any]:
    return [
        e.dagster_event
        for e in instance.all_logs(run_id, of_type=kind)
        if e.dagster_event is not None
    ]


def step_pid(instance: dg.DagsterInstance, run_id: str, step: str) -> int | None:
    for event in events(instance, run_id, dg.DagsterEventType.STEP_START):
        if event.step_key == step:
            return event.pid
    return None


def pool_waits(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The steps of a run that waited for a table's pool (Dagster logs an engine event)."""
    return [
        e.step_key
        for e in events(instance, run_id, dg.DagsterEventType.ENGINE_EVENT)
        if (e.message or "").startswith("Step blocked by limit for pool")
    ]


def step_windows(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float, int]]:
    """step key -> (start, end, pid) from the run's event log."""
    starts: dict[str, tuple[float, int]] = {}
    windows: dict[str, tuple[float, float, int]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = (entry.timestamp, event.pid)
        elif event.event_type in (
            dg.DagsterEventType.STEP_SUCCESS,
            dg.DagsterEventType.STEP_FAILURE,
        ):
            start, pid = starts[event.step_key]
            windows[event.step_key] = (start, entry.timestamp, pid)
    return windows


def failure_text(event: Any) -> str:
    data = event.step_failure_data
    if data and data.user_failure_data and data.user_failure_data.description:
        return data.user_failure_data.description
    return event.message or ""


def materializations(result: Any) -> dict[str, dict[str, Any]]:
    """A run's materializations: {asset key: {metadata key: plain value}}."""
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        out[mat.asset_key.to_user_string()] = {
            k: getattr(v, "value", v) for k, v in mat.metadata.items()
        }
    return out


def collect(spark: Any, name: str) -> list[dict[str, Any]]:
    return [r.asDict() for r in spark.sql(f"SELECT * FROM {name}").collect()]


def assert_table_equal(name: str, got: dict, expected: dict) -> None:
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    detail = [f"missing {k}: expected {expected[k]}" for k in missing[:3]]
    detail += [f"unexpected {k}: {got[k]}" for k in extra[:3]]
    for k in wrong[:3]:
        diffs = {c: (got[k][c], expected[k][c]) for c in expected[k] if got[k][c] != expected[k][c]}
        detail.append(f"wrong {k}: (got, expected) {diffs}")
    assert not (missing or extra or wrong), (
        f"{name}: {len(missing)} missing, {len(extra)} unexpected, {len(wrong)} wrong rows\n"
        + "\n".join(detail)
    )
    # Exact types too: Decimal amounts (equal values of another type would hide a cast).
    for row in got.values():
        for column, value in row.items():
            kind = oracle.TABLE_TYPES[name][column]
            if value is None:
                continue
            if kind.startswith("decimal"):
                assert isinstance(value, Decimal) and value.as_tuple().exponent == -2, (
                    column,
                    value,
                )
            elif kind == "double":
                assert isinstance(value, float), (column, value)
        break


def assert_matches_contract(spark: Any, schema: str, source: str, tables: tuple[str, ...]) -> None:
    """Each table equals the oracle's computation from the source (no duplicate key)."""
    expected = oracle.expected(collect(spark, source))
    for table in tables:
        got = oracle.keyed(table, collect(spark, f"{schema}.{table}"))  # raises on a duplicate
        assert_table_equal(table, got, expected[table])


# --------------------------------------------------------------------------- notebook copies


def copy_notebooks(folder: Path) -> Path:
    """A test copy of the notebook folder, to be edited and used through NBPIPELINE_NOTEBOOKS_DIR."""
    folder.mkdir(parents=True)
    for path in settings.notebooks_dir().glob("*.py"):
        shutil.copy(path, folder / path.name)
    return folder


def insert_cell(notebook: Path, before: str, code: str) -> None:
    """Insert a cell holding `code` before the first line that starts with `before`."""
    import re

    text = notebook.read_text()
    found = re.search(rf"^{re.escape(before)}", text, re.M)
    assert found, f"{notebook.name} has no line starting with {before!r}: update the test"
    cell = code.rstrip("\n") + "\n\n# COMMAND ----------\n\n"
    notebook.write_text(text[: found.start()] + cell + text[found.start() :])


def gate_code(name: str, gates: Path) -> str:
    """A notebook cell that creates `gates/NAME.reached` and then waits for `gates/NAME.open`."""
    return (
        "import pathlib as _p, time as _t\n"
        f"_reached, _open = _p.Path({str(gates)!r}) / '{name}.reached', "
        f"_p.Path({str(gates)!r}) / '{name}.open'\n"
        "_reached.touch()\n"
        f"_until = _t.monotonic() + {GATE_TIMEOUT_S}\n"
        "while not _open.exists():\n"
        "    if _t.monotonic() > _until:\n"
        f"        raise TimeoutError('the test never opened gate {name}')\n"
        "    _t.sleep(0.1)\n"
    )


class Gates:
    """The test's side of the gates in a notebook copy: wait until reached, then open."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def reached(self, name: str) -> bool:
        return (self.folder / f"{name}.reached").exists()

    def wait_reached(
        self, *names: str, runs: list[subprocess.Popen[str]], timeout_s: float = RUN_TIMEOUT_S
    ) -> None:
        """Wait until every gate in `names` is reached; fail at once if a run in `runs` ends
        first (a notebook that failed before its gate), with the end of its error output."""

        def reached() -> bool:
            for proc in runs:
                if proc.poll() is not None:
                    missing = [n for n in names if not self.reached(n)]
                    _, err = proc.communicate()
                    raise AssertionError(
                        f"a run ended (exit {proc.returncode}) before gate(s) {missing} were "
                        f"reached:\n{err[-2000:]}"
                    )
            return all(self.reached(n) for n in names)

        wait_for(reached, f"gate(s) {', '.join(names)} to be reached", timeout_s)

    def open(self, *names: str) -> None:
        for name in names:
            (self.folder / f"{name}.open").touch()


# --------------------------------------------------------------------------- overlapping runs

OVERLAP_MODES = ("sequential", "parallel")
OVERLAP_SCHEDULE = "parallel_notebooks_schedule"
OVERLAP_NOTEBOOKS = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")
# The tick's minute is at least this far ahead of the schedule's start, so the daemon has loaded
# the definitions before it (a daemon that starts late still launches the tick, as Dagster catches
# up ticks since the schedule was started). The manual runs wait for the tick at their gates, so
# each second more is a second of every overlap test, spent idle.
TICK_LEAD_S = 25
TICK_WAIT_S = 300  # after the tick's minute: a daemon that never ticks fails the test


def _utc_now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC)


def _next_minute(at_least_s: float) -> Any:
    """The first whole UTC minute at least `at_least_s` from now."""
    import datetime as dt

    soon = _utc_now() + dt.timedelta(seconds=at_least_s)
    return soon.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)


def merge_history(spark: Any, table: str) -> list[dict[str, Any]]:
    rows = spark.sql(f"DESCRIBE HISTORY {table}").collect()
    return sorted(
        (r.asDict() for r in rows if r["operation"] == "MERGE"), key=lambda r: r["version"]
    )


def overlapping_runs_scenario(
    spark: Any, schema: str, instance: dg.DagsterInstance, work: Path
) -> dict[str, Any]:
    """Both jobs launched together plus a scheduled tick fired by a real `dagster-daemon` while
    they run, on one instance and one unchanged source: three runs at once. Asserts everything
    the overlap tests claim and returns figures.

    Contention and the tick's timing are made certain, not hoped for: Notebook1 (both jobs run
    it) holds at a gate until the other manual run's Notebook1 has been blocked by the table's
    pool and the tick has created its run; then the three runs go on together. Any instance
    storage works (SQLite, PostgreSQL)."""
    from nbpipeline.defs.schedules import PARALLEL_CRON_ENV, SOURCE_TABLE_ENV, TIMEZONE_ENV
    from nbpipeline.defs.tags import SOURCE_VERSION_TAG
    from nbpipeline.instance import WORKSPACE_YAML
    from nbpipeline.local.seed import seed_orders
    from nbpipeline.settings import PROJECT_ROOT
    from nbpipeline.tables import OUTPUT_TABLES

    source = f"{schema}.orders"
    seed_orders(spark, source, rows=400, seed=13, dirty=True)
    source_version = str(latest_version(spark, source))
    home = Path(instance.root_directory)
    gates = Gates(work / "gates")
    notebooks = copy_notebooks(work / "notebooks")
    insert_cell(notebooks / "Notebook1.py", "run.merge(", gate_code("Notebook1", gates.folder))
    run_env = {"NBPIPELINE_NOTEBOOKS_DIR": str(notebooks)}

    # A real tick: the daemon evaluates the schedule at a whole minute (a cron for that one
    # minute, so it fires once) and launches the run through the instance's run queue. The cron
    # is read when the daemon loads the definitions; `schedule start` only records the state.
    env = {
        **os.environ,
        **run_env,
        "DAGSTER_HOME": str(home),
        TIMEZONE_ENV: "UTC",
        SOURCE_TABLE_ENV: source,
    }
    dagster_cli = [sys.executable, "-m", "dagster"]
    started = subprocess.run(
        [*dagster_cli, "schedule", "start", OVERLAP_SCHEDULE, "-w", str(WORKSPACE_YAML)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert started.returncode == 0, started.stdout + started.stderr
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
        runs = instance.get_runs(
            filters=dg.RunsFilter(tags={"dagster/schedule_name": OVERLAP_SCHEDULE})
        )
        return runs[0] if runs else None

    def blocked_on_notebook1() -> list[str]:  # manual runs only (the tick may come early)
        return [
            r.run_id
            for r in instance.get_runs()
            if "dagster/schedule_name" not in r.tags
            and "Notebook1" in pool_waits(instance, r.run_id)
        ]

    try:
        t0 = time.monotonic()
        procs = {mode: launch(mode, source, home, **run_env) for mode in OVERLAP_MODES}
        try:
            gates.wait_reached("Notebook1", runs=list(procs.values()))
            waited = wait_for(
                blocked_on_notebook1, "a run's Notebook1 to wait for the table's pool"
            )
            # The tick comes while both manual runs are held: its run is created during theirs.
            wait_for(
                scheduled_run,
                f"the schedule's tick at {tick:%H:%M} UTC to create a run",
                max(0.0, (tick - _utc_now()).total_seconds()) + TICK_WAIT_S,
                every=1,
            )
            gates.open("Notebook1")
            outs = {mode: proc.communicate(timeout=RUN_TIMEOUT_S) for mode, proc in procs.items()}
        finally:
            gates.open("Notebook1")
            stop_group(list(procs.values()))
        outcome = {m: (procs[m].returncode, *outs[m]) for m in OVERLAP_MODES}
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

    run_ids = []
    for mode, (returncode, stdout, stderr) in outcome.items():
        assert returncode == 0, (mode, stderr[-3000:])
        run_id = stdout.strip().splitlines()[-1]
        run_ids.append(run_id)
        # Progress was printed per step as the run went on.
        for nb in OVERLAP_NOTEBOOKS:
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
    assert len(set(run_ids)) == len(OVERLAP_MODES) + 1
    # The manual runs contended for Notebook1's table, and the waiting run said so.
    assert set(waited) <= set(run_ids[:2]), waited
    manual_err = "".join(err for _, _, err in outcome.values())
    assert "blocked by limit for pool nbpipeline/Notebook1" in manual_err

    # The tick came while the manual runs were going on (its run was created then; the run
    # queue may hold it until fewer than max_concurrent_runs are in progress), and no table ever
    # had two writers at once, among the manual runs or with the scheduled run.
    windows = {run_id: step_windows(instance, run_id) for run_id in run_ids}
    manual = [w for run_id, w in windows.items() if run_id != scheduled.run_id]
    ticked_at = instance.get_run_record_by_id(scheduled.run_id).create_timestamp.timestamp()
    first = min(s for w in manual for s, _, _ in w.values())
    last = max(e for w in manual for _, e, _ in w.values())
    assert first < ticked_at < last, (first, ticked_at, last)
    for nb in OVERLAP_NOTEBOOKS:
        spans = sorted((w[nb][0], w[nb][1]) for w in windows.values())
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"two runs ran {nb} at once"

    # The contract, with no duplicate key (keyed() raises on one).
    assert_matches_contract(spark, schema, source, tuple(OUTPUT_TABLES))
    # Idempotence: the source never changed, so after the first MERGE every MERGE of every
    # run changed nothing, and every row keeps the first run's _updated_at.
    for table in OUTPUT_TABLES:
        merges = merge_history(spark, f"{schema}.{table}")
        assert len(merges) == len(run_ids), table
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
    return {
        "manual_wall_s": round(manual_wall, 1),
        "pool_waits": manual_err.count("blocked by limit for pool"),
        "tick": f"{tick:%H:%M} UTC",
    }


# --------------------------------------------------------------------------- pool claims

POOL = "nbpipeline/test_pool"
CLAIMERS = 8
PLAIN_YAML = "concurrency:\n  pools:\n    default_limit: 1\n    granularity: op\n"


def _claim(home: str, barrier: Any, results: Any) -> None:
    os.environ["DAGSTER_HOME"] = home
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        barrier.wait()
        status = storage.claim_concurrency_slot(POOL, uuid.uuid4().hex, "Notebook1")
        results.put(status.is_claimed)


def claimed_together(home: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many of CLAIMERS processes, released together, got the pool's single slot."""
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.initialize_concurrency_limit_to_default(POOL)
        assert instance.event_log_storage.get_concurrency_info(POOL).slot_count == 1
    ctx = mp.get_context("fork")  # dagster is imported already: the claimers start at once
    return _claims_won(ctx, CLAIMERS, _claim, str(home), ctx.Barrier(CLAIMERS))


def _claims_won(ctx: Any, claimers: int, claim: Callable[..., None], *args: Any) -> int:
    """Run `claimers` processes of `claim(*args, results)`; how many got the slot."""
    results = ctx.Queue()
    procs = [ctx.Process(target=claim, args=(*args, results)) for _ in range(claimers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    return sum(results.get(timeout=10) for _ in procs)


#: The statements of dagster-postgres's claim at which the lockstep claimers meet: both have
#: seen a free slot before either records its step, and both have selected the free slot row
#: before either takes it.
LOCKSTEP_STATEMENTS = ("INSERT INTO pending_steps", "UPDATE concurrency_slots")
LOCKSTEP_WAIT_S = 20.0


def _claim_in_lockstep(home: str, barriers: dict[str, Any], results: Any) -> None:
    import sqlalchemy as db

    os.environ["DAGSTER_HOME"] = home
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage

        def meet(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            for prefix, barrier in barriers.items():
                if statement.lstrip().startswith(prefix):
                    with contextlib.suppress(threading.BrokenBarrierError):
                        barrier.wait(timeout=LOCKSTEP_WAIT_S)

        db.event.listen(storage._engine, "before_cursor_execute", meet)
        status = storage.claim_concurrency_slot(POOL, uuid.uuid4().hex, "Notebook1")
        results.put(status.is_claimed)


def claimed_in_lockstep(home: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many of two claimers got the pool's single slot when each statement of one claim
    is made to run beside the other's (LOCKSTEP_STATEMENTS), not left to timing. A claim that
    holds its row lock through the update keeps the second claimer from its update: then the
    first waits LOCKSTEP_WAIT_S in vain and one claim wins."""
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.initialize_concurrency_limit_to_default(POOL)
    ctx = mp.get_context("fork")
    barriers = {statement: ctx.Barrier(2) for statement in LOCKSTEP_STATEMENTS}
    return _claims_won(ctx, 2, _claim_in_lockstep, str(home), barriers)


def release_hands_the_slot_to_one(storage: Any) -> list[Any]:
    """With CLAIMERS steps on the pool and one holding its slot: freeing the slot (a step ends)
    assigns it to exactly one waiting step, which then claims it. Returns the waiting steps."""
    info = storage.get_concurrency_info(POOL)
    (holder,) = info.claimed_slots
    assert len(info.pending_steps) == CLAIMERS
    storage.free_concurrency_slot_for_step(holder.run_id, holder.step_key)
    waiting = list(storage.get_concurrency_info(POOL).pending_steps)
    assert len(waiting) == CLAIMERS - 1
    assigned = [p for p in waiting if p.assigned_timestamp is not None]
    assert len(assigned) == 1
    assert storage.claim_concurrency_slot(POOL, assigned[0].run_id, "Notebook1").is_claimed
    return waiting


#: Spark's own defaults of the settings NBPIPELINE_ENGINE_CODEGEN=off changes (the tests' engine
#: runs with it off; a user's engine runs with these).
CODEGEN_ON = {"spark.sql.codegen.wholeStage": "true", "spark.sql.codegen.factoryMode": "FALLBACK"}


@contextlib.contextmanager
def generated_code(spark) -> Iterator[None]:
    """The Spark session `spark` with generated code on while the block runs."""
    from nbpipeline.local.engine import NO_CODEGEN_CONF

    assert set(CODEGEN_ON) == set(NO_CODEGEN_CONF)
    saved = {k: spark.conf.get(k) for k in CODEGEN_ON}
    for key, value in CODEGEN_ON.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            spark.conf.set(key, value)
