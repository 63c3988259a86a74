"""The source belongs to the user: `orders` is observed, never written; demo data only touches
tables nbpipeline seed created; the source-version sensor launches one run per new version.

The user's table here is made the way a user's would be: plain SQL, no demo mark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._core.definitions.observe import observe
from dagster._utils.test.data_versions import get_stale_status_resolver

from nbpipeline.defs.assets import ALL_ASSETS, ORDERS_KEY, op_config, orders
from nbpipeline.defs.resources import SPARK_REMOTE_ENV
from nbpipeline.defs.sensors import SENSOR_NAME, evaluate, run_key
from nbpipeline.defs.source import SOURCE_TABLE_ENV
from nbpipeline.defs.tags import DEMO_JOB, PARALLEL_JOB, SOURCE_VERSION_TAG
from nbpipeline.errors import ConfigError
from nbpipeline.identifiers import parse_table
from nbpipeline.local import seed
from nbpipeline.local.backend import LocalNotebookBackend
from nbpipeline.settings import PROJECT_ROOT
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests.fakes.backend import NotebooksOnlyBackend

USER_ROWS = 300


def version_and_rows(spark: Any, table: str) -> tuple[int, int]:
    version = int(spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").collect()[0]["version"])
    return version, spark.table(table).count()


def make_user_table(spark: Any, schema: str, name: str = "their_orders") -> str:
    """A table nbpipeline did not create: a copy of demo rows, written with plain SQL."""
    demo = f"{schema}.demo_{uuid.uuid4().hex[:6]}"
    seed.seed_orders(spark, demo, rows=USER_ROWS, seed=17, dirty=True)
    table = f"{schema}.{name}"
    spark.sql(f"CREATE TABLE {table} USING DELTA AS SELECT * FROM {demo}")
    assert not seed.is_demo_table(spark, parse_table(table))
    return table


# --------------------------------------------------------------------------- demo data


@pytest.mark.slow
@pytest.mark.spark
def test_seed_refuses_a_table_it_did_not_create(spark, schema: str) -> None:
    table = make_user_table(spark, schema)
    before = version_and_rows(spark, table)
    with pytest.raises(ConfigError) as refused:
        seed.seed_orders(spark, table, rows=50)
    assert table in refused.value.message and "--replace" in refused.value.message
    with pytest.raises(ConfigError, match="--replace"):
        seed.apply_changes(spark, table, fraction=0.5)
    assert version_and_rows(spark, table) == before  # nothing written

    # Its own tables it creates marked, and overwrites and changes freely.
    demo = f"{schema}.demo"
    assert seed.seed_orders(spark, demo, rows=50)["version"] == 0
    assert seed.is_demo_table(spark, parse_table(demo))
    assert seed.seed_orders(spark, demo, rows=60)["version"] == 1
    assert seed.apply_changes(spark, demo, fraction=0.5)["version"] == 2
    assert seed.is_demo_table(spark, parse_table(demo))

    # The override: the table is replaced with demo rows, and marked from then on.
    result = seed.seed_orders(spark, table, rows=40, replace=True)
    assert result["version"] == before[0] + 1 and spark.table(table).count() == 40
    assert seed.is_demo_table(spark, parse_table(table))


@pytest.mark.spark
def test_seed_marks_path_tables_and_refuses_a_missing_one_for_changes(spark, tmp_path) -> None:
    table = f"delta.`{tmp_path}/orders`"
    with pytest.raises(ConfigError, match="does not exist"):
        seed.apply_changes(spark, table, fraction=0.5)
    seed.seed_orders(spark, table, rows=30)
    assert seed.is_demo_table(spark, parse_table(table))
    assert seed.apply_changes(spark, table, fraction=0.5)["version"] == 1

    # Files of another format at a path are someone's data too.
    other = tmp_path / "parquet"
    spark.range(3).write.parquet(str(other))
    with pytest.raises(ConfigError, match="--replace"):
        seed.seed_orders(spark, f"delta.`{other}`", rows=30)
    assert not (other / "_delta_log").exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbpipeline.cli", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.spark
def test_seed_cli_refuses_in_one_line_and_writes_nothing(spark, schema: str) -> None:
    table = make_user_table(spark, schema)
    before = version_and_rows(spark, table)
    for args in (["--rows", "10"], ["--changes", "0.5"]):
        proc = _cli("seed", *args, "--table", table)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr
        assert table in errors[0] and "--replace" in errors[0]
        assert "Traceback" not in proc.stderr
    assert version_and_rows(spark, table) == before
    proc = _cli("seed", "--rows", "10", "--table", table, "--replace")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] == 10 == spark.table(table).count()


@pytest.mark.spark
@pytest.mark.dagster
def test_demo_job_changes_demo_tables_only(spark, schema: str) -> None:
    from nbpipeline import definitions

    job = definitions.defs.resolve_job_def(DEMO_JOB)
    demo = f"{schema}.demo"
    seed.seed_orders(spark, demo, rows=200)
    user = make_user_table(spark, schema)
    before = version_and_rows(spark, user)

    def run(table: str) -> dg.ExecuteInProcessResult:
        config = {"table": table, "mode": "changes", "fraction": 0.5}
        return job.execute_in_process(
            run_config={"ops": {"demo_source_data": {"config": config}}}, raise_on_error=False
        )

    assert run(demo).success and version_and_rows(spark, demo)[0] == 1
    refused = run(user)
    assert not refused.success
    (failure,) = refused.get_step_failure_events()
    description = failure.step_failure_data.user_failure_data.description
    assert user in description and "--replace" in description
    assert version_and_rows(spark, user) == before


# --------------------------------------------------------------------------- the source asset


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.dagster
def test_orders_is_observed_and_materialize_all_leaves_it_alone(
    spark, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = make_user_table(spark, schema)
    monkeypatch.setenv(SOURCE_TABLE_ENV, table)
    instance = dg.DagsterInstance.ephemeral()
    resources = {"notebook_backend": LocalNotebookBackend()}

    def observed() -> dict[str, Any]:
        result = observe([orders], instance=instance, resources=resources)
        (event,) = result.get_asset_observation_events()
        observation = event.asset_observation_data.asset_observation
        out = {k: getattr(v, "value", v) for k, v in observation.metadata.items()}
        out["data_version"] = observation.tags["dagster/data_version"]
        return out

    version, rows = version_and_rows(spark, table)
    first = observed()
    assert first["data_version"] == str(version) and first["delta_version"] == version
    assert first["rows"] == first["dagster/row_count"] == rows
    assert first["dagster/table_name"] == table
    commit = spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").collect()[0]["timestamp"]
    assert abs(first["last_commit"] - commit.timestamp()) < 1

    # "Materialize all": every asset of the graph; the source is only read.
    result = dg.materialize(
        [*ALL_ASSETS],
        resources=resources,
        run_config={"ops": op_config({"source_table": table})},
        instance=instance,
    )
    assert result.success
    written = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert written == set(OUTPUT_TABLES)
    assert version_and_rows(spark, table) == (version, rows)
    for name in OUTPUT_TABLES:
        assert spark.table(f"{schema}.{name}").count() > 0
    stale = get_stale_status_resolver(instance, ALL_ASSETS)
    assert stale.get_status(dg.AssetKey("daily_sales")) == StaleStatus.FRESH

    # An upstream write moves the source; once observed, the outputs are stale.
    spark.sql(f"DELETE FROM {table} WHERE order_id % 7 = 0")
    moved = observed()
    assert moved["data_version"] == str(version + 1)
    assert moved["rows"] == spark.table(table).count() < rows
    stale = get_stale_status_resolver(instance, ALL_ASSETS)
    for name in OUTPUT_TABLES:
        assert stale.get_status(dg.AssetKey(name)) == StaleStatus.STALE, name


@pytest.mark.dagster
def test_observation_without_a_spark_session_records_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SPARK_REMOTE_ENV, raising=False)
    monkeypatch.setenv(SOURCE_TABLE_ENV, "sales.orders")
    instance = dg.DagsterInstance.ephemeral()
    result = observe(
        [orders],
        instance=instance,
        resources={"notebook_backend": NotebooksOnlyBackend()},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    description = failure.step_failure_data.user_failure_data.description
    assert "cannot observe sales.orders" in description and SPARK_REMOTE_ENV in description
    assert "\n" not in description
    assert instance.fetch_observations(ORDERS_KEY, limit=1).records == []


# --------------------------------------------------------------------------- the sensor


def test_sensor_is_stopped_by_default_and_launches_the_parallel_job() -> None:
    from nbpipeline import definitions

    (sensor,) = [s for s in definitions.defs.sensors if s.name == SENSOR_NAME]
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.job_name == PARALLEL_JOB
    assert sensor.required_resource_keys == {"notebook_backend"}


@pytest.mark.spark
@pytest.mark.dagster
def test_sensor_launches_once_per_new_source_version(
    spark, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbpipeline import definitions

    (sensor,) = [s for s in definitions.defs.sensors if s.name == SENSOR_NAME]
    table = make_user_table(spark, schema)
    monkeypatch.setenv(SOURCE_TABLE_ENV, table)
    instance = dg.DagsterInstance.ephemeral()
    backend = LocalNotebookBackend()

    def tick(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"notebook_backend": backend}
        )
        return sensor(context)

    version, _ = version_and_rows(spark, table)
    first = tick(None)
    assert isinstance(first, dg.SensorResult)
    (request,) = first.run_requests
    assert request.run_key == run_key(table, version)
    assert request.tags[SOURCE_VERSION_TAG] == str(version)
    assert request.run_config["ops"]["Notebook1"]["config"]["source_table"] == table
    # Nothing new: no second run for the same version.
    again = tick(first.cursor)
    assert isinstance(again, dg.SkipReason) and "still at version" in again.skip_message

    # An upstream write: a new version, but a run for it is already running (launched by hand).
    spark.sql(f"UPDATE {table} SET quantity = quantity + 1 WHERE order_id % 5 = 0")
    running = dg.DagsterRun(
        job_name=PARALLEL_JOB,
        run_id=str(uuid.uuid4()),
        status=dg.DagsterRunStatus.STARTED,
        run_config={"ops": op_config({"source_table": table})},
        tags={SOURCE_VERSION_TAG: str(version + 1)},
    )
    instance.add_run(running)
    waiting = tick(first.cursor)
    assert isinstance(waiting, dg.SkipReason) and running.run_id in waiting.skip_message
    instance.delete_run(running.run_id)
    second = tick(first.cursor)
    assert isinstance(second, dg.SensorResult)
    assert [r.run_key for r in second.run_requests] == [run_key(table, version + 1)]
    assert second.run_requests[0].tags[SOURCE_VERSION_TAG] == str(version + 1)


@pytest.mark.dagster
def test_sensor_skips_saying_why_when_it_cannot_observe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPARK_REMOTE_ENV, raising=False)
    monkeypatch.setenv(SOURCE_TABLE_ENV, "sales.orders")
    result = evaluate(dg.DagsterInstance.ephemeral(), None, NotebooksOnlyBackend())
    assert isinstance(result, dg.SkipReason)
    assert "cannot observe sales.orders" in result.skip_message
    assert os.environ.get(SPARK_REMOTE_ENV) is None
