"""Bad input the other modules do not cover, as the user meets it.

test_notebook_input.py covers bad sources and notebook parameters, test_assets.py bad run config
values refused before any notebook runs, test_definitions.py / test_schedules.py bad settings at
load. Here: the same load-time settings through `nbpipeline run` (one `error:` line, no
traceback, nothing launched), and the step timeout given with the wrong type or range.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from nbpipeline import cli
from nbpipeline.defs.assets import ALL_ASSETS, op_config
from nbpipeline.errors import ConfigError
from nbpipeline.runs import run_pipeline_job
from nbpipeline_tests.fakes.backend import CALLS, FakeBackend


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"NBPIPELINE_BACKEND": "databricks", "DATABRICKS_HOST": ""},
            "error: host: no Databricks workspace URL (environment variable DATABRICKS_HOST is "
            "not set)",
        ),
        (
            {"NBPIPELINE_SCHEDULE_TIMEZONE": "Mars/Olympus"},
            "error: NBPIPELINE_SCHEDULE_TIMEZONE='Mars/Olympus' is not a known IANA time zone",
        ),
    ],
)
def test_bad_settings_stop_nbpipeline_run_with_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    home = tmp_path / "dagster_home"
    proc = subprocess.run(
        [sys.executable, "-m", "nbpipeline.cli", "run", "parallel"],
        env={**os.environ, "DAGSTER_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not home.exists()  # no instance, no run


def test_timeout_of_wrong_type_is_refused_before_any_run(
    instance: dg.DagsterInstance,
) -> None:
    run_config = {"ops": op_config({"source_table": "s.orders"})}
    run_config["ops"]["Notebook1"]["config"]["timeout_seconds"] = "soon"
    with pytest.raises(ConfigError) as err:
        run_pipeline_job("sequential", run_config, out=lambda _m: None)
    assert str(err.value).startswith("invalid run config:")
    assert "\n" not in str(err.value)
    assert not instance.get_runs()


def test_timeout_out_of_range_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "parallel", "--timeout", "0"]) == 2
    assert "invalid --timeout 0: expected seconds > 0" in capsys.readouterr().err
    # Through run config (the launchpad) the step refuses it before the notebook starts.
    CALLS.clear()
    result = dg.materialize(
        [*ALL_ASSETS],
        selection=dg.AssetSelection.assets("daily_sales"),
        resources={"notebook_backend": FakeBackend()},
        run_config={
            "ops": op_config(
                {"source_table": "s.orders"}, notebooks=("Notebook1",), timeout_seconds=-5
            )
        },
        raise_on_error=False,
    )
    assert not result.success and CALLS == {}
    (failure,) = result.get_step_failure_events()
    description = failure.step_failure_data.user_failure_data.description
    assert description == "Notebook1: timeout_seconds must be > 0, got -5"
