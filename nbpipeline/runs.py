"""Running the pipeline's Dagster jobs in this process: run config, launch, progress, result.

Used by `nbpipeline run`, the bench and the load test. A job runs against the same Dagster
instance the UI reads; its step events are printed as they happen by a second thread reading the
instance's event log, since the job runs in the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nbpipeline.defs.tags import LAUNCH_TAG, LAUNCHED_BY_TAG
from nbpipeline.errors import ConfigError
from nbpipeline.progress import progress

if TYPE_CHECKING:
    import dagster as dg

#: Rows seeded when `nbpipeline run` finds no source table yet: enough for the notebooks to do
#: real work, small enough for a laptop's first run (NBPIPELINE_FIRST_RUN_ROWS overrides).
FIRST_RUN_ROWS = 100_000
FIRST_RUN_ROWS_ENV = "NBPIPELINE_FIRST_RUN_ROWS"
_POLL_SECONDS = 0.5


def build_run_config(
    mode: str,
    *,
    source: str | None = None,
    params: dict[str, str] | None = None,
    max_concurrent: int | None = None,
    timeout_seconds: int | None = None,
) -> dict[str, Any]:
    """Run config for `mode` from CLI options; bad or unknown values raise ConfigError."""
    from nbpipeline.defs.assets import op_config
    from nbpipeline.defs.jobs import parallel_execution_config

    params = dict(params or {})
    if source is not None:
        if "source_table" in params and params["source_table"] != source:
            raise ConfigError("--source and --param source_table= disagree; give one of them")
        params["source_table"] = source
    if timeout_seconds is not None and timeout_seconds <= 0:
        raise ConfigError(f"invalid --timeout {timeout_seconds}: expected seconds > 0")
    run_config: dict[str, Any] = {"ops": op_config(params, timeout_seconds=timeout_seconds)}
    if max_concurrent is not None:
        if mode != "parallel":
            raise ConfigError("--max-concurrent applies to `nbpipeline run parallel` only")
        if max_concurrent < 1:
            raise ConfigError(f"invalid --max-concurrent {max_concurrent}: expected N >= 1")
    if mode == "parallel":
        # Spelled out, not left to the job's default: a subset of the job (an op selection, a
        # re-execution of some steps) drops the job's default config, and the multiprocess
        # executor then runs as many steps as there are cores (2 here) with `spawn`.
        run_config["execution"] = parallel_execution_config(max_concurrent)
    return run_config


def first_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def step_error(event: dg.DagsterEvent) -> str:
    """The one-line reason of a STEP_FAILURE event (a dg.Failure's description if it has one)."""
    data = event.step_failure_data
    if data is None:
        return first_line(event.message)
    if data.user_failure_data is not None and data.user_failure_data.description:
        return first_line(data.user_failure_data.description)
    error = data.error
    # Errors raised in the step are wrapped ("Error occurred while executing op ..."): the
    # user's exception is the cause.
    while error is not None and error.cause is not None and "Error occurred while" in error.message:
        error = error.cause
    return first_line(error.message if error is not None else event.message)


class ProgressPrinter(threading.Thread):
    """Prints a run's step events from the instance's event log while the run executes.

    The run is found by its launch tag (the run id is only known once `execute_job` created it).
    """

    def __init__(self, launch_id: str, out: Callable[[str], None] = progress) -> None:
        super().__init__(name="nbpipeline-progress", daemon=True)
        self.launch_id = launch_id
        self.out = out
        self.run_id: str | None = None
        self._cursor: str | None = None
        self._done = threading.Event()
        self._t0 = time.monotonic()
        self._step_started: dict[str, float] = {}
        self._hinted = False

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)

    def run(self) -> None:
        import dagster as dg

        # Its own instance object: storage connections are not shared across threads.
        instance = dg.DagsterInstance.get()
        try:
            while not self._done.is_set():
                self._poll(instance)
                self._done.wait(_POLL_SECONDS)
            self._poll(instance)  # what happened between the last poll and the end
        except Exception as exc:  # progress is best effort; the run goes on
            self.out(f"(progress display stopped: {exc})")
        finally:
            instance.dispose()

    def _poll(self, instance: dg.DagsterInstance) -> None:
        import dagster as dg

        if self.run_id is None:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={LAUNCH_TAG: self.launch_id}))
            if not runs:
                return
            self.run_id = runs[0].run_id
            self.out(f"Run {self.run_id} of {runs[0].job_name} started")
        while True:
            conn = instance.get_records_for_run(self.run_id, cursor=self._cursor, limit=200)
            for record in conn.records:
                self._show(record.event_log_entry)
            self._cursor = conn.cursor
            if not conn.has_more:
                break

    def _show(self, entry: Any) -> None:
        import dagster as dg

        event = entry.dagster_event
        if event is None:
            # A step's own log line: show warnings and errors (e.g. a source version mismatch).
            if entry.level >= logging.WARNING and entry.user_message:
                self.out(f"{entry.step_key or ''}: {entry.user_message}")
            return
        kind = event.event_type
        step = event.step_key or ""
        now = f"[{time.monotonic() - self._t0:6.1f}s]"
        if kind == dg.DagsterEventType.STEP_START:
            self._step_started[step] = time.monotonic()
            self.out(f"{now} {step}: started")
        elif kind == dg.DagsterEventType.STEP_SUCCESS:
            took = time.monotonic() - self._step_started.get(step, self._t0)
            self.out(f"{now} {step}: succeeded ({took:.1f}s)")
        elif kind == dg.DagsterEventType.STEP_FAILURE:
            self.out(f"{now} {step}: FAILED: {step_error(event)}")
        elif kind == dg.DagsterEventType.STEP_UP_FOR_RETRY:
            self.out(f"{now} {step}: failed, will retry: {first_line(event.message)}")
        elif kind == dg.DagsterEventType.STEP_SKIPPED:
            self.out(f"{now} {step}: skipped")
        elif kind == dg.DagsterEventType.ASSET_MATERIALIZATION:
            mat = event.step_materialization_data.materialization
            meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
            figures = ", ".join(
                f"{k.replace('rows_', '')}={meta[k]}"
                for k in ("rows_inserted", "rows_updated", "rows_deleted")
                if k in meta
            )
            version = meta.get("delta_version")
            self.out(
                f"{now} {step}: wrote {mat.asset_key.to_user_string()}"
                + (f" version {version}" if version is not None else "")
                + (f" ({figures})" if figures else "")
            )
        elif kind == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            data = event.asset_check_evaluation_data
            verdict = "passed" if data.passed else "FAILED"
            self.out(
                f"{now} check {data.asset_key.to_user_string()}:{data.check_name} {verdict}"
                + ("" if data.passed else f": {data.description or ''}")
            )
        elif kind == dg.DagsterEventType.ENGINE_EVENT and "pool" in (event.message or ""):
            # Waiting for another run to release a table's pool.
            self.out(f"{now} {step}: {event.message}")
            if not self._hinted:
                self._hinted = True
                self.out(
                    "  (another run is writing the same table; if no other run is active, a "
                    "killed run may still hold the slot: free it in the UI under Deployment > "
                    "Concurrency)"
                )


