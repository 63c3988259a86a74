"""A scripted fake WorkspaceClient for tests at the SDK boundary (no HTTP at all): `ws.jobs`
returns real databricks-sdk dataclasses from a script of run states."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from databricks.sdk.errors import NotFound
from databricks.sdk.service import jobs, workspace

import nbpipeline.databricks.backend as dbmod
from nbpipeline_tests.fakes.databricks_workspace import exit_json


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

    def export(self, path: str, *, format: Any = None) -> workspace.ExportResponse:
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
