"""Is the engine or workspace a setting names reachable? Answered in seconds, before any work.

A mistyped host or port is not a transient failure, yet the Spark Connect client and the
Databricks SDK (whose default retry window is 300 s, per call) retry it for minutes and then
report an object's repr. So before a command or a run starts work, each remote endpoint is
checked once, with short bounds and no retries, step by step: the name resolves (DNS, bounded: a
resolver can hang), the port accepts a TCP connection, a TLS handshake succeeds when the URL asks
for TLS (else an HTTP/2 handshake, for a plaintext gRPC port), and, for Databricks, one cheap
authenticated call (`current_user.me()`) is accepted. Each failure is an
`UnreachableError` (never retried) with one line naming the setting to check and a hint.

A check that passed is remembered for the rest of the process: once a run is under way, a
connection that drops is a transient failure and gets the normal bounded retries.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from nbpipeline.errors import UnreachableError
from nbpipeline.redact import redact

T = TypeVar("T")

SPARK_REMOTE_ENV = "NBPIPELINE_SPARK_REMOTE"
HOST_ENV = "DATABRICKS_HOST"
#: Bounds of each stage, in seconds. A healthy endpoint answers each in well under a second;
#: the bounds leave room for a slow network without letting a wrong address cost minutes.
DNS_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
TLS_TIMEOUT_S = 5.0
AUTH_TIMEOUT_S = 15.0

#: How long a failed check is remembered in a process: the remaining steps of a run in the
#: same process report the same error at once instead of checking again.
FAILED_MEMORY_S = 60.0

_passed: set[str] = set()
_failed: dict[str, tuple[float, UnreachableError]] = {}
_memory_lock = threading.Lock()


class _Timeout(Exception):
    pass


def _bounded(fn: Callable[[], T], timeout_s: float) -> T:
    """fn() in a daemon thread, abandoned after `timeout_s` (a resolver or SDK call that hangs
    cannot be interrupted; it ends on its own later)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=run, name="nbpipeline-reachability", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise _Timeout
    if "error" in box:
        raise box["error"]
    return box["value"]


def _checked(key: str, check: Callable[[], None]) -> None:
    """Run `check` unless it passed in this process, or failed within FAILED_MEMORY_S."""
    with _memory_lock:
        if key in _passed:
            return
        failed = _failed.get(key)
    if failed is not None and time.monotonic() - failed[0] < FAILED_MEMORY_S:
        error = failed[1]
        raise UnreachableError(error.message, setting=error.setting, hint=error.hint)
    try:
        check()
    except UnreachableError as exc:
        with _memory_lock:
            _failed[key] = (time.monotonic(), exc)
        raise
    with _memory_lock:
        _passed.add(key)
        _failed.pop(key, None)


def forget() -> None:
    """Forget every check's outcome in this process (tests)."""
    with _memory_lock:
        _passed.clear()
        _failed.clear()


def _fingerprint(*parts: str | None) -> str:
    return hashlib.sha256("\0".join(p or "" for p in parts).encode()).hexdigest()


def resolve(host: str, port: int, *, setting: str, shown: str) -> None:
    """Resolve `host` within DNS_TIMEOUT_S; an unknown name is an UnreachableError."""
    try:
        _bounded(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), DNS_TIMEOUT_S)
    except socket.gaierror as exc:
        raise UnreachableError(
            f"cannot reach {shown}: unknown host {host!r} ({exc.strerror or exc})",
            setting=setting,
            hint=f"check the host name in {setting} (a typo?)",
        ) from None
    except _Timeout:
        raise UnreachableError(
            f"cannot reach {shown}: resolving host {host!r} took longer than {DNS_TIMEOUT_S:.0f}s",
            setting=setting,
            hint=f"check the host name in {setting} and this machine's DNS / network",
        ) from None


def connect(host: str, port: int, *, setting: str, shown: str) -> socket.socket:
    """A TCP connection to host:port within CONNECT_TIMEOUT_S (the caller closes it)."""
    try:
        return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except ConnectionRefusedError:
        raise UnreachableError(
            f"cannot reach {shown}: connection refused (nothing listens on {host}:{port})",
            setting=setting,
            hint=f"check the host and port in {setting}, and that the server is running",
        ) from None
    except TimeoutError:
        raise UnreachableError(
            f"cannot reach {shown}: no answer from {host}:{port} within {CONNECT_TIMEOUT_S:.0f}s",
            setting=setting,
            hint=f"check the host and port in {setting}; a firewall may drop the connection",
        ) from None
    except OSError as exc:
        raise UnreachableError(
            f"cannot reach {shown}: {exc.strerror or exc}",
            setting=setting,
            hint=f"check the host and port in {setting}",
        ) from None


