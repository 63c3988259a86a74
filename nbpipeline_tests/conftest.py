"""Shared fixtures: one local engine (Spark Connect + Delta) for the whole test session, a Dagster
instance per test, and the loopback Databricks workspace.

The engine gets its own NBPIPELINE_HOME under pytest's temp folder and a free port, so tests never
touch a user's data and can run beside a user's engine. Each test gets a fresh schema.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from nbpipeline_tests.helpers import JIT_ENV, SUITE_JIT_OPTIONS, free_port

if TYPE_CHECKING:
    from nbpipeline_tests.fakes.databricks_http import LoopbackDatabricks

# Timestamps collected from Spark become naive datetimes in the process time zone; the contract
# is in UTC, so the tests' own computations must be too.
os.environ["TZ"] = "UTC"
time.tzset()


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every process of this pytest run can see: the run's temp folder, or with
    pytest-xdist the folder above the workers' own (one engine serves them all)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _engine_lock(shared: Path):
    """The lock over the run's shared engine files (its port, its count of users)."""
    from filelock import FileLock

    return FileLock(str(shared / "engine.lock"))


def _engine_users(shared: Path, change: int) -> int:
    """Count the processes of the run using the engine; the last one out stops it."""
    with _engine_lock(shared):
        count = shared / "engine.users"
        users = (int(count.read_text()) if count.exists() else 0) + change
        count.write_text(str(users))
        return users


