"""Run the project's notebooks on a Databricks workspace.

`DatabricksNotebookBackend` is the Databricks implementation of `NotebookBackend`: it keeps a
per-user workspace folder in step with the local notebooks (once per Dagster run), submits
one-time runs (`jobs/runs/submit`) with the widget values as `base_parameters`, waits for them
with adaptive polling, and returns the notebook's `dbutils.notebook.exit` JSON unchanged. A run it
loses track of is cancelled, or found live and re-attached to by the next attempt.

Secrets: credentials come through dagster-databricks' `DatabricksClientResource`, whose host and
token are read from the environment (`dg.EnvVar("DATABRICKS_HOST")`,
`dg.EnvVar("DATABRICKS_TOKEN")`), so Dagster only ever stores and shows the variable *names*. The
token itself is handed to the Databricks SDK and to nothing else: no log line, exception or
`NotebookRun` built here contains it. With no token configured the SDK's unified auth finds
credentials on its own (OAuth M2M variables, a `~/.databrickscfg` profile, Azure CLI, ...).

The pieces shared with the Databricks-native jobs (`nbpipeline.databricks_jobs`) live here too:
building a workspace client, syncing notebooks, polling a run and cancelling it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import requests
from dagster_databricks import DatabricksClientResource
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import DatabricksError, NotFound
from databricks.sdk.service import compute, jobs
from databricks.sdk.service import workspace as ws_api
from pydantic import Field, PrivateAttr, model_validator

from nbpipeline import settings
from nbpipeline.backends.base import (
    NOTEBOOK_NAMES,
    NotebookBackend,
    NotebookRun,
    parse_exit_value,
)
from nbpipeline.errors import ConfigError, NotebookError, NotebookTimeout

HOST_ENV = "DATABRICKS_HOST"
TOKEN_ENV = "DATABRICKS_TOKEN"
CLUSTER_ENV = "DATABRICKS_CLUSTER_ID"
WORKSPACE_DIR_ENV = "NBPIPELINE_DATABRICKS_WORKSPACE_DIR"
# Each user gets their own copy: a shared folder would let any user or branch change the code
# another user's scheduled job runs. `{user}` is the caller's workspace user name.
USER_WORKSPACE_DIR = "/Users/{user}/nbpipeline"
DEFAULT_WORKSPACE_DIR = USER_WORKSPACE_DIR

_LOG = logging.getLogger("nbpipeline.databricks")

# Life cycle states after which a run never changes again. INTERNAL_ERROR is terminal too: the
# SDK's own waiter treats it as a failure state, not as "keep waiting".
TERMINAL_STATES = frozenset(
    {
        jobs.RunLifeCycleState.TERMINATED,
        jobs.RunLifeCycleState.SKIPPED,
        jobs.RunLifeCycleState.INTERNAL_ERROR,
    }
)

# Hosts allowed over plain http: only this machine (the loopback test double). A real workspace
# is always https, and sending a bearer token over http anywhere else would leak it.
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# What a Databricks API call can raise once the SDK has given up retrying: an API error, the
# SDK's TimeoutError after its retry window, or a transport error it does not retry.
API_ERRORS: tuple[type[Exception], ...] = (DatabricksError, TimeoutError, requests.RequestException)


def describe_api_error(exc: BaseException) -> str:
    """One line for an API failure (API errors never contain credentials)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and exc.__cause__ is not None:
        text = f"{text}: {exc.__cause__}"
    return text


# --------------------------------------------------------------------------------------------
# Settings helpers
# --------------------------------------------------------------------------------------------


def normalize_host(raw: str, *, field: str = "host") -> str:
    """Return the workspace URL as `https://name[:port]`; raise ConfigError naming `field`."""
    text = (raw or "").strip()
    if not text:
        raise ConfigError(f"{field} is empty", hint=f"set {HOST_ENV} to the workspace URL")
    if "://" not in text:
        text = "https://" + text  # the SDK does the same for bare host names
    parts = urlsplit(text)
    if parts.username or parts.password:
        # Never echo the value back: userinfo in a URL is a credential.
        raise ConfigError(f"{field} must not contain a user name or password")
    if not parts.hostname:
        raise ConfigError(
            f"{field} {text!r} is not a URL", hint="e.g. https://adb-1234.5.azuredatabricks.net"
        )
    if parts.scheme != "https" and not (
        parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS
    ):
        raise ConfigError(f"{field} {text!r} must use https")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise ConfigError(
            f"{field} {text!r} must be the bare workspace URL, without a path or query",
            hint="e.g. https://adb-1234.5.azuredatabricks.net",
        )
    netloc = parts.netloc[:-4] if parts.netloc.endswith(":443") else parts.netloc
    return f"{parts.scheme}://{netloc}"


def check_workspace_dir(value: str, *, field: str = "workspace_dir") -> str:
    """Validate an absolute workspace folder such as `/Shared/nbpipeline` (no trailing slash)."""
    text = (value or "").strip()
    if not text.startswith("/") or text.rstrip("/") == "":
        raise ConfigError(
            f"{field} {value!r} must be an absolute workspace folder, e.g. /Shared/nbpipeline"
        )
    parts = text.rstrip("/").split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"{field} {value!r} must not contain empty, '.' or '..' segments")
    if any(ch in text for ch in "\n\r\t\"'`"):
        raise ConfigError(f"{field} {value!r} contains quotes or control characters")
    if "{" in text.replace("{user}", "") or "}" in text.replace("{user}", ""):
        raise ConfigError(f"{field} {value!r}: the only placeholder allowed is {{user}}")
    return text.rstrip("/")


