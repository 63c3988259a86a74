"""A loopback Databricks workspace for tests: a real HTTP server speaking a documented subset of
the REST API, so databricks-sdk's own client (auth header, JSON, error mapping, retries) runs
unmodified against it. This module is the HTTP layer (routes, request parsing, JSON responses);
run life cycles are planned by fakes.databricks_runs.

Covered: SCIM Me; workspace get-status / import / export / mkdirs; jobs list (paginated with
page_token / next_page_token / has_more), create, reset, get, run-now; runs submit, get,
get-output, cancel, list.

Every run carries Databricks-shaped fields: start_time / end_time (ms since the epoch),
queue_duration, setup_duration, execution_duration, cleanup_duration (ms), run_duration,
run_page_url, tasks[]. As on Databricks, a submitted run is in multi-task format: the parent's
setup/execution/cleanup are 0 and get-output must be called with the task run id.

The server checks `Authorization: Bearer <token>`, honours idempotency tokens (same token -> same
run id), and records every request so tests can assert exactly what it received. Errors can be
injected, before or after a request takes effect (the latter simulates a lost response).

Test double only; it lives in the tests.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nbpipeline_tests.fakes.databricks_runs import (
    RESULTS,
    Behaviour,
    Phases,
    Run,
    Task,
    child_runs,
    ms,
    orchestration_children,
    parent_state,
    plan,
    state_at,
    status,
    task_output,
)

NOTEBOOK_HEADER = "# Databricks notebook source\n"
WORKSPACE_ORG_ID = "1234567890123456"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorization: str | None
    auth_ok: bool
    at: float


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class LoopbackDatabricks:
    """The workspace. Use as a context manager, or call start() / stop()."""

    def __init__(
        self,
        token: str = "dapi-loopback-test-token",
        *,
        page_size: int = 25,
        default: Behaviour | None = None,
        user: str = "loopback@example.com",
    ) -> None:
        self.token = token
        self.page_size = page_size
        self.default = default or Behaviour()
        self.user = user
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: list[Recorded] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.jobs: dict[int, dict[str, Any]] = {}
        self.runs: dict[int, Run] = {}
        self._task_parent: dict[int, int] = {}
        self._tokens: dict[str, int] = {}
        self._injections: list[dict[str, Any]] = []
        self._next_id = 1000
        self._next_job = 100
        self._next_object = 5000
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for path in ("/", "/Shared", "/Users", f"/Users/{user}"):
            self._mkdir(path)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LoopbackDatabricks:
        handler = type("Handler", (_Handler,), {"workspace": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() returns quickly
            name="databricks-loopback",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LoopbackDatabricks:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- configuration used by tests ------------------------------------------------------------

    def behave(self, notebook: str, **changes: Any) -> None:
        """Set how runs of `notebook` (a workspace path's last segment) go from now on."""
        if "result" in changes and changes["result"] not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}")
        with self._lock:
            self.behaviours[notebook] = replace(self._behaviour(notebook), **changes)

    def set_output(self, notebook: str, value: dict[str, Any] | str) -> None:
        """What `notebook` passes to dbutils.notebook.exit on success."""
        self.behave(notebook, exit_value=value if isinstance(value, str) else json.dumps(value))

    def inject_error(
        self,
        method: str,
        path: str,
        *,
        status: int = 503,
        times: int = 1,
        after_processing: bool = False,
        retry_after: int | None = 0,
        code: str = "TEMPORARILY_UNAVAILABLE",
        message: str = "The service is temporarily unavailable",
    ) -> None:
        """Answer the next `times` requests to `path` with an error.

        With `after_processing` the request takes effect first (a run is created, a job
        written) and only the response is lost: the case idempotency tokens exist for.
        """
        with self._lock:
            self._injections.append(
                dict(
                    method=method.upper(),
                    path=path,
                    status=status,
                    times=times,
                    after=after_processing,
                    retry_after=retry_after,
                    code=code,
                    message=message,
                )
            )

    def add_job(self, settings: dict[str, Any]) -> int:
        """Create a job directly (e.g. unrelated jobs to page through)."""
        with self._lock:
            return self._create_job(copy.deepcopy(settings))

    def requests_to(self, path_suffix: str, method: str | None = None) -> list[Recorded]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.endswith(path_suffix) and (method is None or r.method == method)
            ]

    def notebook_source(self, path: str) -> str:
        return self.objects[path]["content"].decode()

    def timeline(self, run_id: int) -> dict[str, Any]:
        """The server's own view of a run: start/end and phase durations in seconds."""
        with self._lock:
            run = self._run_for(run_id)
            phases = plan(run)
            out = []
            for task in run.tasks:
                p = phases[task.run_id]
                if p.ready is None:
                    out.append({"task_key": task.task_key, "started": False})
                    continue
                out.append(
                    {
                        "task_key": task.task_key,
                        "run_id": task.run_id,
                        "start": p.ready,
                        "end": p.end,
                        "queue_s": p.queue_end - p.ready,
                        "setup_s": p.setup_end - p.queue_end,
                        "execution_s": p.exec_end - p.setup_end,
                        "cleanup_s": p.end - p.exec_end,
                        "result": p.result,
                    }
                )
            return {"run_id": run.run_id, "created": run.created, "tasks": out}

    # -- request dispatch -----------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: Any, body: bytes
    ) -> tuple[int, dict, dict]:
        parts = urlsplit(raw_path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            payload = json.loads(body) if body else {}
        except json.JSONDecodeError:
            return 400, {"error_code": "MALFORMED_REQUEST", "message": "Invalid JSON"}, {}
        authorization = headers.get("Authorization")
        auth_ok = authorization == f"Bearer {self.token}"
        with self._lock:
            self.requests.append(
                Recorded(method, path, query, payload, authorization, auth_ok, time.time())
            )
            injection = self._take_injection(method, path)
        if authorization is None or not authorization.startswith("Bearer "):
            return (
                401,
                {
                    "error_code": "UNAUTHENTICATED",
                    "message": "Credential was not sent or was of an unsupported type for this API.",
                },
                {},
            )
        if not auth_ok:
            return 403, {"error_code": "PERMISSION_DENIED", "message": "Invalid access token."}, {}
        if injection is not None and not injection["after"]:
            return self._injected(injection)
        route = _ROUTES.get((method, _normalize(path)))
        try:
            if route is None:
                raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
            with self._lock:
                result = route(self, query, payload)
        except ApiError as exc:
            headers_out = (
                {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
            )
            return exc.status, {"error_code": exc.code, "message": exc.message}, headers_out
        if injection is not None:
            return self._injected(injection)
        return 200, result, {}

    def _take_injection(self, method: str, path: str) -> dict[str, Any] | None:
        for inj in self._injections:
            if (
                inj["method"] == method
                and _normalize(path) == _normalize(inj["path"])
                and inj["times"] > 0
            ):
                inj["times"] -= 1
                return inj
        return None

    @staticmethod
    def _injected(inj: dict[str, Any]) -> tuple[int, dict, dict]:
        headers = {"Retry-After": str(inj["retry_after"])} if inj["retry_after"] is not None else {}
        return inj["status"], {"error_code": inj["code"], "message": inj["message"]}, headers

    # -- workspace --------------------------------------------------------------------------------

    def _mkdir(self, path: str) -> None:
        if path not in self.objects:
            self._next_object += 1
            self.objects[path] = {"object_type": "DIRECTORY", "object_id": self._next_object}

    def _ws_get_status(self, q: dict, _b: dict) -> dict:
        obj = self._object(q.get("path", ""))
        info = {"path": q["path"], "object_type": obj["object_type"], "object_id": obj["object_id"]}
        if obj["object_type"] == "NOTEBOOK":
            info.update(
                language=obj["language"],
                created_at=obj["created_at"],
                modified_at=obj["modified_at"],
            )
        return info

    def _ws_export(self, q: dict, _b: dict) -> dict:
        obj = self._object(q.get("path", ""))
        if obj["object_type"] != "NOTEBOOK":
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Only notebooks can be exported here")
        if q.get("format", "SOURCE") != "SOURCE":
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Only SOURCE export is simulated")
        return {"content": base64.b64encode(obj["content"]).decode(), "file_type": "py"}

    def _ws_import(self, _q: dict, b: dict) -> dict:
        path = b.get("path", "")
        if not path.startswith("/"):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Path ({path}) must be absolute")
        if b.get("format") not in ("SOURCE", "AUTO"):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Only SOURCE/AUTO import is simulated")
        if b.get("format") == "SOURCE" and not b.get("language"):
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "language is required for SOURCE imports"
            )
        parent = path.rsplit("/", 1)[0] or "/"
        if self.objects.get(parent, {}).get("object_type") != "DIRECTORY":
            raise ApiError(
                404, "RESOURCE_DOES_NOT_EXIST", f"The parent folder ({parent}) does not exist."
            )
        existing = self.objects.get(path)
        if existing is not None:
            if existing["object_type"] == "DIRECTORY":
                raise ApiError(400, "RESOURCE_ALREADY_EXISTS", f"{path} is a directory")
            if not b.get("overwrite"):
                raise ApiError(400, "RESOURCE_ALREADY_EXISTS", f"{path} already exists.")
        try:
            text = base64.b64decode(b.get("content", ""), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "content is not base64 UTF-8") from None
        # Databricks stores notebooks normalized: LF line endings, the source header first.
        text = text.replace("\r\n", "\n")
        if not text.startswith(NOTEBOOK_HEADER.strip()):
            text = NOTEBOOK_HEADER + text
        now = ms(time.time())
        self._next_object += 1
        self.objects[path] = {
            "object_type": "NOTEBOOK",
            "language": b.get("language", "PYTHON"),
            "content": text.encode(),
            "object_id": existing["object_id"] if existing else self._next_object,
            "created_at": existing["created_at"] if existing else now,
            "modified_at": now,
        }
        return {}

    def _ws_mkdirs(self, _q: dict, b: dict) -> dict:
        path = b.get("path", "")
        if not path.startswith("/"):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Path ({path}) must be absolute")
        prefix = ""
        for part in [p for p in path.split("/") if p]:
            prefix += "/" + part
            obj = self.objects.get(prefix)
            if obj is not None and obj["object_type"] != "DIRECTORY":
                raise ApiError(
                    400, "RESOURCE_ALREADY_EXISTS", f"{prefix} exists and is not a directory"
                )
            self._mkdir(prefix)
        return {}

    def _object(self, path: str) -> dict[str, Any]:
        obj = self.objects.get(path.rstrip("/") or "/")
        if obj is None:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Path ({path}) doesn't exist.")
        return obj

    # -- jobs -----------------------------------------------------------------------------------

    def _validate_settings(self, s: dict[str, Any]) -> None:
        if not s.get("name"):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Job name is required")
        keys = [t.get("task_key") for t in s.get("tasks", [])]
        if len(set(keys)) != len(keys) or not all(keys):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Task keys must be unique and non-empty")
        cluster_keys = {c.get("job_cluster_key") for c in s.get("job_clusters", [])}
        for t in s.get("tasks", []):
            for dep in t.get("depends_on", []):
                if dep.get("task_key") not in keys:
                    raise ApiError(
                        400,
                        "INVALID_PARAMETER_VALUE",
                        f"Task {t['task_key']} depends on unknown task {dep.get('task_key')}",
                    )
            if "job_cluster_key" in t and t["job_cluster_key"] not in cluster_keys:
                raise ApiError(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    f"Job cluster {t['job_cluster_key']} is not defined",
                )
        sched = s.get("schedule")
        if sched is not None and not (
            sched.get("quartz_cron_expression") and sched.get("timezone_id")
        ):
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "schedule needs quartz_cron_expression and timezone_id",
            )

    def _create_job(self, settings: dict[str, Any]) -> int:
        self._validate_settings(settings)
        job_id = self._new_job_id()
        self.jobs[job_id] = {"settings": settings, "created_time": ms(time.time())}
        return job_id

    def _job(self, job_id: Any) -> dict[str, Any]:
        try:
            return self.jobs[int(job_id)]
        except (KeyError, TypeError, ValueError):
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", f"Job {job_id} does not exist."
            ) from None

    def _jobs_create(self, _q: dict, b: dict) -> dict:
        settings = {k: v for k, v in b.items() if k != "access_control_list"}
        return {"job_id": self._create_job(settings)}

    def _jobs_reset(self, _q: dict, b: dict) -> dict:
        job = self._job(b.get("job_id"))
        settings = b.get("new_settings")
        if not isinstance(settings, dict):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "new_settings is required")
        self._validate_settings(settings)
        job["settings"] = copy.deepcopy(settings)  # a full replacement, as on Databricks
        return {}

    def _server_view(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Settings as jobs/get returns them: with the defaults Databricks fills in."""
        s = copy.deepcopy(settings)
        s.setdefault("format", "MULTI_TASK")
        s.setdefault("email_notifications", {})
        s.setdefault("webhook_notifications", {})
        s.setdefault("timeout_seconds", 0)
        s.setdefault("max_concurrent_runs", 1)
        s.setdefault("run_as", {"user_name": self.user})
        for t in s.get("tasks", []):
            t.setdefault("run_if", "ALL_SUCCESS")
            t.setdefault("timeout_seconds", 0)
            t.setdefault("email_notifications", {})
            if "notebook_task" in t:
                t["notebook_task"].setdefault("source", "WORKSPACE")
        for c in s.get("job_clusters", []):
            c.get("new_cluster", {}).setdefault("enable_elastic_disk", True)
            c.get("new_cluster", {}).setdefault(
                "aws_attributes", {"availability": "SPOT_WITH_FALLBACK", "zone_id": "auto"}
            )
        return s

    def _jobs_get(self, q: dict, _b: dict) -> dict:
        job_id = int(q.get("job_id", 0))
        job = self._job(job_id)
        return {
            "job_id": job_id,
            "creator_user_name": self.user,
            "run_as_user_name": self.user,
            "created_time": job["created_time"],
            "settings": self._server_view(job["settings"]),
        }

    def _page(self, items: list[Any], q: dict, key: str) -> dict:
        limit = int(q.get("limit") or 20)
        if not 0 < limit <= 100:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "limit must be between 1 and 100")
        size = min(limit, self.page_size)
        token = q.get("page_token") or "0"
        try:
            offset = int(token)
        except ValueError:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Invalid page token") from None
        chunk = items[offset : offset + size]
        has_more = offset + size < len(items)
        out: dict[str, Any] = {key: chunk, "has_more": has_more}
        if has_more:
            out["next_page_token"] = str(offset + size)
        if offset:
            out["prev_page_token"] = str(max(0, offset - size))
        return out

    def _jobs_list(self, q: dict, _b: dict) -> dict:
        expand = q.get("expand_tasks") == "true"
        name = q.get("name")
        listed = []
        for job_id in sorted(self.jobs, reverse=True):  # newest first, as Databricks lists them
            settings = self.jobs[job_id]["settings"]
            if name is not None and settings.get("name", "").lower() != name.lower():
                continue
            shown = self._server_view(settings)
            if not expand:
                shown.pop("tasks", None)
                shown.pop("job_clusters", None)
            listed.append(
                {
                    "job_id": job_id,
                    "creator_user_name": self.user,
                    "created_time": self.jobs[job_id]["created_time"],
                    "settings": shown,
                }
            )
        return self._page(listed, q, "jobs")

    # -- runs -------------------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _make_task(self, spec: dict[str, Any], default_timeout: float, compute: dict) -> Task:
        nb = spec.get("notebook_task")
        if not nb or not nb.get("notebook_path"):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Only notebook tasks are simulated")
        path = nb["notebook_path"]
        name = path.rstrip("/").rsplit("/", 1)[-1]
        children, orchestration_s = orchestration_children(name, self._behaviour)
        return Task(
            children=children,
            orchestration_s=orchestration_s,
            run_id=self._new_id(),
            task_key=spec["task_key"],
            notebook_path=path,
            params=dict(nb.get("base_parameters") or {}),
            behaviour=self._behaviour(name),
            depends_on=[d["task_key"] for d in spec.get("depends_on", [])],
            timeout_s=float(spec.get("timeout_seconds") or default_timeout or 0),
            compute=compute,
            spec=copy.deepcopy(spec),
            notebook_missing=self.objects.get(path, {}).get("object_type") != "NOTEBOOK",
        )

    def _register(self, run: Run) -> None:
        self.runs[run.run_id] = run
        for task in run.tasks:
            self._task_parent[task.run_id] = run.run_id
        if run.idempotency_token:
            self._tokens[run.idempotency_token] = run.run_id
        if any(t.children for t in run.tasks):
            for child in child_runs(run, self._behaviour, self._new_id, self._new_job_id):
                self.runs[child.run_id] = child
                self._task_parent[child.tasks[0].run_id] = child.run_id

    def _behaviour(self, notebook: str) -> Behaviour:
        return self.behaviours.get(notebook, self.default)

    def _new_job_id(self) -> int:
        self._next_job += 1
        return self._next_job

    def _check_token(self, token: str | None) -> int | None:
        if token is None:
            return None
        if not 0 < len(token) <= 64:
            raise ApiError(
                400, "INVALID_PARAMETER_VALUE", "idempotency_token must be at most 64 characters"
            )
        return self._tokens.get(token)

    def _runs_submit(self, _q: dict, b: dict) -> dict:
        existing = self._check_token(b.get("idempotency_token"))
        if existing is not None:
            return {"run_id": existing}
        specs = b.get("tasks") or []
        if not specs:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "At least one task is required")
        tasks = []
        for spec in specs:
            if not spec.get("task_key"):
                raise ApiError(400, "INVALID_PARAMETER_VALUE", "task_key is required")
            if "job_cluster_key" in spec:
                raise ApiError(
                    400, "INVALID_PARAMETER_VALUE", "job_cluster_key is not allowed in runs/submit"
                )
            if spec.get("existing_cluster_id") and spec.get("new_cluster"):
                raise ApiError(
                    400,
                    "INVALID_PARAMETER_VALUE",
                    "existing_cluster_id and new_cluster are mutually exclusive",
                )
            compute = {k: spec[k] for k in ("existing_cluster_id", "new_cluster") if k in spec}
            tasks.append(self._make_task(spec, float(b.get("timeout_seconds") or 0), compute))
        run = Run(
            run_id=self._new_id(),
            job_id=self._new_job_id(),  # one-time runs get an ephemeral job id, as on Databricks
            run_name=b.get("run_name") or "Untitled",
            run_type="SUBMIT_RUN",
            created=time.time(),
            tasks=tasks,
            timeout_s=float(b.get("timeout_seconds") or 0),
            idempotency_token=b.get("idempotency_token"),
            number_in_job=1,
        )
        self._register(run)
        return {"run_id": run.run_id}

    def _jobs_run_now(self, _q: dict, b: dict) -> dict:
        existing = self._check_token(b.get("idempotency_token"))
        if existing is not None:
            return {"run_id": existing, "number_in_job": self.runs[existing].number_in_job}
        job_id = int(b.get("job_id", 0))
        settings = self._job(job_id)["settings"]
        clusters = {
            c["job_cluster_key"]: c["new_cluster"] for c in settings.get("job_clusters", [])
        }
        tasks = []
        for spec in settings.get("tasks", []):
            compute = {
                "job_cluster_key": spec.get("job_cluster_key"),
                "new_cluster": clusters.get(spec.get("job_cluster_key")),
            }
            tasks.append(self._make_task(spec, 0, compute))
        number = 1 + sum(1 for r in self.runs.values() if r.job_id == job_id)
        run = Run(
            run_id=self._new_id(),
            job_id=job_id,
            run_name=settings["name"],
            run_type="JOB_RUN",
            created=time.time(),
            tasks=tasks,
            timeout_s=float(settings.get("timeout_seconds") or 0),
            idempotency_token=b.get("idempotency_token"),
            number_in_job=number,
            job_parameters=dict(b.get("job_parameters") or {}),
        )
        self._register(run)
        return {"run_id": run.run_id, "number_in_job": number}

    def _run_for(self, run_id: Any) -> Run:
        try:
            rid = int(run_id)
        except (TypeError, ValueError):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Invalid run_id {run_id!r}") from None
        rid = self._task_parent.get(rid, rid)
        if rid not in self.runs:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", f"Run {run_id} does not exist.")
        return self.runs[rid]

    def _task_json(self, run: Run, task: Task, p: Phases, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": task.run_id,
            "task_key": task.task_key,
            "notebook_task": copy.deepcopy(task.spec["notebook_task"]),
            "attempt_number": 0,
            "run_page_url": self._url(run.job_id, task.run_id),
            "depends_on": [{"task_key": k} for k in task.depends_on],
            **{k: v for k, v in task.compute.items() if v is not None},
        }
        if not out["depends_on"]:
            del out["depends_on"]
        life, result, message = state_at(p, now)
        out["state"] = {
            "life_cycle_state": life,
            "state_message": message,
            "user_cancelled_or_timedout": p.user_cancelled_or_timedout and result is not None,
        }
        if result is not None:
            out["state"]["result_state"] = result
        out["status"] = status(life, result, message)
        if p.ready is None or now < p.ready:
            out.update(
                start_time=0,
                setup_duration=0,
                execution_duration=0,
                cleanup_duration=0,
                end_time=ms(p.end) if now >= p.end and p.ready is None else 0,
            )
            return out
        # Phases are reported once they are over, like Databricks does.
        out["start_time"] = ms(p.ready)
        out["queue_duration"] = ms(p.queue_end) - ms(p.ready) if now >= p.queue_end else 0
        out["setup_duration"] = ms(p.setup_end) - ms(p.queue_end) if now >= p.setup_end else 0
        out["execution_duration"] = ms(p.exec_end) - ms(p.setup_end) if now >= p.exec_end else 0
        out["cleanup_duration"] = ms(p.end) - ms(p.exec_end) if now >= p.end else 0
        out["end_time"] = ms(p.end) if now >= p.end else 0
        if now >= p.end:
            out["run_duration"] = ms(p.end) - ms(p.ready)
        if now >= p.queue_end and "existing_cluster_id" in task.compute:
            out["cluster_instance"] = {
                "cluster_id": task.compute["existing_cluster_id"],
                "spark_context_id": "8734983498349834",
            }
        return out

    def _url(self, job_id: int, run_id: int) -> str:
        return f"{self.host}/?o={WORKSPACE_ORG_ID}#job/{job_id}/run/{run_id}"

    def _run_json(self, run: Run, now: float) -> dict[str, Any]:
        plans = plan(run)
        tasks = [self._task_json(run, t, plans[t.run_id], now) for t in run.tasks]
        task_states = [state_at(plans[t.run_id], now) for t in run.tasks]
        done, life, result, message = parent_state(run, task_states)
        end = max(p.end for p in plans.values())
        out: dict[str, Any] = {
            "job_id": run.job_id,
            "run_id": run.run_id,
            "number_in_job": run.number_in_job,
            "original_attempt_run_id": run.run_id,
            "run_name": run.run_name,
            "run_type": run.run_type,
            "creator_user_name": self.user,
            "format": "MULTI_TASK",
            "run_page_url": self._url(run.job_id, run.run_id),
            "start_time": ms(run.created),
            # Multi-task format: the parent's phase durations are 0; run_duration carries the total.
            "setup_duration": 0,
            "execution_duration": 0,
            "cleanup_duration": 0,
            "queue_duration": tasks[0].get("queue_duration", 0) if tasks else 0,
            "end_time": ms(end) if done else 0,
            "tasks": tasks,
            "state": {
                "life_cycle_state": life,
                "state_message": message,
                "user_cancelled_or_timedout": run.cancel_at is not None and done,
            },
            "status": status(life, result, message),
        }
        if result is not None:
            out["state"]["result_state"] = result
        if done:
            out["run_duration"] = ms(end) - ms(run.created)
        if run.job_parameters:
            out["job_parameters"] = [{"name": k, "value": v} for k, v in run.job_parameters.items()]
        return out

    def _runs_get(self, q: dict, _b: dict) -> dict:
        run = self._run_for(q.get("run_id"))
        if int(q["run_id"]) != run.run_id:
            # A task run id: answer with the task, as Databricks does for task runs.
            task = next(t for t in run.tasks if t.run_id == int(q["run_id"]))
            return self._task_json(run, task, plan(run)[task.run_id], time.time())
        return self._run_json(run, time.time())

    def _runs_get_output(self, q: dict, _b: dict) -> dict:
        run = self._run_for(q.get("run_id"))
        rid = int(q["run_id"])
        if rid == run.run_id:
            raise ApiError(
                400,
                "INVALID_PARAMETER_VALUE",
                "Retrieving the output of runs with multiple tasks is not supported. "
                "Please retrieve the output of each individual task run instead.",
            )
        task = next(t for t in run.tasks if t.run_id == rid)
        now = time.time()
        p = plan(run)[task.run_id]
        meta = self._task_json(run, task, p, now)
        life, result, _ = state_at(p, now)
        out: dict[str, Any] = {"metadata": meta}
        if life != "TERMINATED":
            return out
        out.update(task_output(task, p, result))
        return out

    def _scim_me(self, _q: dict, _b: dict) -> dict:
        return {"id": "4242", "userName": self.user, "active": True, "displayName": "Loopback"}

    def _runs_cancel(self, _q: dict, b: dict) -> dict:
        run = self._run_for(b.get("run_id"))
        if run.cancel_at is None:
            run.cancel_at = time.time()
        return {}

    def _runs_list(self, q: dict, _b: dict) -> dict:
        now = time.time()
        listed = []
        for run in sorted(self.runs.values(), key=lambda r: r.created, reverse=True):
            if run.created > now:
                continue  # a child run whose start is not due yet
            if q.get("job_id") and int(q["job_id"]) != run.job_id:
                continue
            if q.get("run_type") and q["run_type"] != run.run_type:
                continue
            if q.get("start_time_from") and ms(run.created) < int(q["start_time_from"]):
                continue
            if q.get("start_time_to") and ms(run.created) > int(q["start_time_to"]):
                continue
            shown = self._run_json(run, now)
            active = shown["state"]["life_cycle_state"] in (
                "PENDING",
                "RUNNING",
                "TERMINATING",
                "QUEUED",
            )
            if q.get("active_only") == "true" and not active:
                continue
            if q.get("completed_only") == "true" and active:
                continue
            if q.get("expand_tasks") != "true":
                shown.pop("tasks", None)
            listed.append(shown)
        return self._page(listed, q, "runs")


def _normalize(path: str) -> str:
    # Jobs endpoints exist as 2.1 and 2.2; the SDK uses 2.2. Treat them alike.
    return path.replace("/api/2.1/jobs/", "/api/2.2/jobs/").rstrip("/")


_ROUTES: dict[tuple[str, str], Callable[[LoopbackDatabricks, dict, dict], dict]] = {
    ("GET", "/api/2.0/preview/scim/v2/Me"): LoopbackDatabricks._scim_me,
    ("GET", "/api/2.0/workspace/get-status"): LoopbackDatabricks._ws_get_status,
    ("GET", "/api/2.0/workspace/export"): LoopbackDatabricks._ws_export,
    ("POST", "/api/2.0/workspace/import"): LoopbackDatabricks._ws_import,
    ("POST", "/api/2.0/workspace/mkdirs"): LoopbackDatabricks._ws_mkdirs,
    ("GET", "/api/2.2/jobs/list"): LoopbackDatabricks._jobs_list,
    ("POST", "/api/2.2/jobs/create"): LoopbackDatabricks._jobs_create,
    ("POST", "/api/2.2/jobs/reset"): LoopbackDatabricks._jobs_reset,
    ("GET", "/api/2.2/jobs/get"): LoopbackDatabricks._jobs_get,
    ("POST", "/api/2.2/jobs/run-now"): LoopbackDatabricks._jobs_run_now,
    ("POST", "/api/2.2/jobs/runs/submit"): LoopbackDatabricks._runs_submit,
    ("GET", "/api/2.2/jobs/runs/get"): LoopbackDatabricks._runs_get,
    ("GET", "/api/2.2/jobs/runs/get-output"): LoopbackDatabricks._runs_get_output,
    ("POST", "/api/2.2/jobs/runs/cancel"): LoopbackDatabricks._runs_cancel,
    ("GET", "/api/2.2/jobs/runs/list"): LoopbackDatabricks._runs_list,
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real service; the SDK pools connections
    workspace: LoopbackDatabricks

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes; without TCP_NODELAY, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, payload, extra = self.workspace.handle(self.command, self.path, self.headers, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = _serve
    do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the stdlib would write every request line to stderr."""