def first_run_rows() -> int:
    """Rows to seed when the default source is missing (NBPIPELINE_FIRST_RUN_ROWS, else 100,000)."""
    from nbpipeline.settings import positive_int_env

    return positive_int_env(FIRST_RUN_ROWS_ENV, FIRST_RUN_ROWS, what="number of rows")


def ensure_source(
    spark: Any, table: str, *, rows: int, out: Callable[[str], None] = progress
) -> bool:
    """Seed `table` with `rows` synthetic orders if it does not exist; True if it seeded.

    A newcomer's first `nbpipeline run` (or `nbpipeline ui`) then works without a separate
    `nbpipeline seed` step. An existing table, even an empty one, is never touched; the table
    created here carries the demo mark, so `nbpipeline seed` may later change it.
    """
    from nbpipeline.local import seed

    if spark.catalog.tableExists(table):
        return False
    out(f"No source table {table} yet: seeding {rows:,} rows (nbpipeline seed --rows {rows}) ...")
    result = seed.seed_orders(spark, table, rows=rows, progress=out)
    out(f"Seeded {result['table']}: {result['rows']:,} rows in {result['seconds']:.1f}s")
    return True


def seed_default_source_if_missing(run_config: dict[str, Any] | None) -> None:
    """Before a run (or the UI) on the local engine with the default source: seed it if missing.

    Only the default source is seeded: a table the user named (in the run config, or
    NBPIPELINE_SOURCE_TABLE for the UI) is theirs, and a missing one is reported by the notebooks
    as the step's error. `run_config=None` stands for the UI's defaults.
    """
    from nbpipeline.defs.resources import selected_backend
    from nbpipeline.defs.source import configured_source_table
    from nbpipeline.local import engine
    from nbpipeline.settings import DEFAULT_SOURCE_TABLE

    if selected_backend() != "local":
        return
    if run_config is None:
        sources = {configured_source_table()}
    else:
        sources = {cfg["config"].get("source_table") for cfg in run_config["ops"].values()}
    if sources - {None, DEFAULT_SOURCE_TABLE}:
        return
    rows = first_run_rows()
    # The engine is started here (and says so) rather than by the first step, so its start-up
    # shows on the terminal instead of inside a step's log.
    spark = engine.get_spark(progress=progress)
    ensure_source(spark, DEFAULT_SOURCE_TABLE, rows=rows)