def resolve_workspace_dir(ws: WorkspaceClient, folder: str) -> str:
    """`folder` with `{user}` replaced by the authenticated user's name (SCIM `Me`)."""
    if "{user}" not in folder:
        return folder
    try:
        me = ws.current_user.me()
    except API_ERRORS as exc:
        raise ConfigError(
            f"cannot find the current user for workspace folder {folder}: "
            f"{describe_api_error(exc)}",
            hint=f"set {WORKSPACE_DIR_ENV} (or --workspace-dir) to a folder",
        ) from None
    if not me.user_name:
        raise ConfigError(f"the workspace reports no user name for {folder}")
    return folder.replace("{user}", me.user_name)


def client_resource_from_env() -> Any:
    """dagster-databricks' `DatabricksClientResource` bound to the environment with `dg.EnvVar`:
    DATABRICKS_TOKEN (PAT), else DATABRICKS_CLIENT_ID/SECRET (OAuth M2M), else the Databricks
    SDK's unified auth (a ~/.databrickscfg profile, Azure CLI, ...)."""
    from dagster_databricks import DatabricksClientResource
    from dagster_databricks.resources import OauthCredentials
    from databricks.sdk.credentials_provider import DefaultCredentials

    kwargs: dict[str, Any] = {"host": dg.EnvVar(HOST_ENV)}
    if os.environ.get(TOKEN_ENV):
        kwargs["token"] = dg.EnvVar(TOKEN_ENV)
    elif os.environ.get("DATABRICKS_CLIENT_ID") and os.environ.get("DATABRICKS_CLIENT_SECRET"):
        kwargs["oauth_credentials"] = OauthCredentials(
            client_id=dg.EnvVar("DATABRICKS_CLIENT_ID"),
            client_secret=dg.EnvVar("DATABRICKS_CLIENT_SECRET"),
        )
    else:
        kwargs["credentials_strategy"] = DefaultCredentials()
    return DatabricksClientResource(**kwargs)


def _resolved_resource(resource: Any, host: str) -> Any:
    """The resource with EnvVar fields looked up (outside a Dagster run they are still names)."""
    from dagster_databricks import DatabricksClientResource
    from dagster_databricks.resources import OauthCredentials
    from databricks.sdk.credentials_provider import DefaultCredentials

    oauth = resource.oauth_credentials
    if oauth is not None:
        oauth = OauthCredentials(
            client_id=str(_peek(oauth.client_id)), client_secret=str(_peek(oauth.client_secret))
        )
    token = _peek(resource.token)
    strategy = resource.credentials_strategy
    if not token and oauth is None and resource.azure_credentials is None and strategy is None:
        strategy = DefaultCredentials()  # no credentials configured: the SDK's unified auth
    return DatabricksClientResource(
        host=host,
        token=str(token) if token else None,
        oauth_credentials=oauth,
        azure_credentials=resource.azure_credentials,
        credentials_strategy=strategy,
    )


def make_workspace_client(
    host: str,
    token: str | None,
    *,
    retry_timeout_seconds: int | None = None,
    resource: Any = None,
) -> WorkspaceClient:
    """The one place an SDK client is built: through dagster-databricks' `DatabricksClientResource`
    (`resource`, or one made from `host` and `token`).

    With a token this is PAT auth; without credentials the SDK's unified auth runs. Errors from
    the SDK's config mask sensitive attributes (`token=***`), so they can be shown.

    `retry_timeout_seconds` bounds how long the SDK retries transient failures (429/503,
    refused connections). Its default is 300 s, so a mistyped host would otherwise hang for five
    minutes; the client is rebuilt from the resource's config with the bound applied.
    """
    from dagster_databricks import DatabricksClientResource

    from nbpipeline import reachability

    if resource is None:
        resource = DatabricksClientResource(host=host, token=token or None)
    # In seconds, not after the SDK's retry window: wrong host, TLS failure, bad credentials.
    peeked = _peek(resource.token)
    reachability.check_databricks(host, str(peeked) if peeked else None)
    try:
        client = _resolved_resource(resource, host).get_client().workspace_client
        if retry_timeout_seconds is None:
            return client
        config = client.config
        config.retry_timeout_seconds = int(retry_timeout_seconds)
        return WorkspaceClient(config=config)
    except ValueError as exc:
        raise ConfigError(
            f"cannot authenticate to Databricks at {host}: {describe_api_error(exc)}",
            hint=f"set {TOKEN_ENV}, or configure OAuth / a ~/.databrickscfg profile",
        ) from None


def workspace_client_from_env(
    *, retry_timeout_seconds: int | None = None
) -> tuple[str, WorkspaceClient]:
    """(host, client) from DATABRICKS_HOST and the SDK's unified auth; for the CLI."""
    raw = os.environ.get(HOST_ENV, "")
    if not raw.strip():
        raise ConfigError(
            f"{HOST_ENV} is not set", hint="export DATABRICKS_HOST=https://<workspace>"
        )
    host = normalize_host(raw, field=HOST_ENV)
    return host, make_workspace_client(
        host, None, retry_timeout_seconds=retry_timeout_seconds, resource=client_resource_from_env()
    )


def _peek(value: Any) -> Any:
    """The value a config field will have at run time: EnvVars are looked up, others unchanged."""
    if isinstance(value, dg.EnvVar):
        return value.get_value()
    return value


def _env_name(value: Any) -> str | None:
    return value.env_var_name if isinstance(value, dg.EnvVar) else None


# --------------------------------------------------------------------------------------------
# Notebook sync
# --------------------------------------------------------------------------------------------


