"""The local engine: one Spark Connect server with Delta Lake, shared by every process.

A local Spark JVM takes seconds to start and an embedded Derby metastore admits one JVM at a
time, so nbpipeline treats the local engine like a small shared cluster (as Databricks is): one
Spark Connect server per `NBPIPELINE_HOME`, started on demand, reused by every notebook, test and
Dagster step process, and stoppable with `nbpipeline engine stop`. Clients connect in well under a
second. `NBPIPELINE_SPARK_REMOTE=sc://host:port` points everything at another Spark Connect server
instead, so the same code can use a bigger Spark.

State lives in `<home>/engine/`: `server.json` (pid, port, url), `server.log`, a lock file that
serialises starts, and Spark's scratch space. Tables live in `<home>/warehouse`, the metastore in
`<home>/metastore_db`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from nbpipeline import reachability, settings
from nbpipeline.errors import EngineError, EngineGoneError
from nbpipeline.local import jars
from nbpipeline.redact import redact

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
DEFAULT_PORT = 15002
START_TIMEOUT_S = 180.0
_START_NOTE_EVERY_S = 15.0  # how often a slow engine start says it is still going
# Client sessions of this process, by Spark Connect URL.
_sessions: dict[str, SparkSession] = {}


def _log_progress(message: str) -> None:
    log.info(message)


# --------------------------------------------------------------------------- the server


#: The engine JVM's heap. Spark spills what does not fit, so the heap sets speed, not size
#: limits; 1g keeps a laptop's engine small (raise it for tens of millions of rows).
DEFAULT_MEMORY = "1g"


#: NBPIPELINE_ENGINE_CODEGEN=off: interpreted evaluation. On tables of a few thousand rows
#: compiling the generated code costs more than it saves (docs/performance.md has the crossover).
NO_CODEGEN_CONF = {
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.codegen.factoryMode": "NO_CODEGEN",
}


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the local engine, read from the environment."""

    home: Path
    host: str
    port: int
    driver_memory: str
    cores: str
    ui: bool
    codegen: bool = True

    @classmethod
    def from_env(cls) -> EngineConfig:
        raw_port = os.environ.get("NBPIPELINE_ENGINE_PORT", str(DEFAULT_PORT))
        try:
            port = int(raw_port)
            if not 1 <= port <= 65535:
                raise ValueError
        except ValueError:
            raise EngineError(
                f"NBPIPELINE_ENGINE_PORT={raw_port!r} is not a port number (1-65535)"
            ) from None
        memory = os.environ.get("NBPIPELINE_ENGINE_MEMORY", "").strip() or DEFAULT_MEMORY
        if not re.fullmatch(r"[1-9]\d*[kmgKMG]?", memory):
            raise EngineError(
                f"NBPIPELINE_ENGINE_MEMORY={memory!r} is not a JVM memory size such as 1g or 1536m"
            )
        raw_codegen = os.environ.get("NBPIPELINE_ENGINE_CODEGEN", "").strip().lower() or "on"
        if raw_codegen not in ("on", "off"):
            raise EngineError(f"NBPIPELINE_ENGINE_CODEGEN={raw_codegen!r} is not on or off")
        return cls(
            home=settings.home(),
            host="127.0.0.1",
            port=port,
            driver_memory=memory,
            cores=os.environ.get("NBPIPELINE_ENGINE_CORES", "*"),
            ui=os.environ.get("NBPIPELINE_ENGINE_UI", "") in ("1", "true", "yes"),
            codegen=raw_codegen == "on",
        )

    @property
    def state_dir(self) -> Path:
        path = self.home / "engine"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        return f"sc://{self.host}:{self.port}"

    def spark_conf(self) -> dict[str, str]:
        """Spark settings of the server: Delta, a persistent metastore, small-shuffle sizing."""
        home = self.home
        conf = {
            "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
            "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
            # A Hive metastore on embedded Derby keeps schema.table names across restarts; only
            # this one JVM opens it, which is what Derby allows.
            "spark.sql.catalogImplementation": "hive",
            "spark.hadoop.javax.jdo.option.ConnectionURL": (
                f"jdbc:derby:;databaseName={home / 'metastore_db'};create=true"
            ),
            "spark.sql.warehouse.dir": str(home / "warehouse"),
            "spark.driver.extraJavaOptions": f"-Dderby.system.home={self.state_dir}",
            "spark.local.dir": str(self.state_dir / "tmp"),
            "spark.connect.grpc.binding.address": self.host,
            "spark.connect.grpc.binding.port": str(self.port),
            "spark.ui.enabled": "true" if self.ui else "false",
            "spark.sql.session.timeZone": "UTC",
            # Notebook-sized jobs: few shuffle partitions, AQE to coalesce, and FAIR scheduling so
            # concurrent notebooks from several clients share the cores instead of queueing.
            "spark.sql.shuffle.partitions": "8",
            "spark.sql.adaptive.enabled": "true",
            "spark.scheduler.mode": "FAIR",
            "spark.databricks.delta.snapshotPartitions": "4",
            # INFO logging of every gRPC call costs measurable time on small jobs.
            "spark.log.level": "WARN",
        }
        if not self.codegen:
            conf.update(NO_CODEGEN_CONF)
        return conf


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process still answers kill(0); treat it as gone.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    # So does a dead engine whose parent (the process that started it, e.g. a step process or
    # a test) has not reaped it yet; every other process must see it as gone too.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@contextlib.contextmanager
