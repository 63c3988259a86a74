"""An unreachable engine or workspace is reported in seconds, in one line, and never with a secret.

Each case is a real endpoint on this machine: a closed port, a host name that cannot resolve
(`.invalid` is reserved for that), a TLS server with a self-signed certificate, a server that
accepts connections and never answers, a gRPC server refusing every call as UNAUTHENTICATED, and
the loopback Databricks workspace answering 401 or 403. Every case carries a canary secret in
the setting that holds one (the `token=` of an sc:// URL, DATABRICKS_TOKEN,
DATABRICKS_CLIENT_SECRET, DATABRICKS_PASSWORD), and the tests assert the message, the hint, the
bound, and that the canary appears nowhere: not in the error, the CLI's output, nor any Dagster
event. The bounds are generous for a loaded 2-core machine and still far below the client
libraries' retry windows (minutes), which is what they guard against.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from nbpipeline import reachability
from nbpipeline.backend import NotebookBackend
from nbpipeline.databricks.client import client_resource_from_env
from nbpipeline.errors import NotebookError, UnreachableError
from nbpipeline.local import engine
from nbpipeline.settings import PROJECT_ROOT
from nbpipeline_tests.fakes.databricks_http import LoopbackDatabricks
from nbpipeline_tests.fakes.databricks_workspace import make_backend
from nbpipeline_tests.helpers import free_port

HERE = Path(__file__).resolve().parent
CERT, KEY = HERE / "selfsigned_cert.pem", HERE / "selfsigned_key.pem"
#: Seconds a check may take on a loaded machine (each stage is bounded at 5-15 s).
CHECK_BOUND_S = 30.0
#: Seconds a whole CLI command may take, Python start-up and imports included.
CLI_BOUND_S = 60.0
PARAMS = {"source_table": "main.s.orders"}


def canary(kind: str) -> str:
    return f"canary-{kind}-" + os.urandom(8).hex()


@pytest.fixture(autouse=True)
def _fresh_checks() -> Iterator[None]:
    reachability.forget()
    yield
    reachability.forget()


# ----------------------------------------------------------------------------------- servers


class _Server:
    """A TCP server on 127.0.0.1 whose connections are handled by `serve(conn)` in threads."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        """Default: accept and never answer (a black hole)."""

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


class _TlsServer(_Server):
    """Completes TLS handshakes with a self-signed certificate, then answers HTTP 200."""

    def serve(self, conn: socket.socket) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(CERT, KEY)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(4096)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        except OSError:
            pass  # the client rejected the certificate, as it should


@pytest.fixture
def tls_server() -> Iterator[_TlsServer]:
    server = _TlsServer()
    yield server
    server.close()


@pytest.fixture
def silent_server() -> Iterator[_Server]:
    server = _Server()
    yield server
    server.close()


@pytest.fixture
def denying_grpc_server() -> Iterator[int]:
    """A gRPC server refusing every call with UNAUTHENTICATED, as a Spark Connect server
    behind an authenticating proxy does for a wrong token."""
    import grpc

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")

    def deny_stream(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        yield b""

    class Deny(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            if details.method.endswith(("ExecutePlan", "ReattachExecute")):
                return grpc.unary_stream_rpc_method_handler(deny_stream)
            return grpc.unary_unary_rpc_method_handler(deny)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((Deny(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(grace=None)


def assert_one_clean_line(err: UnreachableError, secrets: list[str], *must: str) -> None:
    text = f"{err}\n{err.message}\n{err.hint}\n{err!r}"
    assert not [s for s in secrets if s in text], text
    for piece in must:
        assert piece in str(err), str(err)
    assert "\n" not in err.message and err.hint and "\n" not in err.hint
    assert "<_" not in text and "Traceback" not in text  # no object reprs, no stack


# ----------------------------------------------------------------------------- Spark Connect


def _spark_error(url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[UnreachableError, float]:
    monkeypatch.setenv("NBPIPELINE_SPARK_REMOTE", url)
    started = time.monotonic()
    with pytest.raises(UnreachableError) as caught:
        engine.get_spark()
    took = time.monotonic() - started
    assert took < CHECK_BOUND_S, f"took {took:.1f}s"
    assert caught.value.setting == "NBPIPELINE_SPARK_REMOTE"
    return caught.value, took


def test_spark_remote_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    token, port = canary("sc"), free_port()
    err, _ = _spark_error(f"sc://127.0.0.1:{port}/;token={token}", monkeypatch)
    assert_one_clean_line(
        err,
        [token],
        f"sc://127.0.0.1:{port}/;token=***",
        f"connection refused (nothing listens on 127.0.0.1:{port})",
        "check the host and port in NBPIPELINE_SPARK_REMOTE",
    )


def test_spark_remote_unknown_host(monkeypatch: pytest.MonkeyPatch) -> None:
    token = canary("sc")
    err, _ = _spark_error(f"sc://no-such-engine.invalid:15002/;token={token}", monkeypatch)
    assert_one_clean_line(
        err,
        [token],
        "unknown host 'no-such-engine.invalid'",
        "check the host name in NBPIPELINE_SPARK_REMOTE",
    )


def test_a_hanging_name_lookup_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that never answers (an unreachable DNS server) costs DNS_TIMEOUT_S, not the
    resolver's own minutes of retries."""
    real = socket.getaddrinfo

    def hanging(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "slow-dns.example":
            time.sleep(120)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    token = canary("sc")
    err, took = _spark_error(f"sc://slow-dns.example:15002/;token={token}", monkeypatch)
    assert_one_clean_line(err, [token], "resolving host 'slow-dns.example' took longer than 5s")
    assert took < reachability.DNS_TIMEOUT_S + 10


def test_spark_remote_untrusted_certificate(
    tls_server: _TlsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = canary("sc")
    url = f"sc://127.0.0.1:{tls_server.port}/;use_ssl=true;token={token}"
    err, _ = _spark_error(url, monkeypatch)
    assert_one_clean_line(
        err, [token], "certificate not trusted", "NBPIPELINE_SPARK_REMOTE asks for TLS"
    )


def test_spark_remote_plaintext_url_to_a_tls_server(
    tls_server: _TlsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other TLS mismatch: the URL says plaintext, the server speaks TLS (pyspark alone
    retried this for about a minute)."""
    err, _ = _spark_error(f"sc://127.0.0.1:{tls_server.port}", monkeypatch)
    assert_one_clean_line(
        err, [], "the server probably expects TLS", "add ;use_ssl=true to NBPIPELINE_SPARK_REMOTE"
    )


def test_spark_remote_port_of_an_http1_server(
    loopback: LoopbackDatabricks,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = loopback.host.rsplit(":", 1)[1]
    err, _ = _spark_error(f"sc://127.0.0.1:{port}", monkeypatch)
    assert_one_clean_line(err, [], "not a Spark Connect (gRPC) server", "check the port")


def test_spark_remote_silent_server_times_out(
    silent_server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = canary("sc")
    err, _ = _spark_error(f"sc://127.0.0.1:{silent_server.port}/;token={token}", monkeypatch)
    assert_one_clean_line(err, [token], "no TLS handshake within")


def test_spark_remote_refusing_credentials(
    denying_grpc_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    err, _ = _spark_error(f"sc://127.0.0.1:{denying_grpc_server}", monkeypatch)
    assert_one_clean_line(
        err, [], "refused the credentials: UNAUTHENTICATED: invalid token", "token="
    )


def test_engine_address_and_status_mask_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbpipeline.local.backend import LocalNotebookBackend

    token = canary("sc")
    monkeypatch.setenv("NBPIPELINE_SPARK_REMOTE", f"sc://engine.example:443/;token={token}")
    assert LocalNotebookBackend().engine_address() == "sc://engine.example:443/;token=***"
    assert token not in str(engine.status())


# -------------------------------------------------------------------------------- Databricks


def _databricks_error(**backend: Any) -> tuple[UnreachableError, float]:
    started = time.monotonic()
    with pytest.raises(UnreachableError) as caught:
        make_backend(**backend).run_notebook("Notebook1", PARAMS)
    took = time.monotonic() - started
    assert took < CHECK_BOUND_S, f"took {took:.1f}s"
    return caught.value, took


def test_databricks_closed_port(databricks_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = canary("pat")
    monkeypatch.setenv("DATABRICKS_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    # The resource's own retry window stays long: the check, not the window, answers.
    err, _ = _databricks_error(retry_timeout_seconds=300)
    assert err.setting == "DATABRICKS_HOST"
    assert_one_clean_line(
        err, [token], "connection refused", "check the host and port in DATABRICKS_HOST"
    )


def test_databricks_unknown_host(databricks_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = canary("pat")
    monkeypatch.setenv("DATABRICKS_HOST", "https://no-such-workspace.invalid")
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    err, _ = _databricks_error()
    assert_one_clean_line(
        err,
        [token],
        "unknown host 'no-such-workspace.invalid'",
        "check the host name in DATABRICKS_HOST",
    )


def test_databricks_untrusted_certificate(
    databricks_env: Path,
    tls_server: _TlsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = canary("pat")
    monkeypatch.setenv("DATABRICKS_HOST", f"https://127.0.0.1:{tls_server.port}")
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    err, _ = _databricks_error()
    assert_one_clean_line(
        err,
        [token],
        "TLS handshake failed (certificate not trusted: self-signed certificate)",
        "REQUESTS_CA_BUNDLE",
    )


@pytest.mark.slow
def test_databricks_silent_server_times_out(
    databricks_env: Path,
    silent_server: _Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = canary("pat")
    monkeypatch.setenv("DATABRICKS_HOST", f"http://127.0.0.1:{silent_server.port}")
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    err, _ = _databricks_error()
    assert_one_clean_line(err, [token], "accepted the connection but sent no answer")


def test_databricks_token_refused_403(
    loopback: LoopbackDatabricks,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = canary("pat")
    monkeypatch.setenv("DATABRICKS_TOKEN", token)  # the loopback expects another token
    err, _ = _databricks_error()
    assert err.setting == "credentials"
    assert_one_clean_line(
        err,
        [token],
        "refused the credentials (403 PERMISSION_DENIED: Invalid access token)",
        "check DATABRICKS_TOKEN",
    )
    assert not loopback.requests_to("/workspace/mkdirs")  # nothing was written


def test_databricks_token_expired_401(loopback: LoopbackDatabricks) -> None:
    loopback.inject_error(
        "GET",
        "/api/2.0/preview/scim/v2/Me",
        status=401,
        code="UNAUTHENTICATED",
        message="Token is expired",
    )
    err, _ = _databricks_error()
    assert_one_clean_line(
        err, [], "refused the credentials (401 UNAUTHENTICATED: Token is expired)"
    )


def test_databricks_oauth_secret_refused(
    loopback: LoopbackDatabricks,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = canary("oauth")
    monkeypatch.delenv("DATABRICKS_TOKEN")
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "nbpipeline-sp")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", secret)
    err, _ = _databricks_error(databricks=client_resource_from_env())
    assert_one_clean_line(
        err, [secret], "cannot authenticate to Databricks", "DATABRICKS_CLIENT_SECRET"
    )


def test_databricks_oauth_closed_port(
    databricks_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OAuth discovers its token endpoint with the SDK's default 5-minute retry window; the
    check answers before any of that starts."""
    secret = canary("oauth")
    monkeypatch.setenv("DATABRICKS_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "nbpipeline-sp")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", secret)
    err, _ = _databricks_error(databricks=client_resource_from_env())
    assert_one_clean_line(err, [secret], "connection refused")


def test_databricks_password_refused(
    loopback: LoopbackDatabricks,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = canary("password")
    monkeypatch.delenv("DATABRICKS_TOKEN")
    monkeypatch.setenv("DATABRICKS_USERNAME", "someone@example.com")
    monkeypatch.setenv("DATABRICKS_PASSWORD", password)
    err, _ = _databricks_error(databricks=client_resource_from_env())
    assert_one_clean_line(err, [password], "401 UNAUTHENTICATED")


def test_a_check_that_passed_is_not_repeated(loopback: LoopbackDatabricks) -> None:
    # An explicit folder: the per-user default would ask for the user name (SCIM Me) as well.
    folder = "/Shared/nbpipeline-check-once"
    make_backend(workspace_dir=folder).run_notebook("Notebook1", PARAMS)
    make_backend(workspace_dir=folder).run_notebook("Notebook2", PARAMS)
    assert len(loopback.requests_to("/scim/v2/Me")) == 1


def test_transient_errors_after_the_check_keep_their_retries(
    loopback: LoopbackDatabricks,
) -> None:
    """The check runs once; a 503 during the run is still retried by the SDK as before."""
    loopback.inject_error("POST", "/api/2.0/workspace/mkdirs", status=503, times=2)
    run = make_backend().run_notebook("Notebook1", PARAMS)
    assert run.exit_value["notebook"] == "Notebook1"
    assert len(loopback.requests_to("/workspace/mkdirs")) == 3


# ---------------------------------------------------------------------- Dagster and the CLI


@pytest.mark.dagster
def test_a_step_fails_fast_without_retries_and_no_event_holds_the_secret(
    databricks_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run launched from the UI has no CLI check before it: its first step checks, fails at
    once and is not retried."""
    from nbpipeline.defs.assets import NOTEBOOK_ASSETS

    token = canary("pat")
    monkeypatch.setenv("DATABRICKS_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DATABRICKS_TOKEN", token)
    started = time.monotonic()
    result = dg.materialize(
        [NOTEBOOK_ASSETS["Notebook1"]],
        resources={"notebook_backend": make_backend(retry_timeout_seconds=300)},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert time.monotonic() - started < CLI_BOUND_S
    assert not result.success
    kinds = [e.event_type for e in result.all_events]
    assert dg.DagsterEventType.STEP_UP_FOR_RETRY not in kinds
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert "connection refused" in description and "DATABRICKS_HOST" in description
    assert not [str(e)[:200] for e in result.all_events if token in str(e)]


def _cli(args: list[str], home: Path, **env: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "nbpipeline.cli", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DAGSTER_HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


@pytest.mark.dagster
@pytest.mark.parametrize(
    "case",
    ["spark-closed-port", "databricks-closed-port", "databricks-oauth-401", "spark-unknown-host"],
)
def test_cli_prints_one_error_and_a_hint_in_seconds_and_writes_nothing(
    case: str,
    databricks_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    secret = canary(case)
    server = None
    if case == "spark-closed-port":
        args = ["tables"]
        env = {"NBPIPELINE_SPARK_REMOTE": f"sc://127.0.0.1:{free_port()}/;token={secret}"}
        expected = "connection refused"
    elif case == "spark-unknown-host":
        args = ["run", "sequential"]
        env = {"NBPIPELINE_SPARK_REMOTE": f"sc://no-such-engine.invalid/;token={secret}"}
        expected = "unknown host"
    elif case == "databricks-closed-port":
        args = ["run", "parallel"]
        env = {
            "NBPIPELINE_BACKEND": "databricks",
            "DATABRICKS_HOST": f"http://127.0.0.1:{free_port()}",
            "DATABRICKS_TOKEN": secret,
        }
        expected = "connection refused"
    else:
        server = LoopbackDatabricks().start()
        args = ["run", "sequential"]
        env = {
            "NBPIPELINE_BACKEND": "databricks",
            "DATABRICKS_HOST": server.host,
            "DATABRICKS_CLIENT_ID": "nbpipeline-sp",
            "DATABRICKS_CLIENT_SECRET": secret,
        }
        expected = "cannot authenticate to Databricks"
    try:
        code, out, err, took = _cli(args, home, **env)
    finally:
        if server is not None:
            server.stop()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert expected in lines[0]
    assert secret not in out + err
    assert took < CLI_BOUND_S, f"took {took:.1f}s"
    assert [p.name for p in home.iterdir()] == []  # no Dagster run, no storage created


@pytest.mark.dagster
def test_a_local_step_with_an_unreachable_remote_fails_fast_and_hides_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbpipeline.defs.assets import NOTEBOOK_ASSETS
    from nbpipeline.local.backend import LocalNotebookBackend

    token = canary("sc")
    monkeypatch.setenv("NBPIPELINE_SPARK_REMOTE", f"sc://127.0.0.1:{free_port()}/;token={token}")
    instance = dg.DagsterInstance.ephemeral()
    started = time.monotonic()
    result = dg.materialize(
        [NOTEBOOK_ASSETS["Notebook1"]],
        resources={"notebook_backend": LocalNotebookBackend()},
        instance=instance,
        raise_on_error=False,
    )
    assert time.monotonic() - started < CLI_BOUND_S
    assert not result.success
    assert dg.DagsterEventType.STEP_UP_FOR_RETRY not in [e.event_type for e in result.all_events]
    texts = [str(e) for e in instance.all_logs(result.run_id)]
    assert any("sc://127.0.0.1" in t and "token=***" in t for t in texts)  # engine address
    assert not [t[:200] for t in texts if token in t]


class _LeakyBackend(NotebookBackend):
    """Fails first with an unexpected (transient) error, then with a notebook error; both
    carry the secret of MY_API_TOKEN in their text, as a careless library might."""

    @property
    def backend_name(self) -> str:
        return "leaky"

    def engine_address(self) -> str:
        return "leaky://engine"

    def run_notebook(self, notebook: str, parameters: Any, **_: Any) -> Any:
        secret = os.environ["MY_API_TOKEN"]
        if not _LEAKY_CALLS:
            _LEAKY_CALLS.append(notebook)
            raise RuntimeError(f"connection reset talking to api?key={secret}")
        raise NotebookError(
            f"failed with key {secret}", notebook=notebook, traceback_text=f"at {secret}"
        )


_LEAKY_CALLS: list[str] = []


@pytest.mark.dagster
def test_a_secret_in_any_step_error_never_reaches_the_event_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbpipeline.defs.assets import NOTEBOOK_ASSETS

    secret = canary("api")
    monkeypatch.setenv("MY_API_TOKEN", secret)
    _LEAKY_CALLS.clear()
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [NOTEBOOK_ASSETS["Notebook1"]],
        resources={"notebook_backend": _LeakyBackend()},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    kinds = [e.event_type for e in result.all_events]
    assert dg.DagsterEventType.STEP_UP_FOR_RETRY in kinds  # the transient one was retried
    texts = [str(e) for e in instance.all_logs(result.run_id)]
    assert any("api?key=***" in t for t in texts) and any("failed with key ***" in t for t in texts)
    assert not [t[:200] for t in texts if secret in t]
