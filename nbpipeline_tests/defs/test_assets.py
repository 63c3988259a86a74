"""The assets materialized in-process on the local engine: outputs, metadata, checks, failures.

One full materialization (the four notebooks on a 2,000-row dirty source) is shared by the tests
of this module; the other tests either run no notebook (parameter validation, fake backend) or
rerun some notebooks on corrupted outputs.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest

from nbpipeline.defs.assets import ALL_ASSETS, OUTPUT_ASSET_KEYS, is_transient, op_config
from nbpipeline.defs.checks import VALID_ROW_SQL
from nbpipeline.defs.metadata import table_metadata
from nbpipeline.defs.tags import SOURCE_VERSION_TAG
from nbpipeline.errors import ConfigError, EngineError, NotebookError
from nbpipeline.local.backend import LocalNotebookBackend
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests.fakes.backend import CALLS, FakeBackend
from nbpipeline_tests.helpers import latest_version, materializations

ROWS = 2000
OUTPUTS = dg.AssetSelection.assets(*OUTPUT_ASSET_KEYS)


# --------------------------------------------------------------------------- without Spark


def test_table_metadata_is_pure_and_complete() -> None:
    run = FakeBackend().run_notebook("Notebook4", {"source_table": "s.orders"})
    m = {k: getattr(v, "value", v) for k, v in table_metadata(run, run.tables[0]).items()}
    assert m["rows_read"] == 12 and m["rows_rejected"] == 1
    assert (m["rows_inserted"], m["rows_updated"], m["rows_deleted"]) == (3, 2, 1)
    assert m["delta_version"] == 7 and m["dagster/row_count"] == 10
    assert m["dagster/table_name"] == "s.order_facts"
    assert m["dagster/uri"] == "file:/w/s.db/order_facts"
    assert [c.name for c in m["dagster/column_schema"].columns] == ["k", "v"]
    assert m["source_table"] == "s.orders" and m["source_version"] == 4
    assert m["notebook"] == "Notebook4" and m["notebook_path"] == "/nb/Notebook4.py"
    assert m["backend"] == "fake" and m["engine"] == "fake://engine"
    assert m["notebook_started_at"].startswith("2025-01-01T00:00:00")
    assert m["notebook_duration_s"] == 2.0 and m["backend_wall_time_s"] == 3.5
    assert m["run_url"] == "https://example.invalid/run/1" and m["run_id"] == 1


def test_transient_classification() -> None:
    assert is_transient(EngineError("engine went away"))
    assert not is_transient(ConfigError("bad"))
    assert not is_transient(NotebookError("NotebookInputError: bad source", notebook="n"))
    assert is_transient(NotebookError("ConcurrentAppendException: files were added", notebook="n"))
    assert is_transient(RuntimeError("grpc hiccup"))


@pytest.mark.dagster
def test_transient_failure_is_retried_and_metadata_recorded() -> None:
    CALLS.clear()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=dg.AssetSelection.assets("daily_sales"),
        resources={"notebook_backend": FakeBackend(flaky=1)},
        run_config={"ops": op_config({"source_table": "s.orders"}, notebooks=("Notebook1",))},
        instance=instance,
    )
    assert result.success
    assert CALLS["Notebook1"] == 2
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 1
    mats = materializations(result)
    assert mats["daily_sales"]["delta_version"] == 7
    assert mats["daily_sales"]["backend_wall_time_s"] == 3.5
    # The step tagged the run with the source version the notebook reported.
    assert instance.get_run_by_id(result.run_id).tags[SOURCE_VERSION_TAG] == "4"


@pytest.mark.dagster
def test_data_error_is_not_retried() -> None:
    CALLS.clear()
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=dg.AssetSelection.assets("daily_sales"),
        resources={"notebook_backend": FakeBackend(reason="NotebookInputError: column gone")},
        run_config={"ops": op_config({"source_table": "s.orders"}, notebooks=("Notebook1",))},
        raise_on_error=False,
    )
    assert not result.success
    assert CALLS["Notebook1"] == 1
    (failure,) = result.get_step_failure_events()
    assert "column gone" in failure.step_failure_data.user_failure_data.description


@pytest.mark.dagster
def test_bad_parameters_fail_before_any_notebook_runs() -> None:
    CALLS.clear()
    ops = op_config({"source_table": "s.orders"})
    ops["Notebook1"]["config"]["source_table"] = "orders; DROP TABLE x"
    ops["Notebook4"]["config"]["high_value_threshold"] = "-5"
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=dg.AssetSelection.assets("daily_sales", "order_facts", "high_value_orders"),
        resources={"notebook_backend": FakeBackend()},
        run_config={"ops": {k: v for k, v in ops.items() if k in ("Notebook1", "Notebook4")}},
        raise_on_error=False,
    )
    assert not result.success
    assert CALLS == {}  # nothing ran, so nothing was written
    errors = {
        e.step_key: e.step_failure_data.user_failure_data.description
        for e in result.get_step_failure_events()
    }
    assert "invalid source_table" in errors["Notebook1"]
    assert "\n" not in errors["Notebook1"]
    assert "invalid high_value_threshold '-5'" in errors["Notebook4"]
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def test_unknown_parameter_is_refused() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        op_config({"bogus": "1"})
    with pytest.raises(ConfigError, match="target_schema"):
        op_config({"target_schema": "a.b.c"})


# --------------------------------------------------------------------------- on the engine


@pytest.fixture(scope="module")
def materialized(spark):
    """Seed a dirty 2,000-row source in a fresh schema and materialize the five outputs once."""
    import uuid

    from nbpipeline.local.seed import seed_orders

    schema = f"t_assets_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE SCHEMA {schema}")
    source = f"{schema}.orders"
    seed_orders(spark, source, rows=ROWS, seed=11, dirty=True)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=OUTPUTS,
        resources={"notebook_backend": LocalNotebookBackend()},
        run_config={"ops": op_config({"source_table": source})},
        instance=instance,
        raise_on_error=False,
    )
    return {"schema": schema, "source": source, "result": result, "instance": instance}


@pytest.mark.spark
@pytest.mark.dagster
def test_materialize_writes_outputs_with_metadata(spark, materialized) -> None:
    result = materialized["result"]
    assert result.success, [e.message for e in result.get_step_failure_events()]
    schema, source = materialized["schema"], materialized["source"]
    mats = materializations(result)
    assert set(mats) == set(OUTPUT_TABLES)
    source_version = latest_version(spark, source)
    for name, m in mats.items():
        table = f"{schema}.{name}"
        count = spark.table(table).count()
        assert count > 0
        assert m["dagster/row_count"] == count
        assert m["dagster/table_name"] == table
        assert m["delta_version"] == latest_version(spark, table)
        assert m["rows_read"] == ROWS
        assert m["rows_rejected"] > 0  # the dirty seed has rejected rows
        assert m["rows_inserted"] == count  # first run: every row is new
        assert m["rows_updated"] == 0 and m["rows_deleted"] == 0
        assert m["source_table"] == source and m["source_version"] == source_version
        assert [c.name for c in m["dagster/column_schema"].columns] == spark.table(table).columns
        assert str(m["dagster/uri"]).endswith(name)
        assert m["backend"] == "local" and m["engine"].startswith("sc://")
        assert m["notebook_path"].endswith(f"{OUTPUT_TABLES[name]}.py")
        assert 0 < m["notebook_duration_s"] <= m["backend_wall_time_s"] + 0.5
    valid = spark.sql(
        f"SELECT COUNT(DISTINCT order_id) AS n FROM {source} WHERE {VALID_ROW_SQL}"
    ).collect()[0]["n"]
    assert mats["order_facts"]["dagster/row_count"] == valid
    assert mats["high_value_orders"]["high_value_threshold"] == "1000.00"
    run = materialized["instance"].get_run_by_id(result.run_id)
    assert run.tags[SOURCE_VERSION_TAG] == str(source_version)


@pytest.mark.spark
@pytest.mark.dagster
def test_checks_pass_on_good_data(materialized) -> None:
    result = materialized["result"]
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 12
    failed = [(e.asset_key, e.check_name, e.description) for e in evaluations if not e.passed]
    assert not failed
    by_name = {(e.asset_key.to_user_string(), e.check_name): e for e in evaluations}
    facts = by_name[("order_facts", "row_count_matches_source")]
    assert facts.metadata["expected_rows"].value == facts.metadata["actual_rows"].value


def _checks(result: dg.ExecuteInProcessResult) -> dict[Any, Any]:
    return {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.dagster
def test_checks_fail_with_a_reason_on_broken_data(spark, materialized) -> None:
    """A table corrupted between two runs in a way its MERGE keeps (identical duplicate rows):
    the next run's notebook checks fail on the version it committed, with the data in metadata."""
    schema, source = materialized["schema"], materialized["source"]
    spark.sql(f"INSERT INTO {schema}.daily_sales SELECT * FROM {schema}.daily_sales LIMIT 1")
    spark.sql(f"INSERT INTO {schema}.order_facts SELECT * FROM {schema}.order_facts LIMIT 2")
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=dg.AssetSelection.assets("daily_sales", "order_facts", "high_value_orders"),
        resources={"notebook_backend": LocalNotebookBackend()},
        run_config={
            "ops": op_config({"source_table": source}, notebooks=("Notebook1", "Notebook4"))
        },
        instance=materialized["instance"],
    )
    results = _checks(result)
    assert len(results) == 8
    mats = materializations(result)
    dup = results[("daily_sales", "unique_keys")]
    assert not dup.passed and "occur more than once" in dup.description
    assert dup.severity == dg.AssetCheckSeverity.ERROR
    assert dup.metadata["duplicate_keys"].value == 1
    version = mats["daily_sales"]["delta_version"]
    assert dup.metadata["checked"].value == f"{schema}.daily_sales version {version}"
    facts = results[("order_facts", "unique_keys")]
    assert not facts.passed and facts.metadata["duplicate_keys"].value == 2
    count = results[("order_facts", "row_count_matches_source")]
    assert not count.passed and "(+2)" in count.description
    assert count.metadata["actual_rows"].value == count.metadata["expected_rows"].value + 2
    assert results[("daily_sales", "no_negative_revenue")].passed
    assert results[("high_value_orders", "subset_of_order_facts")].passed


@pytest.mark.dagster
def test_checks_the_notebook_did_not_evaluate_are_warnings() -> None:
    """FakeBackend's exit JSON reports no checks: every check is a WARN "not evaluated"."""
    CALLS.clear()
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=dg.AssetSelection.assets("order_facts", "high_value_orders"),
        resources={"notebook_backend": FakeBackend()},
        run_config={"ops": op_config({"source_table": "s.orders"}, notebooks=("Notebook4",))},
    )
    results = _checks(result)
    assert len(results) == 6
    for evaluation in results.values():
        assert evaluation.severity == dg.AssetCheckSeverity.WARN
        assert evaluation.description.startswith("not evaluated: ")
        assert evaluation.metadata["evaluated"].value is False


def test_the_notebooks_valid_row_rule_is_the_packages() -> None:
    # Notebooks cannot import the package on Databricks, so the rule is written twice: pin it.
    import ast

    from nbpipeline.settings import notebooks_dir

    tree = ast.parse((notebooks_dir() / "_common.py").read_text())
    [value] = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "VALID_ROW_SQL" for t in node.targets)
    ]
    assert ast.literal_eval(value) == VALID_ROW_SQL