def local_notebooks(directory: Path | None = None) -> dict[str, bytes]:
    """Every `*.py` in the notebooks folder, by workspace name (file name without `.py`).

    All of them are synced, not just Notebook1..4: the notebooks `%run ./_common`, and `%run`
    resolves relative to the notebook's workspace path, so helpers must sit next to them.
    """
    folder = directory or settings.notebooks_dir()
    if not folder.is_dir():
        raise ConfigError(
            f"notebooks folder {folder} does not exist", hint="set NBPIPELINE_NOTEBOOKS_DIR"
        )
    found = {p.stem: p.read_bytes() for p in sorted(folder.glob("*.py")) if p.is_file()}
    missing = [n for n in NOTEBOOK_NAMES if n not in found]
    if missing:
        raise ConfigError(
            f"notebooks folder {folder} has no {', '.join(m + '.py' for m in missing)}"
        )
    return found


def _normalized_source(data: bytes) -> str:
    """Source text compared for "unchanged": line endings, trailing blanks and the header ignored.

    Databricks re-serializes imported notebooks (it adds the `# Databricks notebook source` header
    if missing and may trim trailing whitespace), so a byte-for-byte comparison would re-upload
    every time. None of the differences ignored here can change what a notebook does.
    """
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    if lines and lines[0] == "# Databricks notebook source":
        lines = lines[1:]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


def notebooks_digest(notebooks: Mapping[str, bytes]) -> str:
    """SHA-256 of the notebooks' normalized sources, so a workspace export hashes the same."""
    h = hashlib.sha256()
    for name in sorted(notebooks):
        h.update(name.encode() + b"\0" + _normalized_source(notebooks[name]).encode() + b"\0")
    return h.hexdigest()


def workspace_notebooks(
    ws: WorkspaceClient, workspace_dir: str, names: Iterable[str]
) -> dict[str, bytes | None]:
    """The workspace copies of `names` in `workspace_dir` (None: missing or not a notebook)."""
    out: dict[str, bytes | None] = {}
    for name in sorted(names):
        try:
            exported = ws.workspace.export(
                f"{workspace_dir}/{name}", format=ws_api.ExportFormat.SOURCE
            )
        except NotFound:
            out[name] = None
            continue
        except API_ERRORS as exc:
            if "does not exist" in str(exc) or "doesn't exist" in str(exc):
                out[name] = None
                continue
            raise
        out[name] = base64.b64decode(exported.content or "")
    return out


def sync_notebooks(
    ws: WorkspaceClient,
    workspace_dir: str,
    notebooks: Mapping[str, bytes],
    *,
    log: logging.Logger | None = None,
) -> dict[str, str]:
    """Upload each notebook whose workspace copy differs; return {name: uploaded|unchanged}.

    "Differs" is decided by exporting the workspace copy (SOURCE format) and comparing normalized
    text, not by a hash remembered somewhere. The workspace is the source of truth: a notebook
    edited in the Databricks UI, or uploaded from another machine or CI, is detected and
    restored, which a local hash file could not see; and there is no state to lose or go stale.
    The cost is one small export per notebook per sync, which happens once per Dagster run.
    """
    logger = log or _LOG
    try:
        ws.workspace.mkdirs(workspace_dir)
    except API_ERRORS as exc:
        raise ConfigError(
            f"cannot create workspace folder {workspace_dir}: {describe_api_error(exc)}"
        ) from None
    result: dict[str, str] = {}
    for name in sorted(notebooks):
        path = f"{workspace_dir}/{name}"
        content = notebooks[name]
        try:
            if _remote_matches(ws, path, content):
                result[name] = "unchanged"
                continue
            ws.workspace.import_(
                path,
                content=base64.b64encode(content).decode("ascii"),
                format=ws_api.ImportFormat.SOURCE,
                language=ws_api.Language.PYTHON,
                overwrite=True,
            )
        except API_ERRORS as exc:
            raise ConfigError(
                f"cannot sync notebook {name} to {path}: {describe_api_error(exc)}"
            ) from None
        result[name] = "uploaded"
        logger.info("uploaded notebook %s to %s", name, path)
    return result


def _remote_matches(ws: WorkspaceClient, path: str, content: bytes) -> bool:
    try:
        info = ws.workspace.get_status(path)
    except NotFound:
        return False
    if info.object_type != ws_api.ObjectType.NOTEBOOK:
        kind = info.object_type.value if info.object_type else "unknown object"
        raise ConfigError(
            f"workspace path {path} is a {kind}, not a notebook",
            hint="remove it or choose another workspace_dir",
        )
    if info.language not in (None, ws_api.Language.PYTHON):
        return False
    try:
        exported = ws.workspace.export(path, format=ws_api.ExportFormat.SOURCE)
    except NotFound:
        return False
    remote = base64.b64decode(exported.content or "")
    return _normalized_source(remote) == _normalized_source(content)


# One sync per (workspace, folder, local content) per process, on top of the once-per-run marker:
# four assets starting at once in one process must not upload four times.
_SYNC_LOCK = threading.Lock()
_SYNCED: dict[tuple[str, str], str] = {}