@pytest.fixture(scope="session")
def nbpipeline_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private NBPIPELINE_HOME and engine port for the whole test run (shared by its workers)."""
    shared = _shared_dir(tmp_path_factory)
    home = shared / "nbpipeline_home"
    with _engine_lock(shared):
        port_file = shared / "engine.port"
        if not port_file.exists():
            home.mkdir()
            port_file.write_text(str(free_port()))
        port = port_file.read_text()
    names = ("NBPIPELINE_HOME", "NBPIPELINE_ENGINE_PORT", "NBPIPELINE_ENGINE_CODEGEN", JIT_ENV)
    saved = {k: os.environ.get(k) for k in names}
    os.environ["NBPIPELINE_HOME"] = str(home)
    os.environ["NBPIPELINE_ENGINE_PORT"] = port
    # Test tables hold a few thousand rows, where compiling generated code costs more than it
    # saves; the contract tests turn it back on (helpers.generated_code).
    os.environ["NBPIPELINE_ENGINE_CODEGEN"] = "off"
    # The session's engine (and any JVM a test starts without options of its own) compiles only
    # code that stays hot across many tests, not each test's own queries (docs/testing.md,
    # "The JVMs' JIT").
    os.environ[JIT_ENV] = SUITE_JIT_OPTIONS
    os.environ.pop("NBPIPELINE_SPARK_REMOTE", None)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def spark(nbpipeline_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """A Spark Connect session on a local engine started once for the test run: the first
    process to need it starts it (under the engine's own start lock), the last one stops it."""
    from nbpipeline.local import engine

    shared = _shared_dir(tmp_path_factory)
    _engine_users(shared, +1)
    try:
        yield engine.get_spark()
    finally:
        if _engine_users(shared, -1) == 0:
            engine.stop()


@pytest.fixture
def schema(spark, request: pytest.FixtureRequest) -> str:
    """A fresh, empty schema for one test (the catalog analogue of tmp_path)."""
    name = f"t_{request.node.name[:20].lower()}_{uuid.uuid4().hex[:6]}"
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    spark.sql(f"CREATE SCHEMA {name}")
    return name


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A persistent Dagster instance in a fresh DAGSTER_HOME holding the project's dagster.yaml
    (per-table pools of limit 1), as `nbpipeline run` and the UI use."""
    import shutil

    import dagster as dg

    from nbpipeline.instance import PROJECT_DAGSTER_YAML

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(PROJECT_DAGSTER_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as inst:
        yield inst


# ------------------------------------------------------------------ Databricks (loopback)


@pytest.fixture
def databricks_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean environment: no SDK variables, no ~/.databrickscfg, notebooks in tmp_path."""
    # Imported on use: the Databricks SDK is slow to import and most tests never use it.
    import nbpipeline.databricks.sync as dbmod_sync
    from nbpipeline_tests.fakes.databricks_workspace import SDK_ENV, write_notebooks

    for name in SDK_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no-databrickscfg"))
    monkeypatch.setenv("NBPIPELINE_HOME", str(tmp_path / "home"))
    folder = write_notebooks(tmp_path / "notebooks")
    monkeypatch.setenv("NBPIPELINE_NOTEBOOKS_DIR", str(folder))
    # The once-per-process sync cache must not carry over between tests.
    monkeypatch.setattr(dbmod_sync, "_SYNCED", {})
    return folder


@pytest.fixture
def loopback(databricks_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackDatabricks]:
    """A running loopback workspace, with DATABRICKS_HOST / DATABRICKS_TOKEN pointing at it."""
    from nbpipeline_tests.fakes.databricks_http import LoopbackDatabricks
    from nbpipeline_tests.fakes.databricks_workspace import TOKEN

    server = LoopbackDatabricks(token=TOKEN).start()
    monkeypatch.setenv("DATABRICKS_HOST", server.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def loopback_canary(loopback: LoopbackDatabricks, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh canary token, now the only one the loopback workspace accepts and the one in
    DATABRICKS_TOKEN: a test then asserts it shows nowhere."""
    from nbpipeline_tests.fakes.databricks_workspace import canary_token

    canary = canary_token()
    loopback.token = canary
    monkeypatch.setenv("DATABRICKS_TOKEN", canary)
    return canary


@pytest.fixture(scope="session")
def job_pair(spark, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One sequential and one parallel run of the real jobs (checks included), one after the
    other on one tiny dirty source, on a private instance holding the project's dagster.yaml;
    run once for the session, asserted on by every module that needs a whole run of each job.

    {"home", "instance", "source", "seeded" (seed_orders' result), "ids" (mode -> run id)}.
    DAGSTER_HOME is set only while the runs go; a module that needs it sets it itself.
    """
    import shutil

    import dagster as dg

    from nbpipeline.instance import PROJECT_DAGSTER_YAML
    from nbpipeline.local.seed import seed_orders
    from nbpipeline.runs import build_run_config, run_pipeline_job

    home = tmp_path_factory.mktemp("job_pair_dagster_home")
    shutil.copyfile(PROJECT_DAGSTER_YAML, home / "dagster.yaml")  # pools, no telemetry
    schema = f"pair_{uuid.uuid4().hex[:8]}"
    source = f"{schema}.orders"
    seeded = seed_orders(spark, source, rows=400, seed=11, dirty=True)
    ids = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DAGSTER_HOME", str(home))
        for mode in ("sequential", "parallel"):
            result = run_pipeline_job(
                mode, build_run_config(mode, source=source), out=lambda _m: None
            )
            assert result["success"], result["error"]
            ids[mode] = result["run_id"]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield {"home": home, "instance": instance, "source": source, "seeded": seeded, "ids": ids}


#: Per-test time limits (pytest-timeout): pyproject's `timeout` for every test; tests marked
#: `slow` or `ui` (whole runs, JVM or browser starts) get this longer one unless they set their
#: own with @pytest.mark.timeout. A hang then fails one test instead of stalling the CI run.
SLOW_TIMEOUT_S = 1500


# Under pytest-xdist each group of test files below runs whole on one worker, one file after
# another: a module's fixtures run once, and files that depend on each other's work share one.
#: The files asserting on the session's `job_pair`: together, so the pair of runs is made once.
JOB_PAIR_FILES = {"test_jobs", "test_comparison"}
#: Files whose tests start trees of processes (daemons, dagster dev, runs, engines): one after
#: another on one worker while the other runs the rest (two of them at once on two cores slowed
#: each other several times over).
HEAVY_FILES = {
    "test_overlap",
    "test_overlap_postgres",
    "test_ui",
    "test_faults",
    "test_loadtest",
    "test_remote_engine",
}


def worker_group(path: str) -> str:
    """The group of the test file at `path` (a node id's file part)."""
    stem = Path(path).stem
    if stem in JOB_PAIR_FILES:
        return "job_pair"
    return "heavy" if stem in HEAVY_FILES else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` with `worker_group` as the unit. (pytest-xdist 3.8's `xdist_group` marks
    do nothing under pytest 9.2: they rename a node id attribute pytest no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    # Hand out groups in the order pytest_collection_modifyitems left them (the longest first),
    # not xdist's largest-count-first: the heavy group holds few tests but the most time.
    config.option.loadscopereorder = False

    class FileGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid.split("::", 1)[0])

    return FileGroupScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    pair_files = {i.path.stem for i in items if "job_pair" in getattr(i, "fixturenames", ())}
    if not pair_files <= JOB_PAIR_FILES:
        raise pytest.UsageError(
            f"conftest.JOB_PAIR_FILES must name every file using job_pair: add "
            f"{sorted(pair_files - JOB_PAIR_FILES)}"
        )
    # The heavy group first, then the job pair: a worker starts the longest work at once while
    # the other takes the many short files (sort is stable: files keep their order otherwise).
    first = {"heavy": 0, "job_pair": 1}
    items.sort(key=lambda item: first.get(worker_group(str(item.path)), 2))
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        if marks & {"slow", "ui"} and "timeout" not in marks:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