def tls_handshake(
    sock: socket.socket,
    host: str,
    *,
    setting: str,
    shown: str,
    cafile: str | None = None,
    hint: str | None = None,
) -> None:
    """A TLS handshake on `sock` verifying the server's certificate for `host`."""
    context = ssl.create_default_context(cafile=cafile)
    sock.settimeout(TLS_TIMEOUT_S)
    try:
        with context.wrap_socket(sock, server_hostname=host.strip("[]")):
            return
    except ssl.SSLCertVerificationError as exc:
        detail = f"certificate not trusted ({exc.verify_message or exc.reason})"
    except ssl.SSLError as exc:
        detail = f"TLS handshake failed ({exc.reason or exc}); does the server speak TLS?"
    except TimeoutError:
        detail = f"no TLS handshake within {TLS_TIMEOUT_S:.0f}s; does the server speak TLS?"
    except OSError as exc:
        detail = f"TLS handshake failed ({exc.strerror or exc})"
    raise UnreachableError(
        f"cannot reach {shown}: {detail}",
        setting=setting,
        hint=hint or f"check the address in {setting}, and that its certificate is trusted here",
    )


# --------------------------------------------------------------------------- Spark Connect

# The HTTP/2 client preface and an empty SETTINGS frame: every gRPC server answers them with a
# SETTINGS frame of its own, which tells a plaintext gRPC port from a TLS or HTTP/1 one.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x04


def h2_handshake(sock: socket.socket, *, setting: str, shown: str) -> None:
    """Check that a plaintext port speaks HTTP/2 (gRPC) within TLS_TIMEOUT_S."""
    sock.settimeout(TLS_TIMEOUT_S)
    answer = b""
    try:
        sock.sendall(_H2_PREFACE)
        while len(answer) < 9:
            chunk = sock.recv(9 - len(answer))
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        detail = f"it accepted the connection but sent no answer within {TLS_TIMEOUT_S:.0f}s"
    except ConnectionResetError:
        detail = "it reset the plaintext connection"
    except OSError as exc:
        detail = f"it closed the connection ({exc.strerror or exc})"
    else:
        detail = "it closed the connection without answering"
    if len(answer) >= 4 and answer[3] == _H2_SETTINGS:
        return
    if answer[:1] in (b"\x15", b"\x16") or "reset" in detail:
        # A TLS record (alert or handshake), or a reset: a TLS server rejecting plaintext.
        detail = "it answered with TLS" if answer else detail
        raise UnreachableError(
            f"cannot reach {shown}: the server probably expects TLS ({detail})",
            setting=setting,
            hint=f"add ;use_ssl=true to {setting} (e.g. sc://host:port/;use_ssl=true)",
        )
    if answer.startswith(b"HTTP/"):
        detail = "it answers HTTP/1, not gRPC"
    raise UnreachableError(
        f"cannot reach {shown}: not a Spark Connect (gRPC) server: {detail}",
        setting=setting,
        hint=f"check the port in {setting} (Spark Connect listens on 15002 by default)",
    )


def spark_setting(url: str) -> str:
    """The setting a Spark Connect URL came from, for messages."""
    return SPARK_REMOTE_ENV if url == os.environ.get(SPARK_REMOTE_ENV) else "spark_remote"


def _grpc_roots() -> str | None:
    """The CA bundle gRPC verifies servers with, so this check trusts what the client will."""
    override = os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    if override:
        return override
    try:
        import grpc
    except ImportError:  # pragma: no cover - pyspark's connect client needs grpc
        return None
    roots = os.path.join(os.path.dirname(grpc.__file__), "_cython", "_credentials", "roots.pem")
    return roots if os.path.exists(roots) else None


def check_spark_remote(url: str, *, setting: str | None = None) -> None:
    """Check a Spark Connect URL: host resolves, port accepts, then a TLS handshake if the URL
    asks for TLS (`use_ssl=true`, or a `token`, which pyspark sends over TLS only), else an
    HTTP/2 handshake (a plaintext gRPC port)."""

    setting = setting or spark_setting(url)
    _checked("spark\0" + _fingerprint(url), lambda: _check_spark_remote(url, setting))


