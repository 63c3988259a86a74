"""Schedules for both jobs, stopped until someone turns them on.

Cron and time zone come from the environment (checked when the definitions load):
NBPIPELINE_SEQUENTIAL_CRON (default 02:00 daily), NBPIPELINE_PARALLEL_CRON (default 03:00 daily),
NBPIPELINE_SCHEDULE_TIMEZONE (default UTC). Each run request carries the mode tag and the
notebook parameters as run config (defaults, or NBPIPELINE_SOURCE_TABLE for the source).
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from nbpipeline.cron import check_cron, check_timezone
from nbpipeline.defs.assets import op_config
from nbpipeline.defs.source import SOURCE_TABLE_ENV
from nbpipeline.defs.tags import JOB_BY_MODE, MODE_TAG, PARALLEL_JOB, SEQUENTIAL_JOB

SEQUENTIAL_CRON_ENV = "NBPIPELINE_SEQUENTIAL_CRON"
PARALLEL_CRON_ENV = "NBPIPELINE_PARALLEL_CRON"
TIMEZONE_ENV = "NBPIPELINE_SCHEDULE_TIMEZONE"
DEFAULT_CRONS = {"sequential": "0 2 * * *", "parallel": "0 3 * * *"}
DEFAULT_TIMEZONE = "UTC"
SCHEDULE_NAMES = {
    "sequential": f"{SEQUENTIAL_JOB}_schedule",
    "parallel": f"{PARALLEL_JOB}_schedule",
}
_CRON_ENVS = {"sequential": SEQUENTIAL_CRON_ENV, "parallel": PARALLEL_CRON_ENV}


def cron_for(mode: str) -> str:
    """The cron string of a mode's schedule; an invalid one is a ConfigError naming the variable."""
    env = _CRON_ENVS[mode]
    value = os.environ.get(env, "").strip() or DEFAULT_CRONS[mode]
    return check_cron(value, setting=env)


def schedule_timezone() -> str:
    """The schedules' IANA time zone; an unknown one is a ConfigError naming the variable."""
    value = os.environ.get(TIMEZONE_ENV, "").strip() or DEFAULT_TIMEZONE
    return check_timezone(value, setting=TIMEZONE_ENV)


def scheduled_run_config() -> dict[str, Any]:
    """Run config of a scheduled run: NBPIPELINE_SOURCE_TABLE as the source, if set."""
    source = os.environ.get(SOURCE_TABLE_ENV, "").strip()
    return {"ops": op_config({"source_table": source} if source else None)}


def _schedule(mode: str) -> dg.ScheduleDefinition:
    # Read once at load, so a bad source name fails there rather than at every tick.
    run_config = scheduled_run_config()

    def _evaluate(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        return dg.RunRequest(run_config=run_config, tags={MODE_TAG: mode})

    return dg.schedule(
        cron_schedule=cron_for(mode),
        name=SCHEDULE_NAMES[mode],
        job_name=JOB_BY_MODE[mode],
        execution_timezone=schedule_timezone(),
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Runs {JOB_BY_MODE[mode]} on a cron schedule (env {_CRON_ENVS[mode]}).",
    )(_evaluate)


def build_schedules() -> list[dg.ScheduleDefinition]:
    """Both schedules; reads (and checks) the cron and time zone variables."""
    return [_schedule("sequential"), _schedule("parallel")]
