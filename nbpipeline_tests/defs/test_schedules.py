"""Schedule evaluation: each schedule requests a run of its job with the mode tag and config."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest

from nbpipeline import definitions
from nbpipeline.defs.schedules import SOURCE_TABLE_ENV, build_schedules, cron_for, schedule_timezone
from nbpipeline.errors import ConfigError

NOTEBOOKS = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")


def _schedules() -> dict[str, dg.ScheduleDefinition]:
    return {s.name: s for s in definitions.defs.schedules}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "job", "mode"),
    [
        ("sequential_notebooks_schedule", "sequential_notebooks", "sequential"),
        ("parallel_notebooks_schedule", "parallel_notebooks", "parallel"),
    ],
)
def test_schedule_requests_a_tagged_run(name: str, job: str, mode: str) -> None:
    schedule = _schedules()[name]
    assert schedule.job_name == job
    when = dt.datetime(2025, 3, 1, 2, 0, tzinfo=dt.UTC)
    with dg.build_schedule_context(scheduled_execution_time=when) as context:
        data = schedule.evaluate_tick(context)
    (request,) = data.run_requests
    assert request.tags["nbpipeline/mode"] == mode
    ops = request.run_config["ops"]
    assert set(ops) == set(NOTEBOOKS)
    assert ops["Notebook1"]["config"] == {}  # the notebooks' own defaults apply
    # The config is valid for the job it targets.
    job_def = definitions.defs.resolve_job_def(job)
    assert job_def.run_config_schema.config_type is not None
    from dagster._config import validate_config

    assert validate_config(job_def.run_config_schema.config_type, request.run_config).success


def test_schedule_passes_the_source_table_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SOURCE_TABLE_ENV, "sales.orders_v2")
    schedules = {s.name: s for s in build_schedules()}
    with dg.build_schedule_context() as context:
        data = schedules["parallel_notebooks_schedule"].evaluate_tick(context)
    (request,) = data.run_requests
    for notebook in NOTEBOOKS:
        assert request.run_config["ops"][notebook]["config"] == {"source_table": "sales.orders_v2"}
    assert request.tags["nbpipeline/mode"] == "parallel"


def test_schedule_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBPIPELINE_SEQUENTIAL_CRON", "30 6 * * 1-5")
    monkeypatch.setenv("NBPIPELINE_SCHEDULE_TIMEZONE", "America/New_York")
    assert cron_for("sequential") == "30 6 * * 1-5"
    assert cron_for("parallel") == "0 3 * * *"
    assert schedule_timezone() == "America/New_York"
    schedules = {s.name: s for s in build_schedules()}
    seq = schedules["sequential_notebooks_schedule"]
    assert seq.cron_schedule == "30 6 * * 1-5"
    assert seq.execution_timezone == "America/New_York"
    assert seq.default_status == dg.DefaultScheduleStatus.STOPPED


@pytest.mark.parametrize(
    ("env", "value", "match"),
    [
        ("NBPIPELINE_PARALLEL_CRON", "every day", "NBPIPELINE_PARALLEL_CRON='every day'"),
        ("NBPIPELINE_SEQUENTIAL_CRON", "0 0 31 2 *", "not a valid 5-field cron"),
        ("NBPIPELINE_SCHEDULE_TIMEZONE", "CEST+2", "not a known IANA time zone"),
        (SOURCE_TABLE_ENV, "orders; drop", "invalid source_table"),
    ],
)
def test_bad_schedule_settings(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, match: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=match):
        build_schedules()
