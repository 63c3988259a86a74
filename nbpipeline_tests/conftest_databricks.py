"""Shared fixtures and fakes for the Databricks tests (imported by the test modules).

Not a conftest.py: that file belongs to the rest of the suite. Test modules import what they use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from databricks.sdk.errors import NotFound
from databricks.sdk.service import jobs, workspace

try:  # works whether or not nbpipeline_tests is a package
    from nbpipeline_tests.databricks_loopback import Behaviour, LoopbackDatabricks
except ImportError:  # pragma: no cover - rootdir-relative import
    from databricks_loopback import Behaviour, LoopbackDatabricks  # type: ignore[no-redef]

import nbpipeline.databricks.backend as dbmod
import nbpipeline.databricks.sync as dbmod_sync
from nbpipeline.databricks.backend import DatabricksNotebookBackend

TOKEN = "dapi-loopback-0123456789abcdef"
NOTEBOOKS = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")

# Environment variables the Databricks SDK's unified auth reads; a developer's own settings must
# not leak into (or break) the tests.
_SDK_ENV = (
    "DATABRICKS_HOST",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_ID",
    "DATABRICKS_CLIENT_SECRET",
    "DATABRICKS_CONFIG_PROFILE",
    "DATABRICKS_AUTH_TYPE",
    "DATABRICKS_USERNAME",
    "DATABRICKS_PASSWORD",
    "DATABRICKS_CLUSTER_ID",
    "DATABRICKS_DEBUG_HEADERS",
    "ARM_CLIENT_ID",
    "ARM_CLIENT_SECRET",
    "ARM_TENANT_ID",
    "NBPIPELINE_DATABRICKS_WORKSPACE_DIR",
    "NBPIPELINE_DATABRICKS_SPARK_VERSION",
    "NBPIPELINE_DATABRICKS_NODE_TYPE_ID",
)


def write_notebooks(folder: Path) -> Path:
    """Four small Databricks-source notebooks, the orchestration and pin notebooks, and the
    `_common` helper they %run."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        (folder / f"{name}.py").write_text(
            "# Databricks notebook source\n"
            "# MAGIC %run ./_common\n\n"
            "# COMMAND ----------\n\n"
            'dbutils.widgets.text("source_table", "nbpipeline.orders")\n'
            + (
                'dbutils.widgets.text("high_value_threshold", "1000.00")\n'
                if name == "Notebook4"
                else ""
            )
            + f'dbutils.notebook.exit(json.dumps({{"notebook": "{name}", "tables": []}}))\n'
        )
    for name in ("SequentialOrchestration", "ParallelOrchestration", "PinSourceVersion"):
        (folder / f"{name}.py").write_text(
            "# Databricks notebook source\n"
            f'dbutils.notebook.exit(json.dumps({{"notebook": "{name}"}}))\n'
        )
    (folder / "_common.py").write_text("# Databricks notebook source\nimport json\n")
    return folder


