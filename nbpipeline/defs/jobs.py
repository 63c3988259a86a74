"""Two jobs over the same five output assets (and their checks): sequential and parallel.

`sequential_notebooks` runs every step in one process, one after the other. `parallel_notebooks`
runs each step in its own process, at most `max_concurrent` at once; the default is the number of
notebook steps (4), not the core count, because the steps mostly wait on the shared engine (one
JVM, reached by every step process through the backend) and would otherwise be capped at 2 on a
2-core machine. `NBPIPELINE_MAX_CONCURRENT` changes the default; run config
(`execution.config.max_concurrent`) overrides it per run.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import dagster as dg

from nbpipeline.backend import NOTEBOOK_NAMES
from nbpipeline.defs.assets import OUTPUT_ASSET_KEYS
from nbpipeline.defs.tags import MODE_TAG, PARALLEL_JOB, SEQUENTIAL_JOB
from nbpipeline.settings import positive_int_env

MAX_CONCURRENT_ENV = "NBPIPELINE_MAX_CONCURRENT"
DEFAULT_MAX_CONCURRENT = len(NOTEBOOK_NAMES)
# Step processes are forked from a server that has imported the definitions and the Spark
# Connect client once, instead of each spawned process importing them again (figures in
# docs/performance.md); safe, since the server only imports modules and opens no gRPC channel.
FORKSERVER_PRELOAD = ["nbpipeline.definitions", "pyspark.sql.connect.session"]

#: The five outputs; selecting them selects their asset checks too.
OUTPUT_SELECTION = dg.AssetSelection.assets(*OUTPUT_ASSET_KEYS)


def max_concurrent_default() -> int:
    """The parallel job's default `max_concurrent`: NBPIPELINE_MAX_CONCURRENT or 4."""
    return positive_int_env(MAX_CONCURRENT_ENV, DEFAULT_MAX_CONCURRENT)


def start_method_config() -> dict[str, Any]:
    """The multiprocess executor's start method: forkserver with preloaded modules where the
    platform has it, else `spawn` (Windows has no forkserver)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}}
    return {"spawn": {}}


def parallel_execution_config(max_concurrent: int | None = None) -> dict[str, Any]:
    """The `execution` run config of the parallel job."""
    return {
        "config": {
            "max_concurrent": max_concurrent or max_concurrent_default(),
            "start_method": start_method_config(),
        }
    }


def build_jobs() -> list[dg.UnresolvedAssetJobDefinition]:
    """Both jobs; reads NBPIPELINE_MAX_CONCURRENT (a bad value fails here, at load)."""
    sequential = dg.define_asset_job(
        SEQUENTIAL_JOB,
        selection=OUTPUT_SELECTION,
        executor_def=dg.in_process_executor,
        tags={MODE_TAG: "sequential"},
        description="Runs the four notebooks one after the other, in one process.",
    )
    parallel = dg.define_asset_job(
        PARALLEL_JOB,
        selection=OUTPUT_SELECTION,
        executor_def=dg.multiprocess_executor,
        # A default run config, not a fixed one: the launchpad shows it and can change it.
        config={"execution": parallel_execution_config()},
        tags={MODE_TAG: "parallel"},
        description=(
            "Runs the four notebooks at once, one process per step, sharing the engine "
            f"(max_concurrent defaults to {DEFAULT_MAX_CONCURRENT}; "
            f"{MAX_CONCURRENT_ENV} or run config change it)."
        ),
    )
    return [sequential, parallel]
