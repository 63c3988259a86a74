"""Sequential vs parallel: compare, the plot, runtime_comparison, the orchestration notebooks, bench.

One sequential and one parallel run of the real jobs on a tiny source, on a private Dagster
instance; every figure `compare` prints is checked against the event log it was read from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from nbpipeline import comparison
from nbpipeline.cli import main
from nbpipeline.runtime import run_notebook
from nbpipeline.settings import PROJECT_ROOT, notebooks_dir
from nbpipeline.tables import OUTPUT_KEYS, OUTPUT_TABLES

pytestmark = [pytest.mark.spark, pytest.mark.dagster]


@pytest.fixture(scope="module")
def pair(spark, tmp_path_factory: pytest.TempPathFactory):
    """(instance, source, sequential run id, parallel run id) on one source version."""
    import os
    import uuid

    from nbpipeline.cli_pipeline import build_run_config, run_job
    from nbpipeline.seed import seed_orders

    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")  # pools, no telemetry
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    schema = f"cmp_{uuid.uuid4().hex[:8]}"
    source = f"{schema}.orders"
    seeded = seed_orders(spark, source, rows=400, seed=11, dirty=True)
    ids = {}
    for mode in ("sequential", "parallel"):
        result = run_job(mode, build_run_config(mode, source=source), out=lambda _m: None)
        assert result["success"], result["error"]
        ids[mode] = result["run_id"]
    instance = dg.DagsterInstance.get()
    yield instance, source, seeded, ids
    instance.dispose()
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


def _step_spans(instance, run_id: str) -> dict[str, float]:
    starts, spans = {}, {}
    for e in instance.all_logs(run_id):
        if not e.is_dagster_event:
            continue
        kind = e.dagster_event.event_type
        if kind == dg.DagsterEventType.STEP_START:
            starts[e.step_key] = e.timestamp
        elif kind == dg.DagsterEventType.STEP_SUCCESS:
            spans[e.step_key] = e.timestamp - starts[e.step_key]
    return spans


def test_compare_matches_the_event_log(pair, tmp_path: Path, capsys) -> None:
    instance, _source, seeded, ids = pair
    assert comparison.latest_pair(instance) == (ids["sequential"], ids["parallel"])
    result = comparison.compare_runs(instance, ids["parallel"], ids["sequential"])  # any order
    assert result.sequential.run_id == ids["sequential"]
    for timing in (result.sequential, result.parallel):
        spans = _step_spans(instance, timing.run_id)
        assert {s.step for s in timing.steps} == set(spans)
        for step in timing.steps:
            assert step.duration_s == pytest.approx(spans[step.step], abs=0.002)
            assert 0 <= step.start_offset_s <= timing.wall_s
        record = instance.get_run_record_by_id(timing.run_id)
        assert timing.wall_s == pytest.approx(record.end_time - record.start_time, abs=0.05)
        assert timing.critical_path_s == pytest.approx(max(spans.values()), abs=0.002)
        assert timing.sum_steps_s == pytest.approx(sum(spans.values()), abs=0.01)
        assert 0 <= timing.overhead_s <= timing.wall_s
        assert timing.source_version == str(seeded["version"])
    assert result.speedup == pytest.approx(result.sequential.wall_s / result.parallel.wall_s)
    assert result.parallelism == 4  # Notebook1..4; the check steps are timed, not counted
    assert result.efficiency == pytest.approx(result.speedup / 4)
    # In the sequential job steps never overlap, so busy time is the sum of the steps.
    assert result.sequential.busy_s == pytest.approx(result.sequential.sum_steps_s, abs=0.01)

    plot = tmp_path / "cmp.png"
    assert main(["compare", "--json", "--plot", str(plot)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["speedup"] == pytest.approx(result.speedup, abs=1e-3)
    assert data["sequential"]["run_id"] == ids["sequential"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000


def test_runtime_comparison_asset_and_sensor(pair) -> None:
    from nbpipeline import definitions

    instance, _source, _seeded, ids = pair
    result = dg.materialize(
        [definitions.defs.get_assets_def("runtime_comparison")], instance=instance
    )
    meta = result.asset_materializations_for_node("runtime_comparison")[0].metadata
    seq_wall = comparison.run_timing(instance, ids["sequential"]).wall_s
    par_wall = comparison.run_timing(instance, ids["parallel"]).wall_s
    assert meta["speedup"].value == pytest.approx(seq_wall / par_wall, abs=1e-3)
    assert "| figure |" in meta["comparison"].value
    assert Path(meta["plot"].value).exists()

    sensor = definitions.defs.get_sensor_def("runtime_comparison_sensor")
    run = instance.get_run_by_id(ids["parallel"])
    ctx = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_instance=instance,
        dagster_run=run,
        dagster_event=instance.all_logs(ids["parallel"], of_type=dg.DagsterEventType.RUN_SUCCESS)[
            0
        ].dagster_event,
    )
    request = sensor(ctx)
    # The pair was launched like `nbpipeline run` does (no code-location origin) and still counts.
    assert run.remote_job_origin is None
    assert isinstance(request, dg.RunRequest) and request.run_key == ids["parallel"]
    # Other jobs' runs (its own refresh runs included) are skipped, not answered with a request.
    other = run._replace(job_name="runtime_comparison_job")  # DagsterRun is a NamedTuple
    ctx_other = dg.build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_instance=instance,
        dagster_run=other,
        dagster_event=ctx.dagster_event,
    )
    assert isinstance(sensor(ctx_other), dg.SkipReason)


def _rows(spark, table: str, keys: tuple[str, ...]) -> list[tuple]:
    df = spark.table(table).drop("_updated_at")
    return sorted(tuple(r) for r in df.orderBy(*keys).collect())


def test_orchestration_notebooks_write_the_same_tables_as_the_jobs(spark, pair) -> None:
    _instance, source, _seeded, _ids = pair
    schema = source.split(".")[0]
    for name, mode in (
        ("SequentialOrchestration", "sequential"),
        ("ParallelOrchestration", "parallel"),
    ):
        target = f"{schema}_{mode}"
        out = json.loads(
            run_notebook(
                notebooks_dir() / f"{name}.py",
                {"source_table": source, "target_schema": target},
                spark=spark,
            )
        )
        assert out["mode"] == mode and [n["notebook"] for n in out["notebooks"]] == [
            "Notebook1",
            "Notebook2",
            "Notebook3",
            "Notebook4",
        ]
        for table in OUTPUT_TABLES:
            keys = OUTPUT_KEYS[table]
            assert _rows(spark, f"{target}.{table}", keys) == _rows(
                spark, f"{schema}.{table}", keys
            )


def test_parallel_orchestration_reports_a_failing_child_by_name(spark, tmp_path: Path) -> None:
    from nbpipeline.errors import NotebookError

    with pytest.raises(NotebookError) as err:
        run_notebook(
            notebooks_dir() / "ParallelOrchestration.py",
            {"source_table": "nope.missing"},
            spark=spark,
        )
    text = str(err.value)
    assert "Notebook1 failed" in text and "Notebook4 failed" in text and "does not exist" in text


@pytest.mark.slow
def test_bench_tiny_runs_every_mode(spark, pair, capsys) -> None:
    from nbpipeline import bench

    instance = pair[0]
    before = {r.run_id for r in instance.get_runs()}
    assert main(["bench", "--rows", "300", "--repeat", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["modes"]) == set(bench.MODES)
    assert data["with_checks"] is False
    for figures in data["modes"].values():
        assert set(figures) >= {"median_s", "min_s", "max_s", "peak_rss_mb", "peak_pss_mb"}
        assert 0 < figures["min_s"] <= figures["median_s"] <= figures["max_s"]
        assert figures["peak_rss_mb"] > 100  # includes the engine JVM (or the step JVMs)
        # PSS splits pages shared between processes, so the sum can only be smaller.
        assert 0 < figures["peak_pss_mb"] <= figures["peak_rss_mb"]
        assert figures["cpu_s"] > 0
    # The shared engine worked during the modes that use it (busy cores averaged over the run).
    for mode in ("dagster-sequential", "dagster-parallel", "notebook-threads"):
        assert 0 < data["modes"][mode]["engine_cores_busy"] <= (os.cpu_count() or 1) + 0.5
    assert data["modes"]["per-process-spark"]["engine_cores_busy"] is None
    assert {t["ratio"] for t in data["targets"]} >= {"dagster-parallel / notebook-threads"}
    # The Dagster modes ran the notebook steps of the real jobs, and no check step.
    bench_runs = [r for r in instance.get_runs() if r.run_id not in before]
    assert {r.job_name for r in bench_runs} == {"sequential_notebooks", "parallel_notebooks"}
    for run in bench_runs:
        started = {
            e.step_key
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        }
        assert started == set(bench.NOTEBOOK_STEPS), run.job_name
        if run.job_name == "parallel_notebooks":
            # A subset run gets no job defaults: the four steps must still run at once, forked.
            executor = run.run_config["execution"]["config"]
            assert executor["max_concurrent"] == 4
            assert "forkserver" in executor["start_method"]


def test_databricks_run_records_feed_the_same_comparison() -> None:
    from nbpipeline.databricks_jobs import JobRunReport, TaskTiming

    def report(mode: str, offsets: list[tuple[float, float]], wall: float) -> JobRunReport:
        tasks = [
            TaskTiming(
                f"Notebook{i}", 10 + i, "TERMINATED", "SUCCESS", s, 1.0, 2.0, e - s - 3.5, 0.5, e
            )
            for i, (s, e) in enumerate(offsets, start=1)
        ]
        return JobRunReport(
            mode,
            f"nbpipeline-{mode}",
            1,
            99,
            None,
            "TERMINATED",
            "SUCCESS",
            "",
            0.0,
            wall,
            wall,
            3.0,
            tasks,
        )

    seq = comparison.timing_from_databricks(
        report("sequential", [(0, 20), (20, 41), (41, 60), (60, 82)], 82.0)
    )
    par = comparison.timing_from_databricks(
        report("parallel", [(0, 20), (0, 21), (0, 19), (0, 22)], 22.5)
    )
    result = comparison.Comparison(seq, par)
    assert seq.queue_s == 3.0 and seq.wall_s == 82.0
    assert [s.duration_s for s in par.steps] == [20, 21, 19, 22]
    assert par.critical_path_s == 22 and par.overhead_s == pytest.approx(0.5)
    assert result.speedup == pytest.approx(82.0 / 22.5)
    assert "| Notebook4 | 60.00 | 22.00 | 0.00 | 22.00 |" in result.to_markdown()
