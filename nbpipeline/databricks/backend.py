"""Run the project's notebooks on a Databricks workspace.

`DatabricksNotebookBackend` is the Databricks implementation of `NotebookBackend`: it keeps a
per-user workspace folder in step with the local notebooks (once per Dagster run), submits
one-time runs (`jobs/runs/submit`) with the widget values as `base_parameters`, waits for them
with adaptive polling, and returns the notebook's `dbutils.notebook.exit` JSON unchanged. A run it
loses track of is cancelled, or found live and re-attached to by the next attempt.

Credentials are those of `nbpipeline.databricks.client`: no `NotebookResult` built here contains the
token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster_databricks import DatabricksClientResource
from databricks.sdk import WorkspaceClient
from databricks.sdk.service import compute, jobs
from pydantic import Field, PrivateAttr, model_validator

from nbpipeline.backend import NOTEBOOK_NAMES, NotebookBackend, NotebookResult, parse_exit_value
from nbpipeline.databricks.client import (
    API_ERRORS,
    CLUSTER_ENV,
    DEFAULT_WORKSPACE_DIR,
    HOST_ENV,
    WORKSPACE_DIR_ENV,
    check_workspace_dir,
    client_resource_from_env,
    config_value,
    describe_api_error,
    env_var_name,
    make_workspace_client,
    normalize_host,
    resolve_workspace_dir,
)
from nbpipeline.databricks.polling import (
    PollPolicy,
    fetch_error,
    find_live_run,
    is_terminal,
    life_cycle_of,
    message_of,
    ms_to_s,
    result_of,
    run_timings,
    watch_run,
)
from nbpipeline.databricks.sync import (
    current_dagster_step,
    local_notebooks,
    remember_synced,
    sync_notebooks,
    sync_once_per_run,
)
from nbpipeline.errors import ConfigError, NotebookError, NotebookTimeout

_LOG = logging.getLogger("nbpipeline.databricks")


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
    step = current_dagster_step()
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
        host = config_value(raw_host)
        if not host:
            env = env_var_name(raw_host)
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
        cluster_id = config_value(values.get("existing_cluster_id"))
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
        check_workspace_dir(str(config_value(values.get("workspace_dir")) or DEFAULT_WORKSPACE_DIR))
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
    ) -> NotebookResult:
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

        run = watch_run(
            ws,
            run_id,
            label=notebook,
            deadline=time.monotonic() + int(timeout_seconds) + self.timeout_grace_seconds,
            waited=f"{timeout_seconds}s (+{self.timeout_grace_seconds:.0f}s grace)",
            policy=self._policy(),
            log=logger,
            cancel_timeout=self.cancel_timeout_seconds,
            cancel_when_lost=True,
        )
        return self._finish(ws, notebook, path, run, token, timeout_seconds, logger)

    # -- public helpers -------------------------------------------------------------------------

    def sync_notebooks(self, log: logging.Logger | None = None) -> dict[str, str]:
        """Upload every local notebook whose workspace copy differs; {name: uploaded|unchanged}."""
        ws = self._client()
        local = local_notebooks()
        result = sync_notebooks(ws, self._workspace_dir(), local, log=log or _LOG)
        remember_synced(self._host(), self._workspace_dir(), local)
        return result

    def workspace_client(self) -> WorkspaceClient:
        """The authenticated SDK client this resource uses (one per thread)."""
        return self._client()

    # -- internals ------------------------------------------------------------------------------

    def _host(self) -> str:
        return normalize_host(str(config_value(self.databricks.host) or ""), field="host")

    def _workspace_dir(self) -> str:
        folder = check_workspace_dir(str(config_value(self.workspace_dir) or DEFAULT_WORKSPACE_DIR))
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
        cluster_id = config_value(self.existing_cluster_id)
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
    ) -> NotebookResult:
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
            timings["queue_s"] = ms_to_s(run.queue_duration)

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
                "run_duration_s": ms_to_s(run.run_duration) or round(ended - started, 3),
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
            return NotebookResult(
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
    "check_cluster_spec",
    "derive_idempotency_token",
    "idempotency_tokens",
]