def _start_lock(config: EngineConfig) -> Iterator[None]:
    # filelock, not fcntl: this module is imported when the definitions load, on any platform.
    from filelock import FileLock

    with FileLock(str(config.state_dir / "start.lock")):
        yield


def _read_state(config: EngineConfig) -> dict | None:
    path = config.state_dir / "server.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def status(config: EngineConfig | None = None) -> dict:
    """What the local engine is doing: running, pid, url, home, log file."""
    config = config or EngineConfig.from_env()
    state = _read_state(config) or {}
    pid = state.get("pid")
    running = pid is not None and _pid_alive(pid) and _port_open(config.host, state.get("port", 0))
    return {
        "running": running,
        "pid": pid if running else None,
        "url": state.get("url", config.url) if running else config.url,
        "home": str(config.home),
        "log": str(config.state_dir / "server.log"),
        "started_at": state.get("started_at") if running else None,
        "remote": redact(os.environ.get("NBPIPELINE_SPARK_REMOTE")) or None,
    }


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    interesting = [ln for ln in text if "ERROR" in ln or "Exception" in ln or "Caused by" in ln]
    return "\n".join((interesting or text)[-lines:])


def start(config: EngineConfig | None = None, progress: Progress | None = None) -> str:
    """Start the local engine unless it runs already; return its Spark Connect URL."""
    config = config or EngineConfig.from_env()
    progress = progress or _log_progress
    with _start_lock(config):
        current = status(config)
        if current["running"]:
            return current["url"]
        if _port_open(config.host, config.port):
            raise EngineError(
                f"port {config.port} is in use by another program (or an engine of another "
                f"NBPIPELINE_HOME)",
                hint="set NBPIPELINE_ENGINE_PORT to a free port, or stop that program",
            )
        jar_paths = jars.resolve_jars(progress)
        logfile = config.state_dir / "server.log"
        (config.state_dir / "tmp").mkdir(exist_ok=True)
        cmd = [
            str(jars.spark_home() / "bin" / "spark-submit"),
            "--class",
            "org.apache.spark.sql.connect.service.SparkConnectServer",
            "--name",
            "nbpipeline-engine",
            "--master",
            f"local[{config.cores}]",
            "--driver-memory",
            config.driver_memory,
            "--jars",
            ",".join(str(j) for j in jar_paths),
        ]
        for key, value in config.spark_conf().items():
            cmd += ["--conf", f"{key}={value}"]
        cmd.append("spark-internal")
        env = {
            **os.environ,
            "SPARK_HOME": str(jars.spark_home()),
            "PYSPARK_PYTHON": sys.executable,
            # glibc gives each thread that mallocs its own arena; the server's many gRPC and task
            # threads then hold hundreds of MB outside the heap. Two arenas are plenty here.
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
        }
        progress(f"Starting the local Spark engine on {config.url} (home {config.home}) ...")
        started = time.monotonic()
        with open(logfile, "ab") as out:
            # Own session: the server outlives the command that started it and is stopped as a
            # process group by `nbpipeline engine stop`.
            proc = subprocess.Popen(
                cmd,
                cwd=config.state_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        state = {
            "pid": proc.pid,
            "port": config.port,
            "url": config.url,
            "started_at": time.time(),
            "log": str(logfile),
        }
        (config.state_dir / "server.json").write_text(json.dumps(state))
        deadline = started + START_TIMEOUT_S
        next_note = _START_NOTE_EVERY_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EngineError(
                    f"the local engine exited during start-up (code {proc.returncode}); "
                    f"last log lines:\n{_log_tail(logfile)}",
                    hint=f"see {logfile}; once fixed, run `nbpipeline engine start`",
                )
            if _port_open(config.host, config.port):
                break
            time.sleep(0.25)
            waited = time.monotonic() - started
            if waited >= next_note:
                # A JVM start is seconds on an idle laptop but can take a minute on a busy one.
                progress(f"  ... still starting ({waited:.0f}s; log: {logfile})")
                next_note += _START_NOTE_EVERY_S
        else:
            stop(config)
            raise EngineError(
                f"the local engine did not open port {config.port} within {START_TIMEOUT_S:.0f}s",
                hint=f"see {logfile}; then `nbpipeline engine start` (a busy machine may need "
                "a second try)",
            )
        progress(f"Local Spark engine ready in {time.monotonic() - started:.1f}s")
        return config.url


def stop(config: EngineConfig | None = None, timeout_s: float = 20.0) -> bool:
    """Stop the local engine (its whole process group). Returns whether one was running."""
    config = config or EngineConfig.from_env()
    # Close this process's sessions first: a client left pointing at a stopped server keeps
    # retrying it (minutes) when the interpreter exits.
    for url in [u for u in _sessions if u == config.url]:
        with contextlib.suppress(Exception):
            _sessions.pop(url).stop()
    state = _read_state(config)
    if not state or not state.get("pid") or not _pid_alive(state["pid"]):
        (config.state_dir / "server.json").unlink(missing_ok=True)
        return False
    pid, port = state["pid"], int(state.get("port") or config.port)

    def running() -> bool:
        # The port too: a Python worker the JVM started can hold its socket for a moment after
        # the JVM is gone, and a start right after the stop would find the port taken.
        return _pid_alive(pid) or _port_open(config.host, port)

    def gone_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if not gone_within(timeout_s):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        gone_within(5.0)
    (config.state_dir / "server.json").unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------- client sessions


def engine_url(remote: str | None = None) -> str:
    """The Spark Connect URL notebooks use: an explicit remote, `NBPIPELINE_SPARK_REMOTE`, or
    the local engine (not started by this call)."""
    remote = remote or os.environ.get("NBPIPELINE_SPARK_REMOTE")
    if remote:
        if not remote.startswith("sc://"):
            raise EngineError(f"Spark Connect URL {remote!r} must start with sc://")
        return remote
    return EngineConfig.from_env().url


def get_spark(
    remote: str | None = None,
    *,
    autostart: bool = True,
    progress: Progress | None = None,
    session_id: str | None = None,
) -> SparkSession:
    """A Spark Connect session on the engine, starting the local engine on first use.

    One session per process and URL (pyspark caches it); a session whose server went away is
    replaced, so a restarted engine is picked up by long-lived processes. `session_id` (a UUID)
    attaches to that server-side session, which several processes may share.
    """
    from pyspark.sql import SparkSession

    url = remote or os.environ.get("NBPIPELINE_SPARK_REMOTE")
    if url:
        url = engine_url(url)
        # A wrong address or port is reported in seconds instead of after the client's retries.
        reachability.check_spark_remote(url)
    elif autostart:
        url = start(progress=progress)
    else:
        url = engine_url()
        if not status()["running"]:
            raise EngineError(
                "the local engine is not running", hint="start it with `nbpipeline engine start`"
            )
    # The local engine's pid (None for a remote one) lets a client stop retrying as soon as the
    # engine process is gone, instead of retrying a dead port for the whole retry budget.
    pid = local_engine_pid(remote)
    if session_id:
        url = with_session_id(url, session_id)
        release_sessions(keep=url)
    cached = _sessions.get(url)
    if cached is not None:
        if _session_alive(cached):
            return cached
        # A session other processes share is left to them: close only this client.
        cached.release_session_on_close = not session_id  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            cached.stop()
        _sessions.pop(url, None)
    session = None
    try:
        # pyspark warns (with a source line) when its retries run out; the error below says it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = SparkSession.builder.remote(url).create()
            _bound_retries(session, pid)
            session.sql("SELECT 1").collect()
    except Exception as exc:  # grpc errors carry long traces; keep the status and details
        if session is not None:
            # Closed without the release call: an unused client left open would retry its
            # clean-up calls against the server when the interpreter exits.
            with contextlib.suppress(Exception):
                session.client.close()
        if pid is not None and not _pid_alive(pid):
            raise went_away(pid, f"connecting to {redact(url)}", exc) from None
        refused = reachability.spark_connect_error(url, exc)
        if refused is not None:
            raise refused from None
        raise EngineError(
            f"cannot connect to the Spark engine at {redact(url)}: "
            f"{reachability.grpc_summary(exc)[:300]}",
            hint="check NBPIPELINE_SPARK_REMOTE, or unset it to use the local engine"
            if remote or os.environ.get("NBPIPELINE_SPARK_REMOTE")
            else "run `nbpipeline engine status`; its log says why the engine does not answer",
        ) from None
    _sessions[url] = session
    return session


def release_sessions(keep: str) -> None:
    """Release this process's cached sessions on `keep`'s server that carry another session id:
    a process that runs one run after another (the sequential job in-process) frees the last
    run's server-side session, its temp views and caches, when the next run starts."""
    base = keep.partition("/;")[0]
    for url in [u for u in _sessions if u != keep and "session_id=" in u]:
        if url.partition("/;")[0] == base:
            with contextlib.suppress(Exception):
                _sessions.pop(url).stop()


def with_session_id(url: str, session_id: str) -> str:
    """`url` with the Spark Connect parameter `session_id` set (other parameters kept)."""
    base, _, params = url.partition("/;")
    kept = [p for p in params.split(";") if p and not p.startswith("session_id=")]
    return base + "/;" + ";".join([*kept, f"session_id={session_id}"])


def classic_session(
    *, cores: str = "*", driver_memory: str = "2g", progress: Progress | None = None
) -> SparkSession:
    """An in-process (classic, py4j) Spark session with Delta: a JVM of this process's own.

    This is the stock way to use PySpark from a Dagster step, kept as the benchmark's
    `per-process-spark` reference. Its catalog is in memory, since the engine's Derby
    metastore admits one JVM, so it can only reach Delta path tables (delta.`/path`).
    """
    from pyspark.sql import SparkSession

    # pyspark marks a process that ever opened a Spark Connect session (and, through the
    # environment, its children) as "connect mode", which would turn this builder into a
    # Connect client; a classic session needs the mark gone.
    os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)
    os.environ.pop("SPARK_REMOTE", None)
    config = EngineConfig.from_env()
    jar_paths = jars.resolve_jars(progress)
    conf = config.spark_conf()
    for key in list(conf):
        if key.startswith(("spark.connect.", "spark.hadoop.javax.jdo", "spark.driver.extraJava")):
            conf.pop(key)
    conf["spark.sql.catalogImplementation"] = "in-memory"
    conf["spark.local.dir"] = tempfile.mkdtemp(prefix="nbpipeline-classic-")
    builder = (
        SparkSession.builder.master(f"local[{cores}]")
        .appName("nbpipeline-per-process")
        .config("spark.driver.memory", driver_memory)
        .config("spark.jars", ",".join(str(j) for j in jar_paths))
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


# pyspark's default retries a lost server for ten minutes; a local engine that went away should
# be reported within seconds. ~30 s of retries still rides out a busy server.
CONNECT_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 8,
    "backoff_multiplier": 2.0,
    "initial_backoff": 200,
    "max_backoff": 5000,
}


