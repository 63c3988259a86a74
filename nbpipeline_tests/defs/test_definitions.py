"""The Dagster definitions load (directly and through workspace.yaml) and have the expected shape.

A snapshot of the asset graph, jobs, executors, schedules and pools, so an accidental change to
the graph (a renamed key, a lost dependency, a step without its pool) shows up here. Settings
errors are checked at load time in fresh interpreters, since the module reads the environment
once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from nbpipeline import definitions
from nbpipeline.defs.resources import BACKEND_ENV, selected_backend
from nbpipeline.settings import PROJECT_ROOT

OUTPUTS = {
    "daily_sales": "Notebook1",
    "customer_summary": "Notebook2",
    "product_performance": "Notebook3",
    "order_facts": "Notebook4",
    "high_value_orders": "Notebook4",
}


def _graph() -> Any:
    return definitions.defs.resolve_asset_graph()


def test_asset_graph_snapshot() -> None:
    graph = _graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"orders", *OUTPUTS, "runtime_comparison"}
    assert _graph().get(dg.AssetKey("runtime_comparison")).group_name == "comparison"
    for name in ["orders", *OUTPUTS]:
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == "nbpipeline"
        assert set(node.kinds) == {"spark", "delta"}
        assert node.description
        expected_parents = set() if name == "orders" else {dg.AssetKey("orders")}
        assert node.parent_keys == expected_parents
    # The source is observed, never materialized: nothing in the graph writes it.
    source = graph.get(dg.AssetKey("orders"))
    assert source.is_observable and not source.is_materializable
    assert all(
        graph.get(dg.AssetKey(name)).is_materializable
        and not graph.get(dg.AssetKey(name)).is_observable
        for name in OUTPUTS
    )
    # Notebook4 is one step that yields both of its tables.
    steps = {
        a.node_def.name: sorted(k.to_user_string() for k in a.keys)
        for a in definitions.defs.assets  # type: ignore[union-attr]
        if isinstance(a, dg.AssetsDefinition) and a.node_def.name != "runtime_comparison"
    }
    assert steps == {
        "orders": ["orders"],
        "Notebook1": ["daily_sales"],
        "Notebook2": ["customer_summary"],
        "Notebook3": ["product_performance"],
        "Notebook4": ["high_value_orders", "order_facts"],
    }


def test_pools_and_retry_policy() -> None:
    for assets_def in definitions.defs.assets:  # type: ignore[union-attr]
        op = assets_def.op
        if op.name in ("runtime_comparison", "orders"):  # they only read; no pool needed
            assert op.pool is None
            continue
        assert op.pool == f"nbpipeline/{op.name}"
        if op.name != "orders":
            policy = op.retry_policy
            assert policy is not None and policy.max_retries == 3
            assert policy.backoff == dg.Backoff.EXPONENTIAL


def test_checks_snapshot() -> None:
    checks = {(k.asset_key.to_user_string(), k.name) for k in _graph().asset_check_keys}
    expected = {(t, "unique_keys") for t in OUTPUTS} | {(t, "no_negative_revenue") for t in OUTPUTS}
    expected |= {("order_facts", "row_count_matches_source")}
    expected |= {("high_value_orders", "subset_of_order_facts")}
    assert checks == expected


@pytest.mark.parametrize(
    ("job_name", "executor", "mode"),
    [
        ("sequential_notebooks", "in_process", "sequential"),
        ("parallel_notebooks", "multiprocess", "parallel"),
    ],
)
def test_jobs_snapshot(job_name: str, executor: str, mode: str) -> None:
    job = definitions.defs.resolve_job_def(job_name)
    assert job.executor_def.name == executor
    assert job.tags["nbpipeline/mode"] == mode
    graph = job.asset_layer.asset_graph
    assert {k.to_user_string() for k in graph.executable_asset_keys} == set(OUTPUTS)
    # Every check of the five outputs runs in the job too, inside its notebook's step.
    assert len(graph.asset_check_keys) == 12
    assert {n.name for n in job.graph.node_defs} == {
        "Notebook1",
        "Notebook2",
        "Notebook3",
        "Notebook4",
    }
    # The launchpad shows the notebooks' widgets with the notebooks' defaults.
    ops = job.run_config_schema.config_type.fields["ops"].config_type.fields
    nb4 = ops["Notebook4"].config_type.fields["config"].config_type.fields
    assert list(nb4) == [
        "source_table",
        "target_schema",
        "high_value_threshold",
        "source_version",
        "timeout_seconds",
    ]
    assert nb4["source_version"].default_value == ""
    assert nb4["source_table"].default_value == "nbpipeline.orders"
    assert nb4["high_value_threshold"].default_value == "1000.00"
    nb1 = ops["Notebook1"].config_type.fields["config"].config_type.fields
    assert "high_value_threshold" not in nb1


def test_parallel_max_concurrent_defaults_to_the_notebook_count() -> None:
    job = definitions.defs.resolve_job_def("parallel_notebooks")
    execution = job.run_config_schema.config_type.fields["execution"]
    assert execution.default_value["config"]["max_concurrent"] == 4


def test_schedules_snapshot() -> None:
    schedules = {s.name: s for s in definitions.defs.schedules}  # type: ignore[union-attr]
    assert set(schedules) == {"sequential_notebooks_schedule", "parallel_notebooks_schedule"}
    seq, par = schedules["sequential_notebooks_schedule"], schedules["parallel_notebooks_schedule"]
    assert seq.job_name == "sequential_notebooks" and par.job_name == "parallel_notebooks"
    assert (seq.cron_schedule, par.cron_schedule) == ("0 2 * * *", "0 3 * * *")
    assert seq.execution_timezone == par.execution_timezone == "UTC"
    assert seq.default_status == par.default_status == dg.DefaultScheduleStatus.STOPPED


def test_sensors_and_demo_job_snapshot() -> None:
    sensors = {s.name: s for s in definitions.defs.sensors}  # type: ignore[union-attr]
    assert set(sensors) == {"runtime_comparison_sensor", "source_version_sensor"}
    source = sensors["source_version_sensor"]
    assert source.default_status == dg.DefaultSensorStatus.STOPPED  # like the schedules
    assert source.job_name == "parallel_notebooks"
    # Demo data is a job of its own, writing no asset: "Materialize all" never runs it.
    demo = definitions.defs.resolve_job_def("demo_source")
    assert {n.name for n in demo.graph.node_defs} == {"demo_source_data"}
    assert not demo.asset_layer.asset_graph.get_all_asset_keys()


def test_resource_is_the_abstract_backend() -> None:
    from nbpipeline.backend import NotebookBackend
    from nbpipeline.local.backend import LocalNotebookBackend

    resources = definitions.defs.resources or {}
    assert isinstance(resources["notebook_backend"], LocalNotebookBackend)
    assert isinstance(resources["notebook_backend"], NotebookBackend)


def test_selected_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert selected_backend() == "local"
    monkeypatch.setenv(BACKEND_ENV, "Databricks")
    assert selected_backend() == "databricks"


def _load_in_fresh_interpreter(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import nbpipeline.definitions"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {BACKEND_ENV: "spark3"},
            "NBPIPELINE_BACKEND='spark3' is not a known backend; allowed values: local, databricks",
        ),
        (
            {"NBPIPELINE_SEQUENTIAL_CRON": "61 * * * *"},
            "NBPIPELINE_SEQUENTIAL_CRON='61 * * * *' is not a valid",
        ),
        (
            {"NBPIPELINE_SCHEDULE_TIMEZONE": "Mars/Olympus"},
            "NBPIPELINE_SCHEDULE_TIMEZONE='Mars/Olympus' is not a known",
        ),
        (
            {"NBPIPELINE_MAX_CONCURRENT": "zero"},
            "NBPIPELINE_MAX_CONCURRENT='zero' is not a positive integer",
        ),
    ],
)
def test_bad_settings_fail_at_load(env: dict[str, str], message: str) -> None:
    proc = _load_in_fresh_interpreter(env)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_settings_from_environment() -> None:
    code = (
        "from nbpipeline import definitions as d\n"
        "s = {x.name: x for x in d.defs.schedules}\n"
        "print(s['parallel_notebooks_schedule'].cron_schedule, s['parallel_notebooks_schedule'].execution_timezone)\n"
        "j = d.defs.resolve_job_def('parallel_notebooks')\n"
        "print(j.run_config_schema.config_type.fields['execution'].default_value['config']['max_concurrent'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={
            **os.environ,
            "NBPIPELINE_PARALLEL_CRON": "*/15 * * * 1-5",
            "NBPIPELINE_SCHEDULE_TIMEZONE": "Europe/Berlin",
            "NBPIPELINE_MAX_CONCURRENT": "2",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["*/15 * * * 1-5 Europe/Berlin", "2"]


def test_project_files() -> None:
    workspace = yaml.safe_load((PROJECT_ROOT / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    assert entry["python_module"]["module_name"] == "nbpipeline.definitions"
    assert entry["python_module"]["working_directory"] == "."
    config = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    assert config["concurrency"]["pools"]["default_limit"] == 1


def test_project_dagster_yaml_configures_pools(tmp_path: Path) -> None:
    (tmp_path / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        pool_config = instance.event_log_storage.get_pool_config()
        assert pool_config.default_pool_limit == 1
        assert instance.event_log_storage.supports_global_concurrency_limits
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


def test_workspace_yaml_loads_with_dagster_cli(tmp_path: Path) -> None:
    """`dagster definitions validate` loads the code location the UI would load."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nbpipeline" in proc.stdout + proc.stderr
