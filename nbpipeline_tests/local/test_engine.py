"""The local engine's settings and JAR resolution errors (no JVM needed for these)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbpipeline.errors import EngineError, JarsError
from nbpipeline.local import engine, jars


def test_coordinate_matches_installed_pyspark_and_delta() -> None:
    import importlib.metadata

    import pyspark

    coord = jars.delta_coordinate()
    minor = ".".join(pyspark.__version__.split(".")[:2])
    assert coord == f"io.delta:delta-spark_{minor}_2.13:{importlib.metadata.version('delta-spark')}"


def test_offline_jars_folder_missing_delta_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "unrelated-1.0.jar").write_bytes(b"")
    monkeypatch.setenv("NBPIPELINE_DELTA_JARS", str(tmp_path))
    with pytest.raises(JarsError) as err:
        jars.resolve_jars()
    message = str(err.value)
    artifact = jars.delta_coordinate().split(":")[1]
    assert f"lacks the Delta Lake JAR(s) {artifact}, delta-storage" in message
    assert "mvn dependency:copy" in message and "NBPIPELINE_DELTA_JARS" in message


def test_offline_jars_folder_is_used_as_is(tmp_path: Path, monkeypatch) -> None:
    version = jars.delta_coordinate().split(":")[2]
    artifact = jars.delta_coordinate().split(":")[1]
    for name in (f"{artifact}-{version}.jar", f"delta-storage-{version}.jar"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("NBPIPELINE_DELTA_JARS", str(tmp_path))
    assert [p.name for p in jars.resolve_jars()] == sorted(p.name for p in tmp_path.iterdir())


def test_not_a_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NBPIPELINE_DELTA_JARS", str(tmp_path / "nope"))
    with pytest.raises(JarsError, match="is not a folder"):
        jars.resolve_jars()


def test_artifact_names() -> None:
    assert jars.artifact_name(Path("org.apache.parquet_parquet-column-1.16.0.jar")) == (
        "parquet-column"
    )
    assert jars.artifact_name(Path("io.delta_delta-spark_4.2_2.13-4.4.0.jar")) == (
        "delta-spark_4.2_2.13"
    )
    assert jars.artifact_name(Path("delta-storage-4.4.0.jar")) == "delta-storage"
    assert jars.artifact_name(Path("hadoop-client-api-3.5.0.jar")) == "hadoop-client-api"


def test_bad_port_and_remote(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NBPIPELINE_HOME", str(tmp_path))
    monkeypatch.setenv("NBPIPELINE_ENGINE_PORT", "http")
    with pytest.raises(EngineError, match="NBPIPELINE_ENGINE_PORT='http' is not a port"):
        engine.EngineConfig.from_env()
    with pytest.raises(EngineError, match="must start with sc://"):
        engine.engine_url("http://localhost:15002")


def test_engine_memory_is_checked_before_the_jvm_sees_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NBPIPELINE_HOME", str(tmp_path))
    monkeypatch.delenv("NBPIPELINE_ENGINE_MEMORY", raising=False)
    assert engine.EngineConfig.from_env().driver_memory == engine.DEFAULT_MEMORY
    monkeypatch.setenv("NBPIPELINE_ENGINE_MEMORY", "1536m")
    assert engine.EngineConfig.from_env().driver_memory == "1536m"
    for bad in ("lots", "2 g", "0g", "-1g"):
        monkeypatch.setenv("NBPIPELINE_ENGINE_MEMORY", bad)
        with pytest.raises(EngineError, match="is not a JVM memory size"):
            engine.EngineConfig.from_env()


def test_generated_code_is_on_unless_switched_off(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NBPIPELINE_HOME", str(tmp_path))
    monkeypatch.delenv("NBPIPELINE_ENGINE_CODEGEN", raising=False)
    conf = engine.EngineConfig.from_env().spark_conf()
    assert "spark.sql.codegen.wholeStage" not in conf
    monkeypatch.setenv("NBPIPELINE_ENGINE_CODEGEN", "OFF")
    conf = engine.EngineConfig.from_env().spark_conf()
    assert conf["spark.sql.codegen.wholeStage"] == "false"
    assert conf["spark.sql.codegen.factoryMode"] == "NO_CODEGEN"
    assert engine.NO_CODEGEN_CONF.items() <= conf.items()
    monkeypatch.setenv("NBPIPELINE_ENGINE_CODEGEN", "fast")
    with pytest.raises(EngineError, match="NBPIPELINE_ENGINE_CODEGEN='fast' is not on or off"):
        engine.EngineConfig.from_env()


@pytest.mark.spark
def test_the_tests_engine_runs_interpreted_and_generated_code_can_be_switched_back(spark) -> None:
    from nbpipeline_tests.helpers import generated_code

    assert spark.conf.get("spark.sql.codegen.wholeStage") == "false"
    query = "SELECT SUM(id * 2) AS x FROM range(10)"

    def plan() -> str:
        # Adaptive execution plans code generation per stage when it runs, so EXPLAIN shows it
        # only without it.
        spark.conf.set("spark.sql.adaptive.enabled", "false")
        try:
            return spark.sql(f"EXPLAIN {query}").collect()[0][0]
        finally:
            spark.conf.set("spark.sql.adaptive.enabled", "true")

    # Whole-stage generated code shows as `*(n)` operators in the physical plan.
    assert "*(" not in plan()
    assert spark.sql(query).collect()[0]["x"] == 90
    with generated_code(spark):
        assert "*(" in plan()
        assert spark.sql(query).collect()[0]["x"] == 90
    assert spark.conf.get("spark.sql.codegen.wholeStage") == "false"


def test_config_keeps_everything_under_home(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NBPIPELINE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("NBPIPELINE_ENGINE_PORT", "15999")
    config = engine.EngineConfig.from_env()
    conf = config.spark_conf()
    assert config.url == "sc://127.0.0.1:15999"
    assert conf["spark.connect.grpc.binding.address"] == "127.0.0.1"
    assert conf["spark.sql.warehouse.dir"].startswith(str(tmp_path / "h"))
    assert (
        str(tmp_path / "h" / "metastore_db") in conf["spark.hadoop.javax.jdo.option.ConnectionURL"]
    )
    assert conf["spark.sql.session.timeZone"] == "UTC"


def test_engine_port_taken_is_one_line_with_a_hint(tmp_path: Path, monkeypatch) -> None:
    """README's 'engine port taken': another program listens on the engine's port, so neither
    `engine.start` nor `nbpipeline engine start` starts a JVM; the CLI says so in one line."""
    import socket
    import subprocess
    import sys

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        monkeypatch.setenv("NBPIPELINE_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("NBPIPELINE_ENGINE_PORT", str(port))
        monkeypatch.delenv("NBPIPELINE_SPARK_REMOTE", raising=False)
        with pytest.raises(EngineError, match=f"port {port} is in use by another program"):
            engine.start()
        proc = subprocess.run(
            [sys.executable, "-m", "nbpipeline.cli", "engine", "start"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    error, hint = proc.stderr.strip().splitlines()
    assert error.startswith(f"error: port {port} is in use by another program")
    assert hint.startswith("hint: set NBPIPELINE_ENGINE_PORT")
    assert not engine.status()["running"]
    assert not (tmp_path / "home" / "engine" / "server.json").exists()


@pytest.mark.spark
def test_running_engine_status_and_start_reuses_it(spark, nbpipeline_home: Path) -> None:
    info = engine.status()
    assert info["running"] and info["home"] == str(nbpipeline_home)
    assert info["url"] == engine.EngineConfig.from_env().url
    # Starting again reuses the running server.
    assert engine.start() == info["url"]
    assert engine.status()["pid"] == info["pid"]
