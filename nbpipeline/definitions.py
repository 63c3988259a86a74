"""The Dagster code location: assets (with their checks), jobs, schedules, sensors and the notebook
backend.

Loaded by `dagster dev` / the webserver (workspace.yaml, `[tool.dagster]` in pyproject) and by
`nbpipeline run`. Settings come from the environment and are checked here, at load time:
NBPIPELINE_BACKEND, NBPIPELINE_MAX_CONCURRENT, the schedule variables.
"""

from __future__ import annotations

import dagster as dg

from nbpipeline.defs.assets import ALL_ASSETS
from nbpipeline.defs.comparison import build_sensor, runtime_comparison, runtime_comparison_job
from nbpipeline.defs.demo import demo_source
from nbpipeline.defs.jobs import build_jobs
from nbpipeline.defs.resources import resource_defs
from nbpipeline.defs.schedules import build_schedules
from nbpipeline.defs.sensors import source_version_sensor
from nbpipeline.defs.tags import PARALLEL_JOB, SEQUENTIAL_JOB

_jobs = build_jobs()

defs = dg.Definitions(
    assets=[*ALL_ASSETS, runtime_comparison],
    jobs=[*_jobs, runtime_comparison_job, demo_source],
    schedules=build_schedules(),
    sensors=[build_sensor(_jobs), source_version_sensor],
    resources=resource_defs(),
)


# Module-level functions so `dg.reconstructable` can rebuild the jobs in step processes.
def sequential_notebooks_job() -> dg.JobDefinition:
    """The resolved `sequential_notebooks` job."""
    return defs.resolve_job_def(SEQUENTIAL_JOB)


def parallel_notebooks_job() -> dg.JobDefinition:
    """The resolved `parallel_notebooks` job."""
    return defs.resolve_job_def(PARALLEL_JOB)
