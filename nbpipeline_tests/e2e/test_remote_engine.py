"""A second engine: started with `nbpipeline engine start` from an offline JAR folder, used as a
remote Spark Connect server through `NBPIPELINE_SPARK_REMOTE` by a run whose own home starts no
engine, then stopped with `nbpipeline engine stop` while it runs.

The tests share one engine of the module's own (its own NBPIPELINE_HOME and port, never the
session engine). Each starts it with README's offline command if it is not running, which costs
nothing when it is, so they pass in any order (pytest-xdist may interleave other files' tests);
in file order the last one stops it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import pytest

from nbpipeline.local import engine
from nbpipeline.local import jars as local_jars
from nbpipeline.settings import PROJECT_ROOT
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests.helpers import (
    JIT_ENV,
    RUN_TIMEOUT_S,
    SHORT_JVM_OPTIONS,
    assert_matches_contract,
    free_port,
    latest_version,
)

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def _cli(*argv: str, env: dict[str, str], timeout: float = RUN_TIMEOUT_S):
    return subprocess.run(
        [sys.executable, "-m", "nbpipeline.cli", *argv],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _session(url: str):
    """A Spark Connect session of the test's own (stopped by the caller, so that no client in
    this process is left pointing at the engine the last test stops)."""
    from pyspark.sql import SparkSession

    return SparkSession.builder.remote(url).create()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The second engine's environment: its home, port, an offline JAR folder (a copy of the
    resolved JARs) and an empty JAR cache, so the JARs can come from the folder only."""
    root = tmp_path_factory.mktemp("second_engine")
    saved = os.environ.pop("NBPIPELINE_DELTA_JARS", None)
    try:
        resolved = local_jars.resolve_jars()  # the per-user cache, resolved once by the session
    finally:
        if saved is not None:
            os.environ["NBPIPELINE_DELTA_JARS"] = saved
    jars = root / "delta-jars"
    jars.mkdir()
    for jar in resolved:
        (jars / jar.name).symlink_to(jar)
    env = {
        **os.environ,
        "NBPIPELINE_HOME": str(root / "home"),
        "NBPIPELINE_ENGINE_PORT": str(free_port()),
        "NBPIPELINE_ENGINE_MEMORY": "1g",
        "NBPIPELINE_CACHE_DIR": str(root / "empty_cache"),
        JIT_ENV: SHORT_JVM_OPTIONS,  # this module's engine lives about two minutes
    }
    env.pop("NBPIPELINE_SPARK_REMOTE", None)
    env.pop("NBPIPELINE_DELTA_JARS", None)
    info: dict[str, Any] = {"env": env, "jars": jars, "root": root}
    yield info
    _cli("engine", "stop", env=env, timeout=120)  # a test that failed before the stop test


def _running_url(second: dict[str, Any]) -> str:
    """The module's engine URL, after starting it as the first test does if it is not running
    (the start only prints the URL when it is)."""
    env = {**second["env"], "NBPIPELINE_DELTA_JARS": str(second["jars"])}
    started = _cli("engine", "start", env=env)
    assert started.returncode == 0, started.stderr
    return started.stdout.strip()


def test_engine_starts_from_an_offline_jar_folder(second: dict[str, Any]) -> None:
    """README's offline set-up: `export NBPIPELINE_DELTA_JARS=...` then `nbpipeline engine
    start`: the JVM gets exactly the folder's JARs (the cache stays empty) and Delta works."""
    env = second["env"]
    started = _cli("engine", "start", env={**env, "NBPIPELINE_DELTA_JARS": str(second["jars"])})
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert url == f"sc://127.0.0.1:{env['NBPIPELINE_ENGINE_PORT']}"
    status = json.loads(_cli("engine", "status", "--json", env=env).stdout)
    assert status["running"] and status["url"] == url
    cmdline = psutil.Process(status["pid"]).cmdline()
    jars = cmdline[cmdline.index("--jars") + 1].split(",")
    assert sorted(jars) == sorted(str(p) for p in second["jars"].iterdir())
    assert not Path(env["NBPIPELINE_CACHE_DIR"]).exists() or not any(
        Path(env["NBPIPELINE_CACHE_DIR"]).rglob("*.jar")
    )
    spark = _session(url)
    try:
        table = f"offline_{uuid.uuid4().hex[:6]}.t"
        spark.sql(f"CREATE SCHEMA {table.split('.')[0]}")
        spark.sql(f"CREATE TABLE {table} (id INT) USING DELTA")
        spark.sql(f"INSERT INTO {table} VALUES (1), (2)")
        rows = spark.sql(f"SELECT id FROM {table} ORDER BY id").collect()
        assert [r["id"] for r in rows] == [1, 2]
        assert latest_version(spark, table) == 1
    finally:
        spark.stop()


@pytest.mark.dagster
def test_remote_engine_runs_the_pipeline_and_no_local_engine_starts(
    second: dict[str, Any],
    tmp_path: Path,
    instance: dg.DagsterInstance,
    request: pytest.FixtureRequest,
) -> None:
    """`NBPIPELINE_SPARK_REMOTE=sc://...`: seeding and a parallel run go to that server; the
    run's own NBPIPELINE_HOME gets no engine (no state, nothing on its port) and the outputs,
    read on the remote server, meet the contract."""
    url = _running_url(second)
    home = tmp_path / "client_home"
    port = free_port()
    env = {
        **os.environ,
        "NBPIPELINE_SPARK_REMOTE": url,
        "NBPIPELINE_HOME": str(home),
        "NBPIPELINE_ENGINE_PORT": str(port),
        "DAGSTER_HOME": instance.root_directory,
    }
    schema = f"remote_{uuid.uuid4().hex[:6]}"
    source = f"{schema}.orders"
    spark = _session(url)
    request.addfinalizer(spark.stop)
    spark.sql(f"CREATE SCHEMA {schema}")
    seeded = _cli("seed", "--rows", "400", "--seed", "5", "--dirty", "--table", source, env=env)
    assert seeded.returncode == 0, seeded.stderr
    run = _cli("run", "parallel", "--source", source, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Starting the local Spark engine" not in seeded.stderr + run.stderr
    run_id = run.stdout.strip().splitlines()[-1]
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
    # No local engine: no state under the run's home, nothing listening on its port.
    assert not (home / "engine" / "server.json").exists()
    assert not _listening(port)
    assert spark.catalog.tableExists(source)
    assert_matches_contract(spark, schema, source, tuple(OUTPUT_TABLES))


def test_engine_stop_stops_a_running_engine(second: dict[str, Any]) -> None:
    """`nbpipeline engine stop` on a running engine: the JVM ends, its port closes, its state
    file goes and `status` says stopped."""
    env = second["env"]
    _running_url(second)
    pid = json.loads(_cli("engine", "status", "--json", env=env).stdout)["pid"]
    assert engine.engine_alive(pid)
    stopped = _cli("engine", "stop", env=env, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert "Stopped the local engine." in stopped.stderr
    assert not engine.engine_alive(pid)
    assert not _listening(int(env["NBPIPELINE_ENGINE_PORT"]))
    assert not (Path(env["NBPIPELINE_HOME"]) / "engine" / "server.json").exists()
    status = json.loads(_cli("engine", "status", "--json", env=env).stdout)
    assert not status["running"]
    again = _cli("engine", "stop", env=env, timeout=120)
    assert again.returncode == 0 and "was not running" in again.stderr