@pytest.fixture
def databricks_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean environment: no SDK variables, no ~/.databrickscfg, notebooks in tmp_path."""
    for name in _SDK_ENV:
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
    server = LoopbackDatabricks(token=TOKEN).start()
    monkeypatch.setenv("DATABRICKS_HOST", server.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    try:
        yield server
    finally:
        server.stop()


def make_backend(**overrides: Any) -> DatabricksNotebookBackend:
    """The resource as bound in Definitions (a DatabricksClientResource with EnvVar host and
    token), with fast polling for tests."""
    from dagster_databricks import DatabricksClientResource

    kwargs: dict[str, Any] = {
        "databricks": DatabricksClientResource(
            host=dg.EnvVar("DATABRICKS_HOST"), token=dg.EnvVar("DATABRICKS_TOKEN")
        ),
        "existing_cluster_id": "0101-010101-loopback",
        "poll_initial_seconds": 0.02,
        "poll_max_seconds": 0.2,
        "poll_backoff": 1.5,
        "timeout_grace_seconds": 1.0,
        "cancel_timeout_seconds": 5.0,
        "retry_timeout_seconds": 10,
    }
    kwargs.update(overrides)
    return DatabricksNotebookBackend(**kwargs)


def exit_json(name: str, **extra: Any) -> str:
    import json

    return json.dumps({"notebook": name, "tables": [{"table": "nbpipeline.x"}], **extra})


# ----------------------------------------------------------------------------------------------
# A scripted fake WorkspaceClient, for tests at the SDK boundary (no HTTP at all)
# ----------------------------------------------------------------------------------------------


class _Waiter:
    def __init__(self, run_id: int) -> None:
        self.run_id = run_id


class FakeJobs:
    """`ws.jobs` returning real databricks-sdk dataclasses from a script of run states.

    `script` is a list of (life_cycle_state, result_state or None) the run goes through, one per
    get_run call; the last entry repeats. `poll_hook(n)` runs before the n-th get_run (1-based),
    e.g. to raise KeyboardInterrupt mid-wait.
    """

    def __init__(
        self,
        script: list[tuple[str, str | None]],
        *,
        output: dict[str, Any] | None = None,
        durations_ms: dict[str, int] | None = None,
        poll_hook: Callable[[int], None] | None = None,
        state_message: str = "",
    ) -> None:
        self.script = script
        self.output = output or {"notebook_output": {"result": exit_json("Notebook1")}}
        self.durations_ms = durations_ms or {
            "queue_duration": 1500,
            "setup_duration": 61000,
            "execution_duration": 754321,
            "cleanup_duration": 4200,
        }
        self.poll_hook = poll_hook
        self.state_message = state_message
        self.submits: list[dict[str, Any]] = []
        self.tokens: dict[str, int] = {}
        self.polls = 0
        self.cancelled: list[int] = []
        self.output_requests: list[int] = []
        self.run_id = 7000
        self.task_run_id = 7001

    def submit(self, **kwargs: Any) -> _Waiter:
        self.submits.append(kwargs)
        token = kwargs.get("idempotency_token")
        if token in self.tokens:
            return _Waiter(self.tokens[token])
        self.run_id += 10
        self.task_run_id = self.run_id + 1
        if token:
            self.tokens[token] = self.run_id
        return _Waiter(self.run_id)

    def get_run(self, run_id: int) -> jobs.Run:
        self.polls += 1
        if self.poll_hook is not None:
            self.poll_hook(self.polls)
        life, result = self.script[min(self.polls, len(self.script)) - 1]
        state: dict[str, Any] = {"life_cycle_state": life, "state_message": self.state_message}
        if result:
            state["result_state"] = result
        done = life in ("TERMINATED", "SKIPPED", "INTERNAL_ERROR")
        task: dict[str, Any] = {
            "run_id": self.task_run_id,
            "task_key": "Notebook1",
            "state": state,
            "start_time": 1_700_000_000_000,
            "end_time": 1_700_000_821_021 if done else 0,
            "run_page_url": f"https://example.cloud.databricks.com/#job/1/run/{self.task_run_id}",
            "cluster_instance": {"cluster_id": "0101-010101-loopback"},
            **(self.durations_ms if done else {}),
        }
        return jobs.Run.from_dict(
            {
                "run_id": run_id,
                "run_page_url": f"https://example.cloud.databricks.com/#job/1/run/{run_id}",
                "state": state,
                "start_time": 1_700_000_000_000,
                "end_time": 1_700_000_821_021 if done else 0,
                "run_duration": 821021 if done else None,
                "queue_duration": self.durations_ms.get("queue_duration", 0),
                "setup_duration": 0,
                "execution_duration": 0,
                "cleanup_duration": 0,
                "tasks": [task],
            }
        )

    def get_run_output(self, run_id: int) -> jobs.RunOutput:
        self.output_requests.append(run_id)
        if run_id != self.task_run_id:
            raise AssertionError(f"get_run_output called with {run_id}, not the task run id")
        return jobs.RunOutput.from_dict(self.output)

    def cancel_run(self, run_id: int) -> None:
        self.cancelled.append(run_id)

    def list_runs(self, **_: Any) -> list[jobs.BaseRun]:
        return []  # no live runs left over from earlier attempts


class FakeWorkspaceApi:
    """`ws.workspace`: an in-memory folder of notebooks."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.imports: list[str] = []

    def mkdirs(self, path: str) -> None:
        pass

    def get_status(self, path: str) -> workspace.ObjectInfo:
        if path not in self.files:
            raise NotFound(f"Path ({path}) doesn't exist.")
        return workspace.ObjectInfo(
            path=path, object_type=workspace.ObjectType.NOTEBOOK, language=workspace.Language.PYTHON
        )

    def export(self, path: str, *, format: Any = None) -> workspace.ExportResponse:  # noqa: A002
        import base64

        return workspace.ExportResponse(content=base64.b64encode(self.files[path]).decode())

    def import_(self, path: str, *, content: str, **_: Any) -> None:
        import base64

        self.files[path] = base64.b64decode(content)
        self.imports.append(path)


class FakeCurrentUser:
    def me(self) -> Any:
        from databricks.sdk.service import iam

        return iam.User(user_name="fake@example.com")


class FakeWorkspaceClient:
    def __init__(self, fake_jobs: FakeJobs) -> None:
        self.jobs = fake_jobs
        self.workspace = FakeWorkspaceApi()
        self.current_user = FakeCurrentUser()


def use_fake_client(monkeypatch: pytest.MonkeyPatch, fake: FakeWorkspaceClient) -> None:
    """Make every backend in this test talk to `fake` instead of a real WorkspaceClient."""
    monkeypatch.setattr(dbmod, "make_workspace_client", lambda host, token, **_: fake)


def canary_token() -> str:
    return "dapi-canary-" + os.urandom(12).hex()


__all__ = [
    "NOTEBOOKS",
    "TOKEN",
    "Behaviour",
    "FakeJobs",
    "FakeWorkspaceClient",
    "LoopbackDatabricks",
    "canary_token",
    "databricks_env",
    "exit_json",
    "loopback",
    "make_backend",
    "use_fake_client",
    "write_notebooks",
]