def _check_spark_remote(url: str, setting: str) -> None:
    from pyspark.sql.connect.client.core import DefaultChannelBuilder

    shown = f"the Spark engine at {redact(url)} ({setting})"
    try:
        builder = DefaultChannelBuilder(url)
    except Exception as exc:  # pyspark's own URL errors are clear, but multi-line
        raise UnreachableError(
            f"{setting} is not a valid Spark Connect URL: {str(exc).splitlines()[0]}",
            setting=setting,
            hint="use sc://host:port (e.g. sc://localhost:15002)",
        ) from None
    host, port = builder.host.strip("[]"), builder._port
    resolve(host, port, setting=setting, shown=shown)
    sock = connect(host, port, setting=setting, shown=shown)
    try:
        # pyspark uses TLS when use_ssl=true or a token is set, except to "localhost" without
        # use_ssl (local channel credentials).
        if not builder.secure or (builder.host == "localhost" and not builder.use_ssl):
            h2_handshake(sock, setting=setting, shown=shown)
        else:
            tls_handshake(
                sock,
                host,
                setting=setting,
                shown=shown,
                cafile=_grpc_roots(),
                hint=(
                    f"{setting} asks for TLS (use_ssl=true, or a token=, which implies it): the "
                    "server must present a certificate this machine trusts "
                    "(GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names extra CAs)"
                ),
            )
    finally:
        sock.close()


def grpc_summary(error: BaseException) -> str:
    """`UNAVAILABLE: failed to connect ...` from a gRPC error's text, whose first line only
    says `<_MultiThreadedRendezvous of RPC that terminated with:`; else the first line."""
    text = str(error)
    status = re.search(r"status = StatusCode\.(\w+)", text)
    details = re.search(r'details = "([^"]*)"', text)
    if status:
        return status.group(1) + (f": {details.group(1)}" if details else "")
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


def spark_connect_error(url: str, error: BaseException) -> UnreachableError | None:
    """An UnreachableError for a Spark Connect failure that no retry can fix (credentials
    refused), else None."""
    summary = grpc_summary(error)
    if summary.startswith(("UNAUTHENTICATED", "PERMISSION_DENIED")):
        setting = spark_setting(url)
        return UnreachableError(
            f"the Spark engine at {redact(url)} ({setting}) refused the credentials: "
            f"{summary[:300]}",
            setting=setting,
            hint=f"check the token= in {setting} (or SPARK_CONNECT_AUTHENTICATE_TOKEN)",
        )
    return None


# --------------------------------------------------------------------------- Databricks


def _credential_hint(auth_type: str | None) -> str:
    if auth_type is None:  # the SDK gave up before choosing: guess from what is set
        if os.environ.get("DATABRICKS_TOKEN"):
            auth_type = "pat"
        elif os.environ.get("DATABRICKS_CLIENT_ID"):
            auth_type = "oauth-m2m"
    if auth_type == "pat":
        return "check DATABRICKS_TOKEN: it may be expired, revoked or for another workspace"
    if auth_type in ("oauth-m2m", "azure-client-secret"):
        return (
            "check DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET: the service principal "
            "must exist in this workspace"
        )
    return (
        "set DATABRICKS_TOKEN, or DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET (OAuth), "
        "or configure a ~/.databrickscfg profile"
    )


def _probe_http(host: str, shown: str) -> None:
    """One unauthenticated HEAD request without retries: tells refused, TLS and timeouts apart
    through the same HTTP stack (proxies, CA bundle) the Databricks SDK uses. Any HTTP answer
    means reachable; what it says does not matter."""
    import requests

    try:
        requests.head(
            f"{host}/", timeout=(CONNECT_TIMEOUT_S, TLS_TIMEOUT_S * 2), allow_redirects=False
        ).close()
    except requests.exceptions.SSLError as exc:
        raise UnreachableError(
            f"cannot reach {shown}: TLS handshake failed ({_first_reason(exc)})",
            setting=HOST_ENV,
            hint=(
                f"check {HOST_ENV} (https://<workspace>); a proxy or a private CA needs "
                "REQUESTS_CA_BUNDLE"
            ),
        ) from None
    except requests.exceptions.ConnectTimeout:
        raise UnreachableError(
            f"cannot reach {shown}: no answer within {CONNECT_TIMEOUT_S:.0f}s",
            setting=HOST_ENV,
            hint=f"check {HOST_ENV}; a firewall or proxy may drop the connection",
        ) from None
    except requests.exceptions.ReadTimeout:
        raise UnreachableError(
            f"cannot reach {shown}: it accepted the connection but sent no answer",
            setting=HOST_ENV,
            hint=f"check that {HOST_ENV} is a Databricks workspace URL",
        ) from None
    except requests.exceptions.ConnectionError as exc:
        reason = _first_reason(exc)
        if reason == "connection refused":
            reason += " (nothing listens there)"
        raise UnreachableError(
            f"cannot reach {shown}: {reason}",
            setting=HOST_ENV,
            hint=f"check the host and port in {HOST_ENV} (https://<workspace>)",
        ) from None


