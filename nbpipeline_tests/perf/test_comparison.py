"""Sequential vs parallel: compare, the plot, runtime_comparison, the orchestration notebooks, bench.

One sequential and one parallel run of the real jobs on a tiny source, on a private Dagster
instance; every figure `compare` prints is checked against the event log it was read from.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from nbpipeline.cli import main
from nbpipeline.databricks.runs import run_timing_from_report
from nbpipeline.local.runtime import run_notebook
from nbpipeline.perf import comparison
from nbpipeline.settings import notebooks_dir
from nbpipeline.tables import OUTPUT_KEYS, OUTPUT_TABLES

pytestmark = [pytest.mark.spark, pytest.mark.dagster]


@pytest.fixture(scope="module")
def pair(job_pair: dict) -> Iterator[tuple]:
    """(instance, source, seed_orders' result, mode -> run id): the session's pair of runs, with
    DAGSTER_HOME on their instance for this module (`compare` and `bench` read it)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DAGSTER_HOME", str(job_pair["home"]))
        yield job_pair["instance"], job_pair["source"], job_pair["seeded"], job_pair["ids"]


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


@pytest.mark.slow
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

    # What parallel would buy on N cores, from the sequential run's recorded step costs.
    costs = comparison.step_costs(instance, result.sequential)
    assert {c.step for c in costs} == {"Notebook1", "Notebook2", "Notebook3", "Notebook4"}
    assert all(c.cpu_s > 0 and c.cores >= 1 for c in costs)
    # The engine's JIT compilers, named by thread on Linux, took part of each step's seconds.
    assert all(0 <= c.jit_s < c.cpu_s for c in costs)
    assert sum(c.jit_s for c in costs) > 0
    assert [w["cores"] for w in data["what_if"]] == list(comparison.WHAT_IF_CORES)
    work = sum(c.cpu_s for c in costs)
    least = sum(c.cpu_s - c.jit_s for c in costs)
    for row in data["what_if"]:
        assert least / row["cores"] <= row["low_s"] <= row["high_s"]
        assert row["high_s"] >= work / row["cores"]
        assert row["limited_by"] == "cpu" or row["limited_by"].startswith("longest step")
    assert main(["compare"]) == 0
    assert "| cores | parallel wall at least (s)" in capsys.readouterr().out


def _step_metadata(instance, run_id: str, key: str) -> dict[str, object]:
    out = {}
    for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        value = e.asset_materialization.metadata.get(key)
        out[e.step_key] = getattr(value, "value", value)
    return out


@pytest.mark.slow
def test_steps_of_a_run_share_one_spark_session(pair) -> None:
    from nbpipeline.local.backend import run_session_id

    instance, _source, _seeded, ids = pair
    sessions = {
        mode: _step_metadata(instance, run_id, "spark_session_id") for mode, run_id in ids.items()
    }
    # Every notebook step of a run, each in its own process in the parallel job, attached to the
    # one session derived from its run id; another run gets another session.
    for mode, run_id in ids.items():
        assert set(sessions[mode].values()) == {run_session_id(run_id)}, mode
        assert len(sessions[mode]) == 4
    assert run_session_id(ids["sequential"]) != run_session_id(ids["parallel"])


def test_what_if_bounds() -> None:
    costs = [
        comparison.StepCost("Notebook1", wall_s=20, cpu_s=30, cores=2),
        comparison.StepCost("Notebook2", wall_s=12, cpu_s=4, cores=2),
    ]
    rows = {r["cores"]: r for r in comparison.what_if(costs, outside_steps_s=1.0)}
    # 1 core: all 34 CPU seconds in a row; at most that plus the longest step (Brent).
    assert rows[1] == {"cores": 1, "low_s": 35.0, "high_s": 55.0, "limited_by": "cpu"}
    # 32 cores: Notebook2 used 2 of its 12 s on the CPU: 10 s did not scale with cores.
    assert rows[32]["low_s"] == pytest.approx(11.0)
    assert rows[32]["limited_by"] == "longest step (Notebook2)"
    assert rows[32]["high_s"] == pytest.approx(34 / 32 + 20 + 1, abs=0.01)
    # An asset-check step after Notebook2 (no CPU recorded) is a serial tail of its chain.
    tail = {r["cores"]: r for r in comparison.what_if(costs, 1.0, after={"Notebook2": 15.0})}
    assert tail[32]["low_s"] == pytest.approx(26.0)  # 10 s floor + 15 s tail + 1 s outside
    assert tail[32]["high_s"] == pytest.approx(34 / 32 + 27 + 1, abs=0.01)
    # JIT compiling is paid once per engine: the lower bound leaves it out, the upper keeps it.
    jitted = [
        comparison.StepCost("Notebook1", wall_s=20, cpu_s=30, cores=2, jit_s=8),
        comparison.StepCost("Notebook2", wall_s=12, cpu_s=4, cores=2, jit_s=1),
    ]
    warm = {r["cores"]: r for r in comparison.what_if(jitted, outside_steps_s=1.0)}
    assert warm[1] == {"cores": 1, "low_s": 26.0, "high_s": 55.0, "limited_by": "cpu"}
    assert warm[32] == rows[32]  # the floor there is Notebook2's part that did not scale
    assert comparison.what_if([]) == []
    assert "No what-if estimate" in comparison.what_if_markdown([])


def test_runtime_comparison_on_a_fresh_instance_records_nothing_to_compare() -> None:
    from nbpipeline import definitions

    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [definitions.defs.get_assets_def("runtime_comparison")], instance=instance
        )
        assert result.success
        meta = result.asset_materializations_for_node("runtime_comparison")[0].metadata
        assert meta["status"].value == "nothing to compare"
        text = meta["comparison"].value
        assert "no successful sequential and parallel run" in text
        assert "nbpipeline run sequential" in text


