"""`runtime_comparison`: the sequential vs parallel comparison as an asset, kept fresh by a sensor.

After every successful run of either notebook job, a run-status sensor asks for a
`runtime_comparison` materialization when the instance holds a sequential and a parallel run on
the same source version. Its metadata shows the comparison table (Markdown), the speedup and the
parallel efficiency as numbers (so the UI plots them over time), the what-if estimates for other
core counts, and the timeline plot itself (a Markdown image the UI shows inline) and its path.
Materialized before any such pair exists (a fresh instance's "Materialize all"), it records that
there is nothing to compare yet and which runs to start, and succeeds.
"""

import base64

import dagster as dg

from nbpipeline import settings
from nbpipeline.defs.tags import COMPARISON_JOB, PARALLEL_JOB, SEQUENTIAL_JOB
from nbpipeline.errors import ConfigError
from nbpipeline.perf import comparison


@dg.asset(
    group_name="comparison",
    kinds={"python"},
    description=(
        "Sequential vs parallel: per-notebook start offsets and durations, wall time, sum of "
        "steps, critical path, overhead, speedup and parallel efficiency of the latest pair of "
        "runs on the same source version, read from the Dagster event log."
    ),
)
def runtime_comparison(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    try:
        seq_id, par_id = comparison.latest_pair(context.instance)
    except comparison.NoPairError as exc:
        context.log.info(f"Nothing to compare yet: {exc}")
        return dg.MaterializeResult(
            metadata={
                "status": "nothing to compare",
                "comparison": dg.MetadataValue.md(
                    f"**Nothing to compare yet:** {exc.message}.\n\n"
                    f"To compare, {exc.hint or 'run both notebook jobs'}; the sensor "
                    "`runtime_comparison_sensor` then refreshes this asset."
                ),
            }
        )
    except ConfigError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    result = comparison.compare_runs(context.instance, seq_id, par_id)
    folder = settings.home() / "comparison"
    path = comparison.plot(result, folder / f"timeline_{seq_id[:8]}_{par_id[:8]}.png")
    seq, par = result.sequential, result.parallel
    # The UI renders Markdown images, data URIs included: the plot shows on the asset's page.
    image = base64.b64encode(path.read_bytes()).decode("ascii")
    return dg.MaterializeResult(
        metadata={
            "status": "compared",
            "comparison": dg.MetadataValue.md(result.to_markdown()),
            "timeline": dg.MetadataValue.md(
                f"![sequential vs parallel timeline](data:image/png;base64,{image})"
            ),
            "what_if": dg.MetadataValue.md(comparison.what_if_markdown(result.what_if)),
            "speedup": dg.MetadataValue.float(round(result.speedup, 4)),
            "parallel_efficiency": dg.MetadataValue.float(round(result.efficiency, 4)),
            "sequential_wall_s": dg.MetadataValue.float(seq.wall_s),
            "parallel_wall_s": dg.MetadataValue.float(par.wall_s),
            "sequential_overhead_s": dg.MetadataValue.float(round(seq.overhead_s, 3)),
            "parallel_overhead_s": dg.MetadataValue.float(round(par.overhead_s, 3)),
            "critical_path_s": dg.MetadataValue.float(par.critical_path_s),
            "sequential_run_id": dg.MetadataValue.dagster_run(seq_id),
            "parallel_run_id": dg.MetadataValue.dagster_run(par_id),
            "source_version": str(par.source_version),
            "plot": dg.MetadataValue.path(str(path)),
        }
    )


runtime_comparison_job = dg.define_asset_job(
    COMPARISON_JOB,
    selection=[runtime_comparison],
    executor_def=dg.in_process_executor,
    description="Recomputes runtime_comparison from the event log.",
)


def build_sensor(jobs: list) -> dg.RunStatusSensorDefinition:
    """The sensor watching the two notebook jobs (passed in, so there is one job definition)."""
    watched = {j.name for j in jobs if j.name in (SEQUENTIAL_JOB, PARALLEL_JOB)}

    # Runs launched by `nbpipeline run` (or any `execute_job`) carry no code-location origin, and a
    # sensor restricted to `monitored_jobs` only sees runs launched from its own code location
    # (the UI, schedules). So it watches every run and picks the two jobs by name.
    @dg.run_status_sensor(
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitor_all_code_locations=True,
        request_job=runtime_comparison_job,
        name="runtime_comparison_sensor",
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Refreshes runtime_comparison after each successful notebook job run "
        "(launched from the UI, a schedule or `nbpipeline run`).",
    )
    def runtime_comparison_sensor(context: dg.RunStatusSensorContext):
        if context.dagster_run.job_name not in watched:
            return dg.SkipReason(f"{context.dagster_run.job_name} is not a notebook job")
        try:
            comparison.latest_pair(context.instance)
        except ConfigError as exc:
            return dg.SkipReason(str(exc))
        return dg.RunRequest(run_key=context.dagster_run.run_id)

    return runtime_comparison_sensor
