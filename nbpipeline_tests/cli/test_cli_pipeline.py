"""`nbpipeline run` and `nbpipeline ui`: bad input exits 2 before launching, a failed run exits 1.

Successful `nbpipeline run sequential` / `run parallel` commands (run id printed, run in the
instance, progress per step) are exercised by e2e/test_overlap.py's overlapping-runs test, which
launches both at once; running them here again would double the suite's slowest part.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from nbpipeline import cli
from nbpipeline.errors import ConfigError
from nbpipeline.instance import PROJECT_DAGSTER_YAML, default_dagster_home, ensure_dagster_home
from nbpipeline.runs import build_run_config


def test_unknown_param_exits_2_before_launching(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "never_created")}
    proc = subprocess.run(
        [sys.executable, "-m", "nbpipeline.cli", "run", "parallel", "--param", "bogus=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bogus" in proc.stderr and proc.stderr.startswith("error: ")
    assert proc.stdout == ""
    assert not (tmp_path / "never_created").exists()  # nothing was launched


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "sequential", "--source", "a b"], "invalid source_table 'a b'"),
        (["run", "parallel", "--param", "high_value_threshold=lots"], "high_value_threshold"),
        (["run", "parallel", "--param", "nokey"], "expected key=value"),
        (
            ["run", "sequential", "--max-concurrent", "2"],
            "applies to `nbpipeline run parallel` only",
        ),
        (["run", "parallel", "--max-concurrent", "0"], "--max-concurrent 0"),
    ],
)
def test_bad_input_exits_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_config_from_options() -> None:
    config = build_run_config(
        "parallel",
        source="s.orders",
        params={"high_value_threshold": "250.5", "target_schema": "out"},
        max_concurrent=2,
        timeout_seconds=600,
    )
    assert config["ops"]["Notebook1"]["config"] == {
        "source_table": "s.orders",
        "target_schema": "out",
        "timeout_seconds": 600,
    }
    assert config["ops"]["Notebook4"]["config"]["high_value_threshold"] == "250.5"
    assert config["execution"]["config"]["max_concurrent"] == 2
    # Without the option the parallel run still spells out the job's executor config: subsets
    # of the job (op selections, re-executions) do not inherit the job's default config.
    default = build_run_config("parallel", source="s.orders")["execution"]["config"]
    assert default["max_concurrent"] == 4
    assert "forkserver" in default["start_method"]
    assert "execution" not in build_run_config("sequential", source="s.orders")
    with pytest.raises(ConfigError, match="disagree"):
        build_run_config("sequential", source="a.b", params={"source_table": "c.d"})


def test_dagster_home_defaults_under_nbpipeline_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBPIPELINE_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", "placeholder")  # restored after the test
    monkeypatch.delenv("DAGSTER_HOME")
    said: list[str] = []
    home = ensure_dagster_home(said.append)
    assert home == default_dagster_home() == tmp_path.resolve() / "dagster_home"
    assert (home / "dagster.yaml").read_text() == PROJECT_DAGSTER_YAML.read_text()
    assert os.environ["DAGSTER_HOME"] == str(home)
    assert "DAGSTER_HOME is not set" in said[0] and str(home) in said[0]
    # A dagster.yaml already there is the user's: left alone.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.delenv("DAGSTER_HOME")
    ensure_dagster_home()
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"


def test_ui_runs_dagster_dev_on_the_same_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nbpipeline ui` starts `dagster dev` with the workspace and DAGSTER_HOME (not waited for:
    the command line is checked by intercepting the process start)."""
    import nbpipeline.cli.pipeline as cp

    started: dict = {}

    class FakePopen:
        def __init__(self, cmd, cwd, env):
            started.update(cmd=cmd, cwd=cwd, env=env)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(cp.subprocess, "Popen", FakePopen)
    # The first-run seeding (it starts the engine) has tests of its own.
    monkeypatch.setattr(cp, "seed_default_source_if_missing", lambda run_config: None)
    monkeypatch.setenv("NBPIPELINE_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", "placeholder")
    monkeypatch.delenv("DAGSTER_HOME")
    assert cli.main(["ui", "--port", "3999"]) == 0
    assert started["cmd"][1:4] == ["-m", "dagster", "dev"]
    assert started["cmd"][started["cmd"].index("-w") + 1].endswith("workspace.yaml")
    assert "3999" in started["cmd"]
    assert started["env"]["DAGSTER_HOME"] == str(tmp_path.resolve() / "dagster_home")
    assert Path(started["cwd"]) == PROJECT_DAGSTER_YAML.parent


def test_pools_exist_with_one_slot_before_any_run(tmp_path: Path) -> None:
    """Three processes getting the instance at once (as three `nbpipeline run` would) leave
    exactly one slot per pool: Dagster's lazy creation on first claim can race on SQLite."""
    from nbpipeline.instance import pool_names

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(PROJECT_DAGSTER_YAML, home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)):
        pass  # create the storage once, as a first command would
    code = "from nbpipeline.instance import get_instance; get_instance()"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env={**os.environ, "DAGSTER_HOME": str(home)}
        )
        for _ in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert pool_names() == [
            "nbpipeline/Notebook1",
            "nbpipeline/Notebook2",
            "nbpipeline/Notebook3",
            "nbpipeline/Notebook4",
        ]
        for pool in pool_names():
            info = instance.event_log_storage.get_concurrency_info(pool)
            assert info.slot_count == 1, pool


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.dagster
def test_failed_run_exits_1_with_the_step_error(spark, schema: str, tmp_path: Path) -> None:
    """A source without the contract's columns: the notebooks fail, the run fails, exit 1."""
    spark.sql(f"CREATE TABLE {schema}.orders (order_id BIGINT) USING DELTA")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(PROJECT_DAGSTER_YAML, home / "dagster.yaml")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbpipeline.cli",
            "run",
            "sequential",
            "--source",
            f"{schema}.orders",
        ],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.strip()  # the run id, even for a failed run
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step Notebook")
    assert "missing column(s)" in last
    assert "will retry" not in proc.stderr  # a data error is not retried