def _bound_retries(session: SparkSession, engine_pid: int | None = None) -> None:
    from pyspark.sql.connect.client.retries import DefaultPolicy

    class _EnginePolicy(DefaultPolicy):
        """pyspark's default (retry UNAVAILABLE and the like), but never for a local engine
        whose process is gone: no retry can reach it, so fail at once with the real reason."""

        def can_retry(self, e: BaseException) -> bool:
            if engine_pid is not None and not _pid_alive(engine_pid):
                return False
            return super().can_retry(e)

    with contextlib.suppress(AttributeError):  # a classic session has no gRPC client
        session.client.set_retry_policies([_EnginePolicy(**CONNECT_RETRY_POLICY)])


def local_engine_pid(remote: str | None = None) -> int | None:
    """The pid of the running local engine, or None (not running, or a remote engine is used)."""
    if remote or os.environ.get("NBPIPELINE_SPARK_REMOTE"):
        return None
    return status()["pid"]


def engine_alive(pid: int) -> bool:
    """Whether the engine process `pid` still runs."""
    return _pid_alive(pid)


def went_away(pid: int, what: str, error: BaseException) -> EngineGoneError:
    """The error for a local engine that died under a running notebook: says so in one line,
    with the client's own first line (e.g. gRPC UNAVAILABLE) as the detail."""
    config = EngineConfig.from_env()
    return EngineGoneError(
        f"{what}: the local engine went away (process {pid} ended; client saw: "
        f"{reachability.grpc_summary(error)[:200]})",
        hint=(
            "the next run starts it again, or run `nbpipeline engine start`; "
            f"its log is {config.state_dir / 'server.log'}"
        ),
    )


def _session_alive(session: SparkSession) -> bool:
    try:
        session.sql("SELECT 1").collect()
        return True
    except Exception:
        return False