def run_pipeline_job(
    mode: str,
    run_config: dict[str, Any],
    *,
    tags: dict[str, str] | None = None,
    out: Callable[[str], None] = progress,
) -> dict[str, Any]:
    """Execute the job of `mode` on the persistent instance, printing progress through `out`.

    Returns {"run_id", "success", "error", "failed_checks", "seconds"}.
    """
    from nbpipeline import definitions

    job_fn = {
        "sequential": definitions.sequential_notebooks_job,
        "parallel": definitions.parallel_notebooks_job,
    }[mode]
    return run_job_fn(job_fn, run_config, tags=tags, out=out)


def run_job_fn(
    job_fn: Callable[[], dg.JobDefinition],
    run_config: dict[str, Any],
    *,
    tags: dict[str, str] | None = None,
    out: Callable[[str], None] = progress,
    op_selection: list[str] | None = None,
) -> dict[str, Any]:
    """Like `run_pipeline_job`, for any module-level function returning a job (importable,
    since `dg.reconstructable` rebuilds the job in step processes). `op_selection` runs only
    those steps of the job."""
    import dagster as dg

    from nbpipeline.instance import get_instance

    instance = get_instance(out)
    launch_id = uuid.uuid4().hex
    run_tags = {LAUNCH_TAG: launch_id, LAUNCHED_BY_TAG: "cli", **(tags or {})}
    out(f"Launching {job_fn.__name__} on the Dagster instance in {instance.root_directory} ...")
    printer = ProgressPrinter(launch_id, out)
    printer.start()
    started = time.monotonic()
    try:
        with dg.execute_job(
            dg.reconstructable(job_fn),
            instance=instance,
            run_config=run_config,
            tags=run_tags,
            op_selection=op_selection,
        ) as result:
            success = result.success
            run_id = result.run_id
            failures = result.get_step_failure_events()
            run_failure = next(
                (e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE),
                None,
            )
            check_results = [
                e.asset_check_evaluation_data
                for e in result.all_events
                if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
            ]
    except dg.DagsterInvalidConfigError as exc:
        raise ConfigError(f"invalid run config: {first_line(str(exc))}") from None
    finally:
        printer.stop()
    seconds = time.monotonic() - started
    error = None
    if not success:
        if failures:
            error = "; ".join(f"step {e.step_key} failed: {step_error(e)}" for e in failures)
        elif run_failure is not None:
            error = f"run failed: {first_line(run_failure.message)}"
        else:
            error = "run failed"
    out(f"Run {run_id} {'succeeded' if success else 'failed'} in {seconds:.1f}s")
    return {
        "run_id": run_id,
        "success": success,
        "error": error,
        "failed_checks": [_check_name(c) for c in check_results if not c.passed and _evaluated(c)],
        "unevaluated_checks": [_check_name(c) for c in check_results if not _evaluated(c)],
        "seconds": seconds,
    }


def _check_name(check: Any) -> str:
    return f"{check.asset_key.to_user_string()}:{check.check_name}"


def _evaluated(check: Any) -> bool:
    """False for a check its notebook could not evaluate (a warning, not failed data)."""
    flag = check.metadata.get("evaluated")
    return getattr(flag, "value", flag) is not False