def _first_reason(exc: BaseException) -> str:
    """The innermost readable reason of a requests/urllib3 error, without object reprs."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, ssl.SSLCertVerificationError):
            return f"certificate not trusted: {err.verify_message or err.reason}"
        if isinstance(err, ssl.SSLError):
            return f"{err.reason or err}; does the server speak TLS?"
        if isinstance(err, ConnectionRefusedError):
            return "connection refused"
        if isinstance(err, socket.gaierror):
            return f"unknown host ({err.strerror or err})"
        stack += [e for e in (err.__cause__, err.__context__, getattr(err, "reason", None)) if e]
        stack += [a for a in err.args if isinstance(a, BaseException)]
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def check_databricks(host: str, token: str | None = None) -> None:
    """Check a Databricks workspace: host resolves, HTTPS answers, credentials are accepted.

    `host` is the normalized workspace URL; `token` a PAT, or None for the SDK's unified auth
    (OAuth M2M variables, a config profile, ...).
    """
    auth_env = [f"{n}={os.environ[n]}" for n in sorted(os.environ) if n.startswith("DATABRICKS_")]
    key = "databricks\0" + _fingerprint(host, token, *auth_env)
    _checked(key, lambda: _check_databricks(host, token))


def _check_databricks(host: str, token: str | None) -> None:
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.config import Config
    from databricks.sdk.errors import DatabricksError, PermissionDenied, Unauthenticated

    shown = f"Databricks at {host} ({HOST_ENV})"
    parts = urlsplit(host)
    hostname = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    resolve(hostname, port, setting=HOST_ENV, shown=shown)
    _probe_http(host, shown)

    holder: dict[str, Any] = {}

    def authenticate() -> None:
        # Short bounds and no retry window: this call tells a bad credential from a good one;
        # it is not the place to ride out an outage.
        config = Config(
            host=host,
            token=token or None,
            http_timeout_seconds=AUTH_TIMEOUT_S / 3,
            retry_timeout_seconds=int(AUTH_TIMEOUT_S / 3),
        )
        holder["auth_type"] = config.auth_type
        WorkspaceClient(config=config).current_user.me()

    try:
        _bounded(authenticate, AUTH_TIMEOUT_S)
    except _Timeout:
        raise UnreachableError(
            f"{shown} did not answer an authenticated request within {AUTH_TIMEOUT_S:.0f}s",
            setting=HOST_ENV,
            hint=f"check {HOST_ENV}; retry later if the workspace is under maintenance",
        ) from None
    except (Unauthenticated, PermissionDenied) as exc:
        auth_type = holder.get("auth_type")
        status = 401 if isinstance(exc, Unauthenticated) else 403
        raise UnreachableError(
            f"{shown} refused the credentials ({status} {exc.error_code or ''}: "
            f"{_one_line(exc)})".replace(" : ", ": "),
            setting="credentials",
            hint=_credential_hint(auth_type),
        ) from None
    except ValueError as exc:  # the SDK's config: no credentials, or OAuth refused them
        raise UnreachableError(
            f"cannot authenticate to {shown}: {_one_line(exc)}",
            setting="credentials",
            hint=_credential_hint(holder.get("auth_type")),
        ) from None
    except DatabricksError as exc:
        raise UnreachableError(
            f"{shown} answered, but not as a Databricks workspace: {_one_line(exc)}",
            setting=HOST_ENV,
            hint=f"check that {HOST_ENV} is the workspace URL (https://<workspace>)",
        ) from None
    except Exception as exc:  # a transport error the probe did not see (e.g. the OAuth endpoint)
        raise UnreachableError(
            f"cannot authenticate to {shown}: {_one_line(exc)}",
            setting="credentials",
            hint=_credential_hint(holder.get("auth_type")),
        ) from None


def _one_line(exc: BaseException) -> str:
    """The SDK's message without its config dump (`Config: host=..., ...`) and doc links."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    for cut in (" Config: ", ", please check https://"):
        text = text.split(cut)[0]
    return text.rstrip(" .")[:300]


# --------------------------------------------------------------------------- per run


def check_backend(backend: Any) -> None:
    """Check every remote endpoint a run on `backend` will use (the notebook backend's engine
    or workspace, and NBPIPELINE_SPARK_REMOTE when set); raises UnreachableError."""
    if getattr(backend, "backend_name", None) == "databricks":
        backend.workspace_client()  # builds the client, which checks the workspace first
    remote = getattr(backend, "spark_remote", None) or os.environ.get(SPARK_REMOTE_ENV)
    if remote:
        check_spark_remote(remote)
