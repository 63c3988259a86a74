"""README commands run as written, with their distinctive options, and the features they name:
`notebook run ... --param high_value_threshold=500`, `run parallel --max-concurrent N` on a real
run, `compare --databricks-runs` on two job runs of the loopback workspace, and a Databricks
backend whose host has no credentials.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import dagster as dg
import pytest

from nbpipeline import cli
from nbpipeline.backend import NOTEBOOK_NAMES
from nbpipeline.defs.assets import ALL_ASSETS, op_config
from nbpipeline.local.seed import seed_orders
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests import contract_oracle as oracle
from nbpipeline_tests.fakes.databricks_http import LoopbackDatabricks
from nbpipeline_tests.helpers import (
    RUN_TIMEOUT_S,
    collect,
    events,
    failure_text,
    launch,
    step_windows,
    stop_group,
)


@pytest.mark.slow
@pytest.mark.spark
def test_notebook_run_with_a_high_value_threshold_param(spark, schema: str, capsys) -> None:
    """`nbpipeline notebook run notebooks/Notebook4.py --param high_value_threshold=500`: the
    widget reaches the notebook, and high_value_orders holds exactly the orders from 500 on."""
    source = f"{schema}.orders"
    seed_orders(spark, source, rows=1000, seed=11, dirty=True)
    rows = collect(spark, source)
    at_500 = oracle.expected(rows, high_value_threshold=Decimal("500"))["high_value_orders"]
    default = oracle.expected(rows)["high_value_orders"]
    assert len(at_500) > len(default), "the seed has no order between 500 and the default"
    argv = ["notebook", "run", "notebooks/Notebook4.py", "--param", "high_value_threshold=500"]
    assert cli.main([*argv, "--param", f"source_table={source}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["notebook"] == "Notebook4"
    got = oracle.keyed("high_value_orders", collect(spark, f"{schema}.high_value_orders"))
    assert got == at_500


@pytest.mark.spark
@pytest.mark.dagster
@pytest.mark.slow
def test_run_parallel_max_concurrent_limits_a_real_run(
    spark, schema: str, instance: dg.DagsterInstance
) -> None:
    """`nbpipeline run parallel --max-concurrent 1`: the parallel job's steps run one at a time
    (their windows in the event log never overlap), and the run succeeds."""
    source = f"{schema}.orders"
    seed_orders(spark, source, rows=200, seed=3, dirty=True)
    proc = launch("parallel", source, Path(instance.root_directory), "--max-concurrent", "1")
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        stop_group([proc])
    assert proc.returncode == 0, stderr[-3000:]
    run_id = stdout.strip().splitlines()[-1]
    run = instance.get_run_by_id(run_id)
    assert run.job_name == "parallel_notebooks"
    assert run.run_config["execution"]["config"]["max_concurrent"] == 1
    by_step = step_windows(instance, run_id)
    assert set(NOTEBOOK_NAMES) <= set(by_step), by_step
    windows = sorted(by_step.values())
    for (_, end, _), (start, _, _) in zip(windows, windows[1:], strict=False):
        assert end <= start, "two steps ran at once under --max-concurrent 1"


def test_compare_databricks_runs_command(
    loopback: LoopbackDatabricks,
    capsys,
) -> None:
    """`nbpipeline compare --databricks-runs SEQ_RUN_ID PAR_RUN_ID` on two job runs of the
    loopback workspace: the comparison's figures are the workspace's own run records."""
    for name in NOTEBOOK_NAMES:
        loopback.behave(name, setup_s=0.1, execution_s=0.3, cleanup_s=0.05)
    assert cli.main(["databricks", "deploy"]) == 0
    ids = {}
    for mode in ("sequential", "parallel"):
        argv = ["databricks", "run", mode, "--json", "--poll-initial", "0.05", "--poll-max", "0.2"]
        capsys.readouterr()
        assert cli.main(argv) == 0
        ids[mode] = json.loads(capsys.readouterr().out)["run_id"]
    argv = ["compare", "--databricks-runs", str(ids["sequential"]), str(ids["parallel"])]
    assert cli.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for mode, run_id in ids.items():
        truth = {t["task_key"]: t for t in loopback.timeline(run_id)["tasks"]}
        steps = {s["step"]: s for s in result[mode]["steps"]}
        assert set(steps) == set(NOTEBOOK_NAMES)
        for name, step in steps.items():
            assert step["duration_s"] == pytest.approx(
                truth[name]["end"] - truth[name]["start"], abs=0.01
            )
    assert result["speedup"] > 1  # the parallel job's tasks ran at once on the workspace
    assert cli.main(argv) == 0
    assert "Notebook4" in capsys.readouterr().out


@pytest.mark.dagster
def test_databricks_host_without_credentials_fails_each_step(
    loopback: LoopbackDatabricks,
    monkeypatch,
) -> None:
    """README: `NBPIPELINE_BACKEND=databricks` with a host but no credentials fails each step
    with `cannot authenticate to Databricks at HOST` and a hint; nothing reaches the workspace's
    jobs API."""
    from nbpipeline.defs.resources import build_backend

    monkeypatch.delenv("DATABRICKS_TOKEN")
    monkeypatch.setenv("NBPIPELINE_BACKEND", "databricks")
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=dg.AssetSelection.assets(*OUTPUT_TABLES),
        resources={"notebook_backend": build_backend()},
        run_config={"ops": op_config({"source_table": "s.orders"})},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failures = {
        e.step_key: failure_text(e)
        for e in events(instance, result.run_id, dg.DagsterEventType.STEP_FAILURE)
    }
    assert set(failures) == set(NOTEBOOK_NAMES), failures
    for text in failures.values():
        assert f"cannot authenticate to Databricks at {loopback.host}" in text, text
        assert "DATABRICKS_TOKEN" in text, text
    assert not loopback.requests_to("/jobs/runs/submit")
    assert not events(instance, result.run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY)


def test_deploy_with_cron_timezone_and_unpaused(
    loopback: LoopbackDatabricks,
    capsys,
) -> None:
    """`nbpipeline databricks deploy --cron "0 2 * * 1-5" --timezone Europe/Berlin --unpaused`:
    one cron schedules the comparison job alone (the jobs sharing tables never start together),
    in that time zone, unpaused."""
    argv = ["databricks", "deploy", "--cron", "0 2 * * 1-5", "--timezone", "Europe/Berlin"]
    assert cli.main([*argv, "--unpaused"]) == 0
    capsys.readouterr()
    settings = [j["settings"] for j in loopback.jobs.values()]
    assert len(settings) == 5
    schedules = {s["name"]: s["schedule"] for s in settings if "schedule" in s}
    assert set(schedules) == {"nbpipeline-comparison"}
    for schedule in schedules.values():
        assert schedule["quartz_cron_expression"] == "0 0 2 ? * MON-FRI"
        assert schedule["timezone_id"] == "Europe/Berlin"
        assert schedule["pause_status"] == "UNPAUSED"


@pytest.mark.dagster
def test_comparison_sensor_skips_while_no_pair_exists(instance: dg.DagsterInstance) -> None:
    """The runtime_comparison sensor answers a notebook job's success with a SkipReason, not a
    run request, while the instance has no sequential and parallel run on one source version."""
    from nbpipeline import definitions
    from nbpipeline.defs.tags import MODE_TAG, SOURCE_VERSION_TAG

    @dg.asset
    def stand_in() -> None:
        """A run carrying a notebook job's tags (its step work is not what the sensor reads)."""

    sensor = definitions.defs.get_sensor_def("runtime_comparison_sensor")

    def answer(mode: str, version: str) -> object:
        result = dg.materialize(
            [stand_in], instance=instance, tags={MODE_TAG: mode, SOURCE_VERSION_TAG: version}
        )
        run = instance.get_run_by_id(result.run_id)._replace(job_name=f"{mode}_notebooks")
        (success,) = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)
        return sensor(
            dg.build_run_status_sensor_context(
                sensor_name=sensor.name,
                dagster_instance=instance,
                dagster_run=run,
                dagster_event=success.dagster_event,
            )
        )

    first = answer("parallel", "3")
    assert isinstance(first, dg.SkipReason), first
    assert "no successful sequential run" in first.skip_message
    other_version = answer("sequential", "4")
    assert isinstance(other_version, dg.SkipReason), other_version
    assert "no sequential and parallel run on the same source version" in (
        other_version.skip_message
    )
    pair = answer("sequential", "3")
    assert isinstance(pair, dg.RunRequest)  # the same code, once a pair exists