@pytest.mark.slow
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
    # The plot itself, inline in the UI (a Markdown image carrying the PNG).
    image = meta["timeline"].value
    assert image.startswith("![") and "(data:image/png;base64," in image
    png = base64.b64decode(image.split("base64,", 1)[1].rstrip(")"))
    assert png == Path(meta["plot"].value).read_bytes()
    assert "| cores |" in meta["what_if"].value and meta["status"].value == "compared"

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_reference_writes_what_the_notebooks_write(spark, pair, tmp_path: Path) -> None:
    from nbpipeline.perf import reference

    _instance, source, _seeded, _ids = pair
    schema = source.split(".")[0]
    written = reference.compute(spark, source, tmp_path / "reference")
    assert set(written) == set(OUTPUT_TABLES)
    for table in OUTPUT_TABLES:
        ref = spark.table(written[table])
        ours = spark.table(f"{schema}.{table}").drop("_updated_at")
        assert ref.schema.simpleString() == ours.schema.simpleString(), table
        assert ref.count() > 0, table
        assert sorted(map(repr, ref.collect())) == sorted(map(repr, ours.collect())), table


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
    from nbpipeline.backend import NOTEBOOK_NAMES
    from nbpipeline.perf import bench

    instance = pair[0]
    before = {r.run_id for r in instance.get_runs()}
    # Every mode but `per-process-spark` (four step JVMs at once): the next test runs its code
    # path on one notebook.
    modes = [m for m in bench.BENCH_MODES if m != "per-process-spark"]
    argv = ["bench", "--rows", "300", "--repeat", "1", "--modes", ",".join(modes), "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["modes"]) == modes
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
    # Every mode against the floor; where each run's CPU went, by process.
    assert data["modes"]["reference"]["vs_reference"] == 1.0
    for mode, figures in data["modes"].items():
        assert figures["vs_reference"] > 0, mode
        roles = figures["cpu_by_role_median"]
        assert set(roles) == set(bench.ROLES), mode
    assert data["modes"]["dagster-parallel"]["cpu_by_role_median"]["step_processes"] > 0
    assert data["modes"]["dagster-sequential"]["cpu_by_role_median"]["step_processes"] == 0
    assert {t["ratio"] for t in data["targets"]} >= {
        "dagster-parallel / reference",
        "dagster-sequential / reference",
    }
    assert {t["ratio"] for t in data["targets"]} >= {"dagster-parallel / notebook-threads"}
    # The Dagster modes ran the notebook steps of the real jobs, and no check step.
    bench_runs = [r for r in instance.get_runs() if r.run_id not in before]
    assert {r.job_name for r in bench_runs} == {"sequential_notebooks", "parallel_notebooks"}
    for run in bench_runs:
        started = {
            e.step_key
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        }
        assert started == set(NOTEBOOK_NAMES), run.job_name
        if run.job_name == "parallel_notebooks":
            # A subset run gets no job defaults: the four steps must still run at once, forked.
            executor = run.run_config["execution"]["config"]
            assert executor["max_concurrent"] == 4
            assert "forkserver" in executor["start_method"]


@pytest.mark.slow
def test_per_process_spark_runs_a_notebook_on_a_jvm_of_its_step_process(
    spark, instance, tmp_path: Path
) -> None:
    """bench's `per-process-spark` mode on one notebook: the parallel job with
    PerProcessSparkBackend bound runs Notebook1 in a step process, on a classic Spark session of
    that process's own, from a Delta path source into the table beside it."""
    from nbpipeline.defs.assets import op_config
    from nbpipeline.defs.jobs import parallel_execution_config
    from nbpipeline.local.seed import seed_orders
    from nbpipeline.perf import bench
    from nbpipeline.runs import run_job_fn
    from nbpipeline_tests import contract_oracle as oracle
    from nbpipeline_tests.helpers import collect

    source = f"delta.`{tmp_path / 'orders'}`"
    seed_orders(spark, source, rows=300, seed=17, dirty=True)
    result = run_job_fn(
        bench.per_process_parallel_job,
        # Config for the selected step only (a subset run rejects the others' config).
        {
            "ops": op_config({"source_table": source}, notebooks=("Notebook1",)),
            "execution": parallel_execution_config(),
        },
        out=lambda _m: None,
        op_selection=["Notebook1"],
    )
    assert result["success"], result["error"]
    run_id = result["run_id"]
    assert _step_metadata(instance, run_id, "backend") == {"Notebook1": "per-process-spark"}
    starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
    assert [e.step_key for e in starts] == ["Notebook1"]
    assert starts[0].dagster_event.pid != os.getpid()  # a step process, not this one
    # What the step's own JVM wrote, read back through the engine, is the contract's table.
    got = oracle.keyed("daily_sales", collect(spark, f"delta.`{tmp_path / 'daily_sales'}`"))
    assert got == oracle.expected(collect(spark, source)).tables["daily_sales"]
    assert got


def test_databricks_run_records_feed_the_same_comparison() -> None:
    from nbpipeline.databricks.runs import JobRunReport, TaskTiming

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

    seq = run_timing_from_report(
        report("sequential", [(0, 20), (20, 41), (41, 60), (60, 82)], 82.0)
    )
    par = run_timing_from_report(report("parallel", [(0, 20), (0, 21), (0, 19), (0, 22)], 22.5))
    result = comparison.Comparison(seq, par)
    assert seq.queue_s == 3.0 and seq.wall_s == 82.0
    assert [s.duration_s for s in par.steps] == [20, 21, 19, 22]
    assert par.critical_path_s == 22 and par.overhead_s == pytest.approx(0.5)
    assert result.speedup == pytest.approx(82.0 / 22.5)
    assert "| Notebook4 | 60.00 | 22.00 | 0.00 | 22.00 |" in result.to_markdown()
