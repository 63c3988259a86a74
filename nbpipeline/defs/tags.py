"""Job names and run tag names: one place, since launchers, sensors and readers must agree."""

from __future__ import annotations

SEQUENTIAL_JOB = "sequential_notebooks"
PARALLEL_JOB = "parallel_notebooks"
#: `nbpipeline run MODE` and the schedules name a notebook job by its mode.
JOB_BY_MODE: dict[str, str] = {"sequential": SEQUENTIAL_JOB, "parallel": PARALLEL_JOB}
COMPARISON_JOB = "runtime_comparison_job"
DEMO_JOB = "demo_source"

MODE_TAG = "nbpipeline/mode"
#: The source version a run reads: set at launch (the source-version sensor, the bench) or by
#: the run's first step to finish.
SOURCE_VERSION_TAG = "nbpipeline/source_version"
# Set only if the steps of one run read different source versions, which the run-wide version
# resolution (`run_source_version`) prevents.
SOURCE_VERSIONS_TAG = "nbpipeline/source_versions"
#: Finds a run launched from the shell before its run id is known.
LAUNCH_TAG = "nbpipeline/launch_id"
LAUNCHED_BY_TAG = "nbpipeline/launched_by"
BENCH_TAG = "nbpipeline/bench"
LOADTEST_TAG = "nbpipeline/loadtest"