@contextlib.contextmanager
def _host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes (the step processes of one run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if os.name == "nt":  # pragma: no cover - Windows
            import msvcrt

            handle.seek(0)
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    time.sleep(0.1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run_sync_marker(host: str, workspace_dir: str, dagster_run_id: str) -> Path:
    """Where the step processes of one Dagster run record that the notebooks were synced."""
    key = hashlib.sha256(f"{host}\0{workspace_dir}\0{dagster_run_id}".encode()).hexdigest()[:32]
    return settings.home() / "databricks" / "synced" / key


def sync_once_per_run(
    ws: WorkspaceClient,
    host: str,
    workspace_dir: str,
    local: Mapping[str, bytes],
    *,
    log: logging.Logger,
) -> bool:
    """Sync the notebooks unless this Dagster run already did (in any of its step processes);
    outside a Dagster run, once per process. True if this call synced."""
    digest = notebooks_digest(local)
    key = (host, workspace_dir)
    with _SYNC_LOCK:
        if _SYNCED.get(key) == digest:
            return False
        step = _current_dagster_step()
        if step is None:
            sync_notebooks(ws, workspace_dir, local, log=log)
            _SYNCED[key] = digest
            return True
        marker = _run_sync_marker(host, workspace_dir, step[0])
        with _host_lock(marker.with_suffix(".lock")):
            if marker.is_file() and marker.read_text() == digest:
                _SYNCED[key] = digest
                return False
            sync_notebooks(ws, workspace_dir, local, log=log)
            marker.write_text(digest)
        _SYNCED[key] = digest
        return True


# --------------------------------------------------------------------------------------------
# Polling, timings, cancellation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PollPolicy:
    """Adaptive polling: `initial` seconds, times `backoff` per unchanged poll, at most `maximum`.

    Short first intervals catch fast failures (bad parameters, a missing notebook) quickly; the
    growth keeps a two-hour run from costing thousands of API calls; the cap bounds how late a
    finished run is noticed. The interval drops back to `initial` whenever the state changes,
    because a transition (e.g. PENDING -> RUNNING) is when the next one is most likely.
    """

    initial: float = 1.0
    maximum: float = 15.0
    backoff: float = 1.5


class RunDeadlineExceeded(Exception):
    def __init__(self, run: jobs.Run | None) -> None:
        super().__init__("deadline exceeded")
        self.run = run


def life_cycle_of(run: jobs.Run | jobs.RunTask) -> str:
    """The run's life cycle state name ('PENDING', 'TERMINATED', ...), from `state` or `status`."""
    if run.state is not None and run.state.life_cycle_state is not None:
        return run.state.life_cycle_state.value
    if run.status is not None and run.status.state is not None:
        return run.status.state.value
    return "UNKNOWN"


def result_of(run: jobs.Run | jobs.RunTask) -> str | None:
    if run.state is not None and run.state.result_state is not None:
        return run.state.result_state.value
    details = run.status.termination_details if run.status is not None else None
    if details is not None and details.code is not None:
        return details.code.value
    return None


def message_of(run: jobs.Run | jobs.RunTask) -> str:
    if run.state is not None and run.state.state_message:
        return run.state.state_message
    details = run.status.termination_details if run.status is not None else None
    return (details.message or "") if details is not None else ""


def is_terminal(run: jobs.Run | jobs.RunTask) -> bool:
    return life_cycle_of(run) in {s.value for s in TERMINAL_STATES}


def wait_for_run(
    ws: WorkspaceClient,
    run_id: int,
    *,
    deadline: float,
    policy: PollPolicy,
    log: logging.Logger,
    label: str,
    sleep: Callable[[float], None] = time.sleep,
) -> jobs.Run:
    """Poll `run_id` until it reaches a terminal state; `RunDeadlineExceeded` at `deadline`.

    `deadline` is a `time.monotonic()` value. Sleeps are `time.sleep`, so KeyboardInterrupt and
    Dagster's interrupt (raised from a signal handler) arrive promptly; callers cancel the run.
    """
    interval = policy.initial
    last_state: str | None = None
    announced_url = False
    while True:
        run = ws.jobs.get_run(run_id)
        state = life_cycle_of(run)
        if not announced_url and run.run_page_url:
            log.info("%s: Databricks run %s: %s", label, run_id, run.run_page_url)
            announced_url = True
        if state != last_state:
            log.info("%s: run %s is %s", label, run_id, state)
            last_state = state
            interval = policy.initial
        if is_terminal(run):
            return run
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RunDeadlineExceeded(run)
        sleep(min(interval, remaining))
        interval = min(interval * policy.backoff, policy.maximum)


def cancel_run_quietly(
    ws: WorkspaceClient, run_id: int, *, log: logging.Logger, timeout: float = 30.0
) -> bool:
    """Ask Databricks to cancel `run_id`; never raises, never blocks longer than `timeout`.

    Used on interrupt and timeout paths, where the original exception must win. The request runs
    in a helper thread because the SDK retries transient errors for minutes, and an interrupted
    process must not hang that long.
    """
    outcome: dict[str, BaseException | None] = {}

    def _cancel() -> None:
        try:
            ws.jobs.cancel_run(run_id)
            outcome["error"] = None
        except BaseException as exc:  # reported below; must not escape the helper thread
            outcome["error"] = exc

    worker = threading.Thread(target=_cancel, name=f"cancel-run-{run_id}", daemon=True)
    worker.start()
    worker.join(timeout)
    if "error" not in outcome:
        log.warning("cancelling Databricks run %s did not finish within %.0fs", run_id, timeout)
        return False
    if outcome["error"] is not None:
        log.warning("could not cancel Databricks run %s: %s", run_id, outcome["error"])
        return False
    log.warning("cancelled Databricks run %s", run_id)
    return True


def _ms_to_s(value: int | None) -> float:
    return round((value or 0) / 1000.0, 3)


def run_timings(run: jobs.Run | jobs.RunTask) -> dict[str, float]:
    """Durations in seconds, straight from Databricks' own fields (not from our polling loop)."""
    return {
        "queue_s": _ms_to_s(run.queue_duration),
        "setup_s": _ms_to_s(run.setup_duration),
        "execution_s": _ms_to_s(run.execution_duration),
        "cleanup_s": _ms_to_s(run.cleanup_duration),
    }


def fetch_error(ws: WorkspaceClient, task_run_id: int) -> tuple[str | None, str | None]:
    """(error, error_trace) of a finished task run; (None, None) if Databricks has none."""
    try:
        out = ws.jobs.get_run_output(task_run_id)
    except API_ERRORS:
        return None, None
    return out.error, out.error_trace


def find_live_run(
    ws: WorkspaceClient, notebook_path: str, parameters: Mapping[str, str]
) -> int | None:
    """A one-time run of `notebook_path` with exactly `parameters` that is still active, if any.

    Listed from the workspace (active submit runs), so it finds runs started by an earlier step
    attempt or an earlier Dagster run whose step lost track of them.
    """
    try:
        runs = ws.jobs.list_runs(
            active_only=True, run_type=jobs.RunType.SUBMIT_RUN, expand_tasks=True
        )
        for run in runs:
            for task in run.tasks or []:
                nb = task.notebook_task
                if (
                    nb is not None
                    and nb.notebook_path == notebook_path
                    and dict(nb.base_parameters or {}) == dict(parameters)
                    and not is_terminal(task)
                ):
                    return int(run.run_id or 0) or None
    except API_ERRORS as exc:
        _LOG.warning("could not list active runs (%s)", describe_api_error(exc))
    return None


def _current_dagster_step() -> tuple[str, str, int] | None:
    """(run id, step key, retry number) of the Dagster step running this code, if any."""
    try:
        ctx = dg.OpExecutionContext.get()
    except dg.DagsterInvariantViolationError:
        return None
    try:
        step_key = ctx.get_step_execution_context().step.key
    except (AttributeError, dg.DagsterInvariantViolationError):
        step_key = ctx.op_handle.to_string()
    return ctx.run_id, step_key, int(ctx.retry_number)


def _token(
    seed: list[Any], notebook: str, parameters: Mapping[str, str], workspace_dir: str
) -> str:
    payload = json.dumps(
        [seed, notebook, workspace_dir, sorted(parameters.items())], separators=(",", ":")
    )
    return ("nbpipeline-" + hashlib.sha256(payload.encode()).hexdigest())[:64]


def idempotency_tokens(
    notebook: str, parameters: Mapping[str, str], *, workspace_dir: str
) -> list[str]:
    """`jobs/runs/submit` idempotency tokens (at most 64 characters) to try, in order.

    Inside a Dagster step there is one token per step attempt so far: token k is a hash of
    (Dagster run id, step key, k, notebook, parameters, folder). Attempt n tries tokens 0..n in
    turn and keeps the first run that is still going or succeeded; a run that failed is passed
    over. So a step retried after *losing track* of a run (a network failure while polling)
    re-attaches to that run instead of starting a second one, while a step retried after the
    run *failed* gets a fresh run. A token never used before starts a run, and the search stops
    there, so at most one new run is ever started.

    Outside Dagster there is a single random token; the SDK re-sends it on transient HTTP errors,
    so even then a retried request cannot start a second run.
    """
    step = _current_dagster_step()
    if step is None:
        return [_token([uuid.uuid4().hex], notebook, parameters, workspace_dir)]
    run_id, step_key, retry_number = step
    return [
        _token([run_id, step_key, k], notebook, parameters, workspace_dir)
        for k in range(retry_number + 1)
    ]


def derive_idempotency_token(
    notebook: str, parameters: Mapping[str, str], *, workspace_dir: str
) -> str:
    """The token of the current attempt (the last of `idempotency_tokens`)."""
    return idempotency_tokens(notebook, parameters, workspace_dir=workspace_dir)[-1]


# --------------------------------------------------------------------------------------------
# The resource
# --------------------------------------------------------------------------------------------


class DatabricksNotebookBackend(NotebookBackend):
    """Runs the project's notebooks as one-time Databricks runs (`jobs/runs/submit`).

    Bind it with `DatabricksNotebookBackend.from_env(...)`, which reads the host and token through
    `dg.EnvVar`, so neither value is written into Dagster config, run config or the UI.
    """

    databricks: DatabricksClientResource = Field(
        description=(
            "dagster-databricks' DatabricksClientResource: the workspace URL and credentials. "
            "Bind host and token with dg.EnvVar('DATABRICKS_HOST') / dg.EnvVar('DATABRICKS_TOKEN') "
            "(or OAuth client id and secret) so Dagster stores and shows only the variable names; "
            "`from_env` does. Without credentials the Databricks SDK's unified auth finds them."
        )
    )
    workspace_dir: str = Field(
        default=DEFAULT_WORKSPACE_DIR,
        description=(
            "Workspace folder the local notebooks are synced into (once per Dagster run) and run "
            "from; every *.py in the notebooks folder goes there (Notebook1..4 and the %run "
            "helpers). Default /Users/{user}/nbpipeline, {user} being the authenticated user, so "
            "no other user or branch overwrites the code your runs use; /Shared/... only if set."
        ),
    )
    existing_cluster_id: str | None = Field(
        default=None,
        description="Run on this all-purpose cluster. Exactly one of existing_cluster_id, new_cluster, serverless.",
    )
    new_cluster: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Create a job cluster per run from this Databricks cluster spec: spark_version, "
            "node_type_id (or instance_pool_id), num_workers (or autoscale), plus any other "
            "clusters/create field. Exactly one of existing_cluster_id, new_cluster, serverless."
        ),
    )
    serverless: bool = Field(
        default=False,
        description=(
            "Run on serverless jobs compute (no cluster fields are sent). Notebook tasks take their "
            "serverless environment (client version, pip dependencies) from the notebook's own "
            "environment settings; the Jobs API only accepts environment_key on script, wheel and "
            "dbt tasks. Exactly one of existing_cluster_id, new_cluster, serverless."
        ),
    )
    upload_notebooks: bool = Field(
        default=True,
        description=(
            "Before the first run in a process, upload the local notebooks whose workspace copy "
            "differs. Turn off when workspace_dir is managed by something else (Git folder, bundle)."
        ),
    )
    run_name_prefix: str = Field(
        default="nbpipeline", description="Prefix of the one-time runs' names in the Databricks UI."
    )
    poll_initial_seconds: float = Field(
        default=1.0, description="First polling interval while waiting for a run, in seconds."
    )
    poll_max_seconds: float = Field(
        default=15.0, description="Upper bound of the growing polling interval, in seconds."
    )
    poll_backoff: float = Field(
        default=1.5,
        description="Factor the polling interval grows by after each unchanged poll (>= 1).",
    )
    timeout_grace_seconds: float = Field(
        default=120.0,
        description=(
            "Extra time past timeout_seconds before nbpipeline gives up and cancels the run itself. "
            "Databricks enforces timeout_seconds too (result TIMEDOUT); the grace lets it report first."
        ),
    )
    retry_timeout_seconds: int = Field(
        default=300,
        description=(
            "How long the Databricks SDK keeps retrying a call that failed transiently (HTTP "
            "429/503, refused or reset connections) before giving up."
        ),
    )
    cancel_timeout_seconds: float = Field(
        default=30.0,
        description="How long a cancel request (on interrupt or timeout) may take before it is abandoned.",
    )

    _clients: threading.local = PrivateAttr(default_factory=threading.local)

    # -- validation ---------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _check_settings(cls, values: Any) -> Any:
        """Reject bad combinations when the resource is built (code location load time).

        Runs on the raw input, where EnvVar fields are still EnvVar objects, so a variable that is
        not set is reported by name. ConfigError is not a ValueError, so pydantic lets it through
        unchanged and the user sees one line naming the fields.
        """
        if not isinstance(values, dict):
            return values
        resource = values.get("databricks")
        raw_host = getattr(resource, "host", None)
        host = _peek(raw_host)
        if not host:
            env = _env_name(raw_host)
            where = f"environment variable {env} is not set" if env else "it is empty"
            raise ConfigError(
                f"host: no Databricks workspace URL ({where})",
                hint=f"export {HOST_ENV}=https://<workspace>",
            )
        normalize_host(str(host), field="host")
        raw_token = getattr(resource, "token", None)
        if isinstance(raw_token, dg.EnvVar) and not raw_token.get_value():
            raise ConfigError(
                f"token: environment variable {raw_token.env_var_name} is not set",
                hint="set it, or leave token unset to use the Databricks SDK's unified auth",
            )
        cluster_id = _peek(values.get("existing_cluster_id"))
        new_cluster = values.get("new_cluster")
        serverless = bool(values.get("serverless", False))
        chosen = [
            name
            for name, is_set in (
                ("existing_cluster_id", bool(cluster_id)),
                ("new_cluster", bool(new_cluster)),
                ("serverless", serverless),
            )
            if is_set
        ]
        if len(chosen) != 1:
            got = " and ".join(chosen) if chosen else "none of them"
            raise ConfigError(
                f"set exactly one of existing_cluster_id, new_cluster, serverless=True (got {got})"
            )
        if new_cluster:
            check_cluster_spec(new_cluster, field="new_cluster")
        check_workspace_dir(str(_peek(values.get("workspace_dir")) or DEFAULT_WORKSPACE_DIR))
        initial = float(values.get("poll_initial_seconds", 1.0))
        maximum = float(values.get("poll_max_seconds", 15.0))
        backoff = float(values.get("poll_backoff", 1.5))
        if not (0 < initial <= maximum):
            raise ConfigError(
                "poll_initial_seconds must be > 0 and <= poll_max_seconds "
                f"(got {initial} and {maximum})"
            )
        if backoff < 1:
            raise ConfigError(f"poll_backoff must be >= 1 (got {backoff})")
        if "retry_timeout_seconds" in values and int(values["retry_timeout_seconds"]) < 1:
            raise ConfigError(
                f"retry_timeout_seconds must be >= 1 (got {values['retry_timeout_seconds']})"
            )
        for name in ("timeout_grace_seconds", "cancel_timeout_seconds"):
            if name in values and float(values[name]) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {values[name]})")
        return values

    @classmethod
    def from_env(cls, **overrides: Any) -> DatabricksNotebookBackend:
        """The resource as nbpipeline binds it: credentials through `client_resource_from_env`
        (dg.EnvVar), compute from the environment.

        Compute, unless given in `overrides`: DATABRICKS_CLUSTER_ID (an existing cluster) if set,
        else serverless.
        """
        kwargs: dict[str, Any] = {"databricks": client_resource_from_env()}
        if os.environ.get(WORKSPACE_DIR_ENV):
            kwargs["workspace_dir"] = dg.EnvVar(WORKSPACE_DIR_ENV)
        if not {"existing_cluster_id", "new_cluster", "serverless"} & overrides.keys():
            if os.environ.get(CLUSTER_ENV):
                kwargs["existing_cluster_id"] = dg.EnvVar(CLUSTER_ENV)
            else:
                kwargs["serverless"] = True
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- NotebookBackend ------------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return "databricks"

    def engine_address(self) -> str:
        return self._host()

    def run_notebook(
        self,
        notebook: str,
        parameters: Mapping[str, str],
        *,
        timeout_seconds: int = 3600,
        log: logging.Logger | None = None,
        idempotency_token: str | None = None,
    ) -> NotebookRun:
        """Submit `notebook` as a one-time run, wait for it, and return its exit JSON.

        `idempotency_token` (at most 64 characters) is normally derived; pass one to make a
        re-submit from outside Dagster return the run already started.
        """
        logger = log or _LOG
        if notebook not in NOTEBOOK_NAMES:
            raise ConfigError(
                f"unknown notebook {notebook!r}: expected one of {', '.join(NOTEBOOK_NAMES)}"
            )
        if int(timeout_seconds) <= 0:
            raise ConfigError(f"timeout_seconds must be > 0 (got {timeout_seconds})")
        if idempotency_token is not None and not 0 < len(idempotency_token) <= 64:
            raise ConfigError("idempotency_token must be 1 to 64 characters")
        # Widget values are strings on Databricks; converting here keeps base_parameters valid.
        widgets = {str(k): str(v) for k, v in parameters.items()}
        workspace_dir = self._workspace_dir()
        ws = self._client()
        if self.upload_notebooks:
            self._ensure_synced(ws, logger)
        tokens = (
            [idempotency_token]
            if idempotency_token
            else idempotency_tokens(notebook, widgets, workspace_dir=workspace_dir)
        )
        path = f"{workspace_dir}/{notebook}"
        task = jobs.SubmitTask(
            task_key=notebook,
            notebook_task=jobs.NotebookTask(
                notebook_path=path, base_parameters=widgets, source=jobs.Source.WORKSPACE
            ),
            timeout_seconds=int(timeout_seconds),
            **self._compute(),
        )
        try:
            live = find_live_run(ws, path, widgets)
            tokens = [] if live is not None else tokens
            if live is not None:
                # A run of this notebook with these values is still going (an earlier attempt or
                # a re-executed Dagster run lost track of it): wait for it, never start a second.
                logger.warning("%s: re-attaching to live Databricks run %s", notebook, live)
                run_id = live
                token = "re-attached"
            for i, token in enumerate(tokens):
                waiter = ws.jobs.submit(
                    run_name=f"{self.run_name_prefix} {notebook}",
                    tasks=[task],
                    idempotency_token=token,
                    timeout_seconds=int(timeout_seconds),
                )
                run_id = int(waiter.run_id)
                if i == len(tokens) - 1:
                    break
                # A token of an earlier attempt: keep its run unless that run failed.
                earlier = ws.jobs.get_run(run_id)
                if not is_terminal(earlier) or result_of(earlier) == "SUCCESS":
                    logger.info(
                        "%s: re-attaching to run %s of an earlier attempt", notebook, run_id
                    )
                    break
        except API_ERRORS as exc:
            raise NotebookError(
                f"could not submit the run: {describe_api_error(exc)}", notebook=notebook
            ) from None
        logger.info("%s: submitted Databricks run %s", notebook, run_id)

        deadline = time.monotonic() + int(timeout_seconds) + self.timeout_grace_seconds
        try:
            run = wait_for_run(
                ws, run_id, deadline=deadline, policy=self._policy(), log=logger, label=notebook
            )
        except RunDeadlineExceeded as exc:
            cancel_run_quietly(ws, run_id, log=logger, timeout=self.cancel_timeout_seconds)
            url = exc.run.run_page_url if exc.run is not None else None
            raise NotebookTimeout(
                f"no result after {timeout_seconds}s (+{self.timeout_grace_seconds:.0f}s grace); "
                "the Databricks run was cancelled",
                notebook=notebook,
                run_url=url,
                run_id=run_id,
                hint=f"see {url}" if url else None,
            ) from None
        except (KeyboardInterrupt, dg.DagsterExecutionInterruptedError):
            cancel_run_quietly(ws, run_id, log=logger, timeout=self.cancel_timeout_seconds)
            raise
        except API_ERRORS as exc:
            # Never leave a run going that nobody watches: cancel it. If even that fails, the
            # next attempt or re-execution finds it live (find_live_run) and waits for it.
            cancelled = cancel_run_quietly(
                ws, run_id, log=logger, timeout=self.cancel_timeout_seconds
            )
            if cancelled:
                # Wait (briefly) until it is really over, so a retry sees it ended.
                with contextlib.suppress(*API_ERRORS, RunDeadlineExceeded):
                    wait_for_run(
                        ws,
                        run_id,
                        deadline=time.monotonic() + self.cancel_timeout_seconds,
                        policy=self._policy(),
                        log=logger,
                        label=notebook,
                    )
            outcome = (
                "it was cancelled"
                if cancelled
                else "cancelling it failed too; a retry or re-execution re-attaches to it"
            )
            raise NotebookError(
                f"lost track of Databricks run {run_id} ({describe_api_error(exc)}); {outcome}",
                notebook=notebook,
                run_id=run_id,
            ) from None
        return self._finish(ws, notebook, path, run, token, timeout_seconds, logger)

    # -- public helpers -------------------------------------------------------------------------

    def sync_notebooks(self, log: logging.Logger | None = None) -> dict[str, str]:
        """Upload every local notebook whose workspace copy differs; {name: uploaded|unchanged}."""
        ws = self._client()
        local = local_notebooks()
        result = sync_notebooks(ws, self._workspace_dir(), local, log=log or _LOG)
        with _SYNC_LOCK:
            _SYNCED[(self._host(), self._workspace_dir())] = notebooks_digest(local)
        return result

    def workspace_client(self) -> WorkspaceClient:
        """The authenticated SDK client this resource uses (one per thread)."""
        return self._client()

    # -- internals ------------------------------------------------------------------------------

    def _host(self) -> str:
        return normalize_host(str(_peek(self.databricks.host) or ""), field="host")

    def _workspace_dir(self) -> str:
        folder = check_workspace_dir(str(_peek(self.workspace_dir) or DEFAULT_WORKSPACE_DIR))
        if "{user}" not in folder:
            return folder
        resolved = getattr(self._clients, "workspace_dir", None)
        if resolved is None:
            resolved = resolve_workspace_dir(self._client(), folder)
            self._clients.workspace_dir = resolved
        return resolved

    def _policy(self) -> PollPolicy:
        return PollPolicy(self.poll_initial_seconds, self.poll_max_seconds, self.poll_backoff)

    def _client(self) -> WorkspaceClient:
        # One client per thread: requests.Session is not documented as thread-safe, and the
        # assets may call run_notebook from several threads at once.
        client = getattr(self._clients, "client", None)
        if client is None:
            client = make_workspace_client(
                self._host(),
                None,
                retry_timeout_seconds=self.retry_timeout_seconds,
                resource=self.databricks,
            )
            self._clients.client = client
        return client

    def _compute(self) -> dict[str, Any]:
        cluster_id = _peek(self.existing_cluster_id)
        if cluster_id:
            return {"existing_cluster_id": str(cluster_id)}
        if self.new_cluster:
            return {"new_cluster": compute.ClusterSpec.from_dict(dict(self.new_cluster))}
        return {}  # serverless: a notebook task with no compute runs on serverless jobs compute

    def _ensure_synced(self, ws: WorkspaceClient, log: logging.Logger) -> None:
        sync_once_per_run(ws, self._host(), self._workspace_dir(), local_notebooks(), log=log)

    def _finish(
        self,
        ws: WorkspaceClient,
        notebook: str,
        path: str,
        run: jobs.Run,
        token: str,
        timeout_seconds: int,
        log: logging.Logger,
    ) -> NotebookRun:
        run_id = int(run.run_id or 0)
        url = run.run_page_url
        # A submitted run has one task; its durations and output live on the task run, and
        # get-output refuses the parent id of a multi-task-format run.
        task = run.tasks[0] if run.tasks else None
        source: jobs.Run | jobs.RunTask = task if task is not None else run
        task_run_id = int(source.run_id or run_id)
        state, result, message = life_cycle_of(run), result_of(run), message_of(run)
        timings = run_timings(source)
        if not timings["queue_s"] and run.queue_duration:
            timings["queue_s"] = _ms_to_s(run.queue_duration)

        if state == "TERMINATED" and result == "SUCCESS":
            try:
                output = ws.jobs.get_run_output(task_run_id)
            except API_ERRORS as exc:
                raise NotebookError(
                    f"finished, but its output could not be read: {describe_api_error(exc)}",
                    notebook=notebook,
                    run_url=url,
                    run_id=run_id,
                ) from None
            nb_out = output.notebook_output
            if nb_out is not None and nb_out.truncated:
                raise NotebookError(
                    "its exit value was truncated by Databricks (over the output size limit)",
                    notebook=notebook,
                    run_url=url,
                    run_id=run_id,
                )
            try:
                exit_value = parse_exit_value(nb_out.result if nb_out else None, notebook=notebook)
            except NotebookError as exc:
                raise NotebookError(
                    exc.reason, notebook=notebook, run_url=url, run_id=run_id, hint=f"see {url}"
                ) from None
            started = (run.start_time or 0) / 1000.0
            ended = (run.end_time or 0) / 1000.0 or time.time()
            extra: dict[str, Any] = {
                "run_id": run_id,
                "task_run_id": task_run_id,
                "run_url": url,
                **timings,
                "run_duration_s": _ms_to_s(run.run_duration) or round(ended - started, 3),
                "result_state": result,
                "idempotency_token": token,
            }
            if source.cluster_instance is not None and source.cluster_instance.cluster_id:
                extra["cluster_id"] = source.cluster_instance.cluster_id
            log.info(
                "%s: succeeded (queue %.1fs, setup %.1fs, execution %.1fs, cleanup %.1fs)",
                notebook,
                timings["queue_s"],
                timings["setup_s"],
                timings["execution_s"],
                timings["cleanup_s"],
            )
            return NotebookRun(
                notebook=notebook,
                location=path,
                backend=self.backend_name,
                engine=self._host(),
                exit_value=exit_value,
                started_at=started,
                ended_at=ended,
                extra=extra,
            )

        error, trace = fetch_error(ws, task_run_id) if state == "TERMINATED" else (None, None)
        detail = _shorten(error or message or "no message from Databricks")
        exc_type: type[NotebookError] = NotebookError
        if state == "SKIPPED":
            reason = f"the Databricks run was skipped: {detail}"
        elif state == "INTERNAL_ERROR":
            reason = f"Databricks internal error: {detail}"
        elif result == "TIMEDOUT":
            exc_type = NotebookTimeout
            reason = f"timed out on Databricks after {timeout_seconds}s: {detail}"
        elif result == "CANCELED":
            reason = f"the Databricks run was cancelled: {detail}"
        elif result == "FAILED":
            reason = f"failed on Databricks: {detail}"
        else:
            reason = f"ended with {state}/{result}: {detail}"
        log.error("%s: %s (%s)", notebook, reason, url)
        raise exc_type(
            reason,
            notebook=notebook,
            traceback_text=trace,
            hint=f"see {url}" if url else None,
            run_url=url,
            run_id=run_id,
        )


def check_cluster_spec(spec: Mapping[str, Any], *, field: str) -> None:
    """Minimal checks of a job-cluster spec; Databricks validates the rest on submit."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{field} must be a mapping of cluster settings")
    problems = []
    if not spec.get("spark_version"):
        problems.append("spark_version")
    if not (spec.get("node_type_id") or spec.get("instance_pool_id") or spec.get("policy_id")):
        problems.append("node_type_id (or instance_pool_id)")
    if spec.get("num_workers") is None and not spec.get("autoscale"):
        problems.append("num_workers (or autoscale)")
    if problems:
        raise ConfigError(f"{field} is missing {', '.join(problems)}")


def _shorten(text: str, limit: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "DatabricksNotebookBackend",
    "PollPolicy",
    "cancel_run_quietly",
    "derive_idempotency_token",
    "idempotency_tokens",
    "local_notebooks",
    "make_workspace_client",
    "normalize_host",
    "sync_notebooks",
    "wait_for_run",
    "workspace_client_from_env",
]
