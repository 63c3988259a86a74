"""DatabricksNotebookBackend: settings, run life cycles, idempotency, interruption, secrets, timing.

Three layers:
- at the SDK boundary, with a scripted fake WorkspaceClient returning real SDK dataclasses;
- over real HTTP, against the loopback workspace, so databricks-sdk's client, auth header,
  error mapping and retries all run;
- live, against a real workspace (marked `databricks`, skipped without credentials).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import dagster as dg
import pytest
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster_databricks import DatabricksClientResource
from dagster_shared.serdes import serialize_value

from nbpipeline.backend import NOTEBOOK_NAMES, NotebookBackend
from nbpipeline.databricks.backend import DatabricksNotebookBackend, derive_idempotency_token
from nbpipeline.databricks.polling import PollPolicy, RunDeadlineExceeded, wait_for_run
from nbpipeline.errors import ConfigError, NotebookError, NotebookTimeout
from nbpipeline.settings import PROJECT_ROOT
from nbpipeline_tests.fakes.databricks_http import LoopbackDatabricks
from nbpipeline_tests.fakes.databricks_sdk import FakeJobs, FakeWorkspaceClient, use_fake_client
from nbpipeline_tests.fakes.databricks_workspace import TOKEN, exit_json, make_backend

PARAMS = {"source_table": "nbpipeline.orders", "target_schema": ""}
PARALLEL_PARAMS = {**PARAMS, "source_table": "nbpipeline.orders_parallel"}


# ----------------------------------------------------------------------------------------------
# Settings, validated when the resource is built
# ----------------------------------------------------------------------------------------------


def test_is_a_notebook_backend_with_described_fields(loopback: LoopbackDatabricks) -> None:
    backend = make_backend()
    assert isinstance(backend, NotebookBackend)
    assert backend.backend_name == "databricks"
    assert backend.engine_address() == loopback.host
    for name, info in DatabricksNotebookBackend.model_fields.items():
        assert info.description and len(info.description) > 20, f"{name} has no description"
    # Dagster shows the same descriptions in the UI's resource view.
    fields = DatabricksNotebookBackend.to_config_schema().as_field().config_type.fields
    assert all(f.description for f in fields.values())


def test_missing_host_is_rejected_at_load_time_naming_the_variable(databricks_env) -> None:
    with pytest.raises(ConfigError, match=r"host: .*DATABRICKS_HOST is not set"):
        make_backend()


@pytest.mark.parametrize(
    ("compute", "names"),
    [
        (
            {"existing_cluster_id": "c-1", "new_cluster": {"spark_version": "x"}},
            "existing_cluster_id and new_cluster",
        ),
        ({"existing_cluster_id": "c-1", "serverless": True}, "existing_cluster_id and serverless"),
        ({"existing_cluster_id": None}, "none of them"),
    ],
)
def test_compute_must_be_exactly_one_choice(
    loopback: LoopbackDatabricks, compute: dict[str, Any], names: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_backend(**compute)
    text = str(info.value)
    assert "existing_cluster_id, new_cluster, serverless" in text and names in text


def test_job_cluster_spec_is_checked(loopback: LoopbackDatabricks) -> None:
    with pytest.raises(ConfigError, match="new_cluster is missing node_type_id .*num_workers"):
        make_backend(existing_cluster_id=None, new_cluster={"spark_version": "17.3.x-scala2.13"})
    ok = make_backend(
        existing_cluster_id=None,
        new_cluster={
            "spark_version": "17.3.x-scala2.13",
            "node_type_id": "i3.xlarge",
            "num_workers": 1,
        },
    )
    assert ok._compute()["new_cluster"].node_type_id == "i3.xlarge"
    assert make_backend(existing_cluster_id=None, serverless=True)._compute() == {}


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("http://adb-1.azuredatabricks.net", "must use https"),
        ("https://adb-1.azuredatabricks.net/some/path", "without a path"),
        ("https://user:secret-pw@adb-1.azuredatabricks.net", "must not contain a user name"),
    ],
)
def test_bad_hosts_are_rejected(databricks_env, monkeypatch, host: str, message: str) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", host)
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match=message) as info:
        make_backend()
    assert "secret-pw" not in str(info.value)


def test_bare_host_name_gets_https(databricks_env, monkeypatch) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", "adb-1.2.azuredatabricks.net/")
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    assert make_backend().engine_address() == "https://adb-1.2.azuredatabricks.net"


def test_unset_token_variable_is_named(databricks_env, monkeypatch) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", "https://adb-1.azuredatabricks.net")
    with pytest.raises(
        ConfigError, match="token: environment variable DATABRICKS_TOKEN is not set"
    ):
        make_backend()


def test_bad_polling_and_timeouts(loopback: LoopbackDatabricks) -> None:
    with pytest.raises(ConfigError, match="poll_initial_seconds"):
        make_backend(poll_initial_seconds=5, poll_max_seconds=1)
    with pytest.raises(ConfigError, match="poll_backoff"):
        make_backend(poll_backoff=0.5)
    backend = make_backend()
    with pytest.raises(ConfigError, match="unknown notebook"):
        backend.run_notebook("Notebook9", PARAMS)
    with pytest.raises(ConfigError, match="timeout_seconds"):
        backend.run_notebook("Notebook1", PARAMS, timeout_seconds=0)


def test_from_env_binds_env_vars_and_picks_compute(
    loopback: LoopbackDatabricks, monkeypatch
) -> None:
    backend = DatabricksNotebookBackend.from_env()
    assert backend.serverless is True
    # Credentials live in dagster-databricks' own resource, bound to the variables by name.
    assert isinstance(backend.databricks, DatabricksClientResource)
    config = backend.databricks._resolved_config_dict
    assert config["host"] == {"env": "DATABRICKS_HOST"}
    assert config["token"] == {"env": "DATABRICKS_TOKEN"}
    monkeypatch.setenv("DATABRICKS_CLUSTER_ID", "0101-xyz")
    backend = DatabricksNotebookBackend.from_env()
    assert backend._compute() == {"existing_cluster_id": "0101-xyz"}
    monkeypatch.delenv("DATABRICKS_TOKEN")
    assert "token" not in DatabricksNotebookBackend.from_env().databricks._resolved_config_dict
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "sp-id")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", "sp-secret")
    oauth = DatabricksNotebookBackend.from_env().databricks._resolved_config_dict
    assert oauth["oauth_credentials"] == {
        "client_id": {"env": "DATABRICKS_CLIENT_ID"},
        "client_secret": {"env": "DATABRICKS_CLIENT_SECRET"},
    }


# ----------------------------------------------------------------------------------------------
# At the SDK boundary: scripted life cycles
# ----------------------------------------------------------------------------------------------

LIFECYCLE = [("PENDING", None), ("PENDING", None), ("RUNNING", None), ("TERMINATING", None)]


def _fake_backend(monkeypatch, fake: FakeJobs, **overrides: Any) -> DatabricksNotebookBackend:
    use_fake_client(monkeypatch, FakeWorkspaceClient(fake))
    monkeypatch.setenv("DATABRICKS_HOST", "https://example.cloud.databricks.com")
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    return make_backend(**overrides)


def test_success_returns_exit_value_and_databricks_timings(databricks_env, monkeypatch) -> None:
    fake = FakeJobs([*LIFECYCLE, ("TERMINATED", "SUCCESS")])
    backend = _fake_backend(monkeypatch, fake)
    run = backend.run_notebook("Notebook1", PARAMS, timeout_seconds=900)
    assert fake.polls == 5
    assert run.backend == "databricks"
    assert run.engine == "https://example.cloud.databricks.com"
    assert run.location == "/Users/fake@example.com/nbpipeline/Notebook1"  # one copy per user
    assert run.exit_value["notebook"] == "Notebook1" and run.tables == [{"table": "nbpipeline.x"}]
    # Durations are Databricks' own (12+ minutes), not the milliseconds this test took.
    assert run.extra["queue_s"] == 1.5
    assert run.extra["setup_s"] == 61.0
    assert run.extra["execution_s"] == 754.321
    assert run.extra["cleanup_s"] == 4.2
    assert run.ended_at - run.started_at == pytest.approx(821.021)
    assert run.extra["run_id"] == fake.run_id
    assert run.extra["run_url"].endswith(f"/run/{fake.run_id}")
    # The output is read from the task run: get-output rejects a multi-task parent id.
    assert fake.output_requests == [fake.task_run_id]
    submit = fake.submits[0]
    (task,) = submit["tasks"]
    assert task.notebook_task.notebook_path == "/Users/fake@example.com/nbpipeline/Notebook1"
    assert task.notebook_task.base_parameters == PARAMS
    assert task.existing_cluster_id == "0101-010101-loopback"
    assert submit["timeout_seconds"] == 900 and task.timeout_seconds == 900
    assert len(submit["idempotency_token"]) <= 64


@pytest.mark.parametrize(
    ("final", "error_type", "text"),
    [
        (("TERMINATED", "FAILED"), NotebookError, "failed on Databricks: KeyError: 'amount'"),
        (("TERMINATED", "TIMEDOUT"), NotebookTimeout, "timed out on Databricks after 3600s"),
        (("TERMINATED", "CANCELED"), NotebookError, "the Databricks run was cancelled"),
        (("SKIPPED", None), NotebookError, "the Databricks run was skipped"),
        (("INTERNAL_ERROR", "FAILED"), NotebookError, "Databricks internal error"),
        (("TERMINATED", "MAXIMUM_CONCURRENT_RUNS_REACHED"), NotebookError, "ended with TERMINATED"),
    ],
)
def test_every_terminal_state_raises_with_run_url(
    databricks_env, monkeypatch, final, error_type, text
) -> None:
    fake = FakeJobs(
        [*LIFECYCLE, final],
        output={"error": "KeyError: 'amount'", "error_trace": "Traceback...\nKeyError: 'amount'"},
        state_message="see the run page",
    )
    backend = _fake_backend(monkeypatch, fake)
    with pytest.raises(error_type) as info:
        backend.run_notebook("Notebook1", PARAMS)
    err = info.value
    assert text in str(err)
    assert err.notebook == "Notebook1"
    assert err.run_id == fake.run_id
    assert err.run_url and err.run_url.endswith(f"/run/{fake.run_id}")
    assert err.run_url in str(err)  # the user sees where to look
    if final == ("TERMINATED", "FAILED"):
        assert err.traceback_text.endswith("KeyError: 'amount'")
    assert fake.cancelled == []  # a finished run is not cancelled


def test_success_without_json_exit_is_an_error_with_run_url(databricks_env, monkeypatch) -> None:
    fake = FakeJobs([("TERMINATED", "SUCCESS")], output={"notebook_output": {"result": "done"}})
    backend = _fake_backend(monkeypatch, fake)
    with pytest.raises(NotebookError, match="exit value is not JSON") as info:
        backend.run_notebook("Notebook1", PARAMS)
    assert info.value.run_id == fake.run_id
    truncated = FakeJobs(
        [("TERMINATED", "SUCCESS")],
        output={"notebook_output": {"result": exit_json("N")[:10], "truncated": True}},
    )
    backend = _fake_backend(monkeypatch, truncated)
    with pytest.raises(NotebookError, match="truncated"):
        backend.run_notebook("Notebook1", PARAMS)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, dg.DagsterExecutionInterruptedError])
def test_interrupt_while_polling_cancels_then_reraises(
    databricks_env, monkeypatch, interrupt
) -> None:
    def hook(n: int) -> None:
        if n == 3:
            raise interrupt()

    fake = FakeJobs([("PENDING", None), ("RUNNING", None)], poll_hook=hook)
    backend = _fake_backend(monkeypatch, fake)
    with pytest.raises(interrupt):
        backend.run_notebook("Notebook1", PARAMS)
    assert fake.cancelled == [fake.run_id]


def test_overall_timeout_cancels_and_raises(databricks_env, monkeypatch) -> None:
    fake = FakeJobs([("PENDING", None), ("RUNNING", None)])  # never finishes
    backend = _fake_backend(monkeypatch, fake, timeout_grace_seconds=0.2)
    started = time.monotonic()
    with pytest.raises(NotebookTimeout, match="no result after 1s") as info:
        backend.run_notebook("Notebook1", PARAMS, timeout_seconds=1)
    # It waited out the timeout (the point); how much longer a loaded machine takes is not.
    assert time.monotonic() - started >= 1.0
    assert fake.cancelled == [fake.run_id]
    assert info.value.run_id == fake.run_id


def test_retried_submit_with_same_token_never_starts_a_second_run(
    databricks_env, monkeypatch
) -> None:
    fake = FakeJobs([("TERMINATED", "SUCCESS")])
    backend = _fake_backend(monkeypatch, fake)
    first = backend.run_notebook("Notebook1", PARAMS, idempotency_token="dagster-run-1-step-a")
    second = backend.run_notebook("Notebook1", PARAMS, idempotency_token="dagster-run-1-step-a")
    assert first.extra["run_id"] == second.extra["run_id"]
    assert len(fake.tokens) == 1 and len(fake.submits) == 2
    with pytest.raises(ConfigError, match="1 to 64"):
        backend.run_notebook("Notebook1", PARAMS, idempotency_token="x" * 65)


def test_token_is_derived_from_the_dagster_step(databricks_env) -> None:
    seen: list[str] = []

    @dg.asset
    def notebook_asset() -> None:
        a = derive_idempotency_token("Notebook1", PARAMS, workspace_dir="/Shared/nbpipeline")
        b = derive_idempotency_token("Notebook1", PARAMS, workspace_dir="/Shared/nbpipeline")
        other = derive_idempotency_token("Notebook2", PARAMS, workspace_dir="/Shared/nbpipeline")
        assert a == b != other
        seen.append(a)

    for _ in range(2):
        assert dg.materialize([notebook_asset], instance=dg.DagsterInstance.ephemeral()).success
    # Same step in another Dagster run: a different token, so a re-run starts a new run.
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(len(t) <= 64 for t in seen)
    # Outside Dagster each call gets a fresh token.
    assert derive_idempotency_token(
        "Notebook1", PARAMS, workspace_dir="/x"
    ) != derive_idempotency_token("Notebook1", PARAMS, workspace_dir="/x")


def _retrying_asset(backend: DatabricksNotebookBackend, on_first_failure: Any) -> Any:
    """An asset that runs Notebook1 and asks Dagster for one retry if the first attempt fails."""

    @dg.asset
    def notebook1(context) -> dict[str, Any]:
        try:
            run = backend.run_notebook("Notebook1", PARAMS)
        except NotebookError:
            if context.retry_number == 0:
                on_first_failure()
                raise dg.RetryRequested(max_retries=1, seconds_to_wait=0) from None
            raise
        return run.extra

    return notebook1


def test_step_retry_after_a_failed_run_starts_a_new_run(loopback: LoopbackDatabricks) -> None:
    loopback.behave("Notebook1", result="FAILED", error="ConcurrentAppendException: retry me")
    backend = make_backend()
    asset = _retrying_asset(backend, lambda: loopback.behave("Notebook1", result="SUCCESS"))
    result = dg.materialize([asset], instance=dg.DagsterInstance.ephemeral())
    assert result.success
    assert len(loopback.runs) == 2  # the failed run, then a fresh one
    tokens = [r.body["idempotency_token"] for r in loopback.requests_to("/jobs/runs/submit")]
    # Attempt 1 first offers attempt 0's token (getting the failed run back), then its own.
    assert len(tokens) == 3 and tokens[0] == tokens[1] != tokens[2]


def _live_intervals(loopback: LoopbackDatabricks) -> list[tuple[float, float]]:
    """(created, ended-or-cancelled) of every one-time run, by creation."""
    out = []
    for run in sorted(loopback.runs.values(), key=lambda r: r.created):
        end = max(t["end"] for t in loopback.timeline(run.run_id)["tasks"] if "end" in t)
        out.append((run.created, min(end, run.cancel_at or end)))
    return out


def test_step_losing_track_cancels_its_run_and_the_retry_starts_one_live_run(
    loopback: LoopbackDatabricks,
) -> None:
    loopback.behave("Notebook1", execution_s=1.0)
    # Polling breaks (a non-retryable API error) while the run goes on at Databricks.
    loopback.inject_error(
        "GET", "/api/2.2/jobs/runs/get", status=400, code="BAD_REQUEST", message="proxy broke"
    )
    backend = make_backend()
    result = dg.materialize(
        [_retrying_asset(backend, lambda: None)], instance=dg.DagsterInstance.ephemeral()
    )
    assert result.success
    first, second = sorted(loopback.runs.values(), key=lambda r: r.created)
    assert first.cancel_at is not None  # the run it lost track of was cancelled
    assert second.cancel_at is None
    assert result.output_for_node("notebook1")["run_id"] == second.run_id
    # Never two live runs of the notebook at once.
    (a_start, a_end), (b_start, _) = _live_intervals(loopback)
    assert a_end <= b_start


def test_reexecution_reattaches_to_a_run_it_could_not_cancel(
    loopback: LoopbackDatabricks,
) -> None:
    loopback.behave("Notebook1", execution_s=1.5)
    for path in ("/api/2.2/jobs/runs/get", "/api/2.2/jobs/runs/cancel"):
        loopback.inject_error(
            path.endswith("get") and "GET" or "POST",
            path,
            status=400,
            code="BAD_REQUEST",
            message="proxy broke",
        )
    backend = make_backend()

    @dg.asset
    def notebook1() -> dict[str, Any]:
        return backend.run_notebook("Notebook1", PARAMS).extra

    first = dg.materialize(
        [notebook1], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
    )
    assert not first.success
    failure = first.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert "lost track of Databricks run" in failure and "re-attaches to it" in failure
    (orphan,) = loopback.runs.values()
    assert orphan.cancel_at is None

    # A re-execution (a new Dagster run, so new idempotency tokens) waits for the live run.
    again = dg.materialize([notebook1], instance=dg.DagsterInstance.ephemeral())
    assert again.success
    assert list(loopback.runs) == [orphan.run_id]
    assert again.output_for_node("notebook1")["run_id"] == orphan.run_id


def test_polling_adapts_and_resets_on_state_change(databricks_env, monkeypatch) -> None:
    states = [("PENDING", None)] * 6 + [("RUNNING", None)] * 4 + [("TERMINATED", "SUCCESS")]
    fake = FakeJobs(states)
    sleeps: list[float] = []
    client = FakeWorkspaceClient(fake)
    run = wait_for_run(
        client,
        fake.run_id,
        deadline=time.monotonic() + 60,
        policy=PollPolicy(initial=1.0, maximum=4.0, backoff=2.0),
        log=logging.getLogger("test"),
        label="Notebook1",
        sleep=sleeps.append,
    )
    assert run.state.result_state.value == "SUCCESS"
    # PENDING: 1, 2, 4, 4 (capped), 4, 4; RUNNING resets to 1, then 2, 4, 4.
    assert sleeps == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 1.0, 2.0, 4.0, 4.0]


def test_polling_never_sleeps_past_the_deadline(databricks_env) -> None:
    fake = FakeJobs([("RUNNING", None)])
    sleeps: list[float] = []
    with pytest.raises(RunDeadlineExceeded):
        wait_for_run(
            FakeWorkspaceClient(fake),
            fake.run_id,
            deadline=time.monotonic() + 2.0,
            policy=PollPolicy(initial=10.0, maximum=10.0),
            log=logging.getLogger("test"),
            label="x",
            sleep=lambda s: (sleeps.append(s), time.sleep(s)),
        )
    # Each sleep is cut to the time left (a 10 s poll interval would overshoot the deadline).
    assert sleeps and all(s <= 2.0 for s in sleeps)


# ----------------------------------------------------------------------------------------------
# Over real HTTP: the loopback workspace
# ----------------------------------------------------------------------------------------------


def test_http_run_end_to_end(loopback: LoopbackDatabricks) -> None:
    loopback.set_output("Notebook2", {"notebook": "Notebook2", "tables": [{"table": "t"}]})
    backend = make_backend()
    run = backend.run_notebook("Notebook2", PARAMS, timeout_seconds=600)
    assert run.exit_value == {"notebook": "Notebook2", "tables": [{"table": "t"}]}
    assert run.engine == loopback.host

    # Every request carried the bearer token and nothing else was needed.
    assert loopback.requests and all(r.auth_ok for r in loopback.requests)
    assert {r.authorization for r in loopback.requests} == {f"Bearer {TOKEN}"}

    (submit,) = loopback.requests_to("/jobs/runs/submit")
    body = submit.body
    (task,) = body["tasks"]
    assert task["notebook_task"] == {
        "notebook_path": f"/Users/{loopback.user}/nbpipeline/Notebook2",
        "base_parameters": PARAMS,
        "source": "WORKSPACE",
    }
    assert task["existing_cluster_id"] == "0101-010101-loopback"
    assert body["timeout_seconds"] == 600 and body["run_name"] == "nbpipeline Notebook2"
    assert (
        body["idempotency_token"].startswith("nbpipeline-") and len(body["idempotency_token"]) == 64
    )

    (output,) = loopback.requests_to("/jobs/runs/get-output")
    assert output.query["run_id"] == str(run.extra["task_run_id"]) != str(run.extra["run_id"])

    # Timings equal the server's own timeline (ms rounding only).
    truth = loopback.timeline(run.extra["run_id"])["tasks"][0]
    for key in ("queue_s", "setup_s", "execution_s", "cleanup_s"):
        assert run.extra[key] == pytest.approx(truth[key], abs=0.002)
    assert run.started_at == pytest.approx(truth["start"], abs=0.002)
    assert run.ended_at == pytest.approx(truth["end"], abs=0.002)


def test_http_sync_uploads_all_notebooks_once_and_only_changes(
    loopback: LoopbackDatabricks, databricks_env
) -> None:
    backend = make_backend(workspace_dir="/Shared/team/nbpipeline")
    backend.run_notebook("Notebook1", PARAMS)
    imports = loopback.requests_to("/workspace/import")
    assert sorted(r.body["path"] for r in imports) == [
        f"/Shared/team/nbpipeline/{n}" for n in sorted(p.stem for p in databricks_env.glob("*.py"))
    ]
    assert all(
        r.body["format"] == "SOURCE" and r.body["language"] == "PYTHON" and r.body["overwrite"]
        for r in imports
    )
    # The run used the uploaded notebook, and %run ./_common resolves next to it.
    assert "%run ./_common" in loopback.notebook_source("/Shared/team/nbpipeline/Notebook1")
    assert "/Shared/team/nbpipeline/_common" in loopback.objects

    # Later runs in this process do not even look again.
    before = len(loopback.requests)
    backend.run_notebook("Notebook2", PARAMS)
    assert not [r for r in loopback.requests[before:] if "/workspace/" in r.path]

    # An explicit sync compares with the workspace: nothing changed, nothing uploaded.
    assert set(backend.sync_notebooks().values()) == {"unchanged"}
    assert len(loopback.requests_to("/workspace/import")) == len(list(databricks_env.glob("*.py")))

    # A local edit uploads that notebook only; so does an edit made in the workspace UI.
    (databricks_env / "Notebook3.py").write_text("# Databricks notebook source\nprint('v2')\n")
    loopback.objects["/Shared/team/nbpipeline/Notebook4"]["content"] = b"# edited in the UI\n"
    result = backend.sync_notebooks()
    assert {n for n, how in result.items() if how == "uploaded"} == {"Notebook3", "Notebook4"}
    # A changed local folder also triggers the pre-run sync (the cache key is the content).
    (databricks_env / "Notebook1.py").write_text("# Databricks notebook source\nprint('v3')\n")
    backend.run_notebook("Notebook1", PARAMS)
    assert loopback.notebook_source("/Shared/team/nbpipeline/Notebook1").endswith("print('v3')\n")


def test_http_missing_notebook_in_workspace_fails_the_run(loopback: LoopbackDatabricks) -> None:
    backend = make_backend(upload_notebooks=False)
    with pytest.raises(NotebookError, match="Unable to access the notebook"):
        backend.run_notebook("Notebook1", PARAMS)


@pytest.mark.parametrize(
    ("result", "error_type", "text"),
    [
        ("FAILED", NotebookError, "ZeroDivisionError: division by zero"),
        ("TIMEDOUT", NotebookTimeout, "timed out on Databricks"),
        ("CANCELED", NotebookError, "cancelled"),
        ("INTERNAL_ERROR", NotebookError, "Cloud provider launch failure"),
        ("SKIPPED", NotebookError, "maximum number of concurrent runs"),
    ],
)
def test_http_failure_life_cycles(
    loopback: LoopbackDatabricks, result: str, error_type: type, text: str
) -> None:
    loopback.behave("Notebook3", result=result)
    backend = make_backend()
    with pytest.raises(error_type, match=text) as info:
        backend.run_notebook("Notebook3", PARAMS)
    run_id = info.value.run_id
    assert (
        info.value.run_url
        == f"{loopback.host}/?o=1234567890123456#job/{loopback.runs[run_id].job_id}/run/{run_id}"
    )
    if result == "FAILED":
        assert "ZeroDivisionError" in info.value.traceback_text


def test_http_databricks_side_timeout(loopback: LoopbackDatabricks) -> None:
    loopback.behave("Notebook1", execution_s=30)
    with pytest.raises(NotebookTimeout, match="timed out on Databricks after 1s"):
        make_backend().run_notebook("Notebook1", PARAMS, timeout_seconds=1)


def test_http_retried_submit_is_idempotent(loopback: LoopbackDatabricks) -> None:
    # The run is created but the response is lost (503); the SDK retries the same request.
    loopback.inject_error("POST", "/api/2.2/jobs/runs/submit", status=503, after_processing=True)
    run = make_backend().run_notebook("Notebook1", PARAMS)
    submits = loopback.requests_to("/jobs/runs/submit")
    assert len(submits) == 2
    assert submits[0].body["idempotency_token"] == submits[1].body["idempotency_token"]
    assert len(loopback.runs) == 1 and run.extra["run_id"] in loopback.runs


def test_http_transient_poll_errors_are_retried(loopback: LoopbackDatabricks) -> None:
    loopback.inject_error("GET", "/api/2.2/jobs/runs/get", status=429, times=2)
    run = make_backend().run_notebook("Notebook1", PARAMS)
    assert run.exit_value["notebook"] == "Notebook1"


def test_http_wrong_token_is_a_clear_error(loopback: LoopbackDatabricks, monkeypatch) -> None:
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-wrong")
    with pytest.raises(ConfigError, match="Invalid access token"):
        make_backend().run_notebook("Notebook1", PARAMS)
    assert all(not r.auth_ok for r in loopback.requests)


def test_ctrl_c_cancels_the_databricks_run(loopback: LoopbackDatabricks) -> None:
    """A real Ctrl-C (SIGINT) to a process waiting on a Databricks run: the run is cancelled and
    the process ends with KeyboardInterrupt.

    In a child process that handles SIGINT as one started from a terminal does: a test run
    started as a shell background job (`cmd &`) inherits SIGINT *ignored*, and Python then leaves
    it ignored, so neither `_thread.interrupt_main()` nor a real SIGINT reaches the code under
    test. That is how this test failed in local clean-clone runs (started with `&`) while
    passing in a terminal."""
    loopback.behave("Notebook1", execution_s=30)
    make_backend().sync_notebooks()
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from nbpipeline_tests.fakes.databricks_workspace import make_backend\n"
        "try:\n"
        f"    make_backend().run_notebook('Notebook1', {PARAMS!r})\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),  # DATABRICKS_HOST / DATABRICKS_TOKEN of the loopback
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Ctrl-C while the run is being polled (not during the submit itself).
        deadline = time.monotonic() + 120
        while not loopback.runs and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert loopback.runs, "the child never submitted its run"
        (run,) = loopback.runs.values()
        while len(loopback.requests_to("/jobs/runs/get", method="GET")) < 2:
            assert time.monotonic() < deadline, "the child never polled its run"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert stdout.strip() == "interrupted"
    assert run.cancel_at is not None
    assert [r.body for r in loopback.requests_to("/jobs/runs/cancel")] == [{"run_id": run.run_id}]
    time.sleep(0.1)  # the simulated cluster cleans up, then the run is CANCELED
    status = make_backend().workspace_client().jobs.get_run(run.run_id)
    assert status.state.result_state.value == "CANCELED"


# ----------------------------------------------------------------------------------------------
# The token never shows
# ----------------------------------------------------------------------------------------------


def test_canary_token_never_appears_in_logs_errors_output_or_dagster_config(
    loopback: LoopbackDatabricks, loopback_canary: str, monkeypatch, caplog, capsys
) -> None:
    canary = loopback_canary
    caplog.set_level(logging.DEBUG)  # includes the SDK's own request/response debug logs

    backend = make_backend()
    texts: list[str] = []
    run = backend.run_notebook("Notebook1", PARAMS)
    texts += [repr(run), json.dumps(run.extra)]
    loopback.behave("Notebook2", result="FAILED")
    with pytest.raises(NotebookError) as failed:
        backend.run_notebook("Notebook2", PARAMS)
    texts += [str(failed.value), repr(failed.value), failed.value.traceback_text or ""]

    # Dagster keeps only the variable name, in the resource config and in what the UI shows.
    config = backend.databricks._resolved_config_dict
    assert config["token"] == {"env": "DATABRICKS_TOKEN"}
    defs = dg.Definitions(resources={"notebook_backend": backend, "databricks": backend.databricks})
    snap = RepositorySnap.from_def(defs.get_repository_def())
    texts.append(serialize_value(snap))
    texts.append(json.dumps(config))
    texts.append(repr(backend))

    # In a real Dagster run the resource is resolved and used; its logs stay clean too.
    @dg.asset
    def uses_backend(context, notebook_backend: DatabricksNotebookBackend) -> None:
        run = notebook_backend.run_notebook("Notebook1", PARAMS, log=context.log)
        context.add_output_metadata({"engine": run.engine, "run_url": run.extra["run_url"]})

    result = dg.materialize(
        [uses_backend],
        resources={"notebook_backend": backend},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    for event in result.all_events:
        texts.append(str(event))

    # A wrong-host error mentions the host but not the token.
    monkeypatch.setenv("DATABRICKS_HOST", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(ConfigError) as unreachable:
        make_backend(workspace_dir="/Shared/other", retry_timeout_seconds=1).sync_notebooks()
    texts.append(str(unreachable.value))

    out, err = capsys.readouterr()
    texts += [out, err, caplog.text]
    assert any("Bearer" in r.authorization for r in loopback.requests if r.authorization)
    leaked = [t[:200] for t in texts if canary in t]
    assert not leaked


# ----------------------------------------------------------------------------------------------
# Sequential vs parallel, timed against the server's own clock
# ----------------------------------------------------------------------------------------------


def simulate_pipeline(
    per_notebook_s: float, *, server: LoopbackDatabricks | None = None
) -> dict[str, Any]:
    """Run the four notebooks sequentially and, at the same time, in 4 threads; return figures.

    Both schedules share one loopback workspace and run concurrently to halve the wall time of
    the measurement; every run is I/O-bound waiting, so they barely affect each other. Each
    recorded duration is compared with the server's own timeline.
    """
    own = server is None
    if own:
        server = LoopbackDatabricks(token=TOKEN).start()
        os.environ["DATABRICKS_HOST"], os.environ["DATABRICKS_TOKEN"] = server.host, TOKEN
    try:
        for name in NOTEBOOK_NAMES:
            server.behave(name, queue_s=0.0, setup_s=0.0, execution_s=per_notebook_s, cleanup_s=0.0)
        backend = make_backend(poll_initial_seconds=0.1, poll_max_seconds=0.5)
        backend.sync_notebooks()
        runs: dict[str, list[Any]] = {"sequential": [], "parallel": []}
        walls: dict[str, float] = {}

        def sequential() -> None:
            t0 = time.monotonic()
            for name in NOTEBOOK_NAMES:
                runs["sequential"].append(backend.run_notebook(name, PARAMS))
            walls["sequential"] = time.monotonic() - t0

        def parallel() -> None:
            t0 = time.monotonic()
            results: dict[str, Any] = {}

            def one(name: str) -> None:
                # Other values than the sequential schedule's: a live run of the same notebook
                # with the same values is re-attached to, which would join the two schedules.
                results[name] = backend.run_notebook(name, PARALLEL_PARAMS)

            threads = [threading.Thread(target=one, args=(n,)) for n in NOTEBOOK_NAMES]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            runs["parallel"] = [results[n] for n in NOTEBOOK_NAMES]
            walls["parallel"] = time.monotonic() - t0

        drivers = [threading.Thread(target=sequential), threading.Thread(target=parallel)]
        for d in drivers:
            d.start()
        for d in drivers:
            d.join()

        figures: dict[str, Any] = {
            "per_notebook_s": per_notebook_s,
            "wall_s": {k: round(v, 3) for k, v in walls.items()},
            "max_deviation_s": 0.0,
        }
        for mode, mode_runs in runs.items():
            assert len(mode_runs) == 4, f"{mode} did not finish all notebooks"
            for run in mode_runs:
                truth = server.timeline(run.extra["run_id"])["tasks"][0]
                deviations = [
                    abs(run.extra["execution_s"] - truth["execution_s"]),
                    abs(run.extra["setup_s"] - truth["setup_s"]),
                    abs(run.extra["queue_s"] - truth["queue_s"]),
                    abs(run.extra["cleanup_s"] - truth["cleanup_s"]),
                    abs(run.started_at - truth["start"]),
                    abs(run.ended_at - truth["end"]),
                ]
                figures["max_deviation_s"] = max(figures["max_deviation_s"], *deviations)
            figures.setdefault("server_spans", {})[mode] = sorted(
                (
                    server.timeline(r.extra["run_id"])["tasks"][0]["start"],
                    server.timeline(r.extra["run_id"])["tasks"][0]["end"],
                )
                for r in mode_runs
            )
            figures[f"{mode}_server_s"] = round(
                max(r.ended_at for r in mode_runs) - min(r.started_at for r in mode_runs), 3
            )
        figures["max_deviation_s"] = round(figures["max_deviation_s"], 4)
        figures["speedup"] = round(walls["sequential"] / walls["parallel"], 2)
        return figures
    finally:
        if own:
            server.stop()


def _check_figures(figures: dict[str, Any], per: float) -> None:
    """What the simulation proves, on the server's own timeline (no client wall-clock bound: a
    loaded machine may poll late): each recorded duration is the server's, the sequential
    schedule ran one notebook after another, and the parallel one ran all four at once."""
    assert figures["max_deviation_s"] <= 0.5
    seq, par = figures["server_spans"]["sequential"], figures["server_spans"]["parallel"]
    for (_, end), (start, _) in zip(seq, seq[1:], strict=False):
        assert end <= start, "the sequential schedule overlapped notebooks"
    assert max(s for s, _ in par) < min(e for _, e in par), "the parallel runs did not overlap"
    assert figures["wall_s"]["sequential"] >= 4 * per  # it cannot be faster than its runs


@pytest.mark.slow
def test_parallel_runs_overlap_and_durations_come_from_the_server(
    loopback: LoopbackDatabricks,
) -> None:
    figures = simulate_pipeline(2.0, server=loopback)
    print(json.dumps(figures, indent=2))
    _check_figures(figures, 2.0)


# The realistic 20-s-per-notebook figures (the same checks, 85 s of sleeping) are a benchmark:
# `python -m nbpipeline_tests.databricks.test_databricks_backend 20` prints them.


# ----------------------------------------------------------------------------------------------
# Live workspace (skipped unless DATABRICKS_HOST and a token are set)
# ----------------------------------------------------------------------------------------------

_LIVE = bool(os.environ.get("DATABRICKS_HOST") and os.environ.get("DATABRICKS_TOKEN"))
live = pytest.mark.skipif(not _LIVE, reason="needs DATABRICKS_HOST and DATABRICKS_TOKEN")


@pytest.mark.databricks
@live
def test_live_sync_into_a_scratch_folder() -> None:
    folder = f"/Shared/nbpipeline-test-{uuid.uuid4().hex[:8]}"
    backend = DatabricksNotebookBackend.from_env(workspace_dir=folder)
    try:
        first = backend.sync_notebooks()
        assert set(first.values()) == {"uploaded"}
        assert set(backend.sync_notebooks().values()) == {"unchanged"}
    finally:
        backend.workspace_client().workspace.delete(folder, recursive=True)


@pytest.mark.databricks
@live
def test_live_run_notebook1() -> None:
    backend = DatabricksNotebookBackend.from_env()
    run = backend.run_notebook(
        "Notebook1", {"source_table": "nbpipeline.orders", "target_schema": ""}
    )
    assert run.backend == "databricks" and run.extra["run_url"]
    assert isinstance(run.tables, list)


# Prints the figures: python -m nbpipeline_tests.databricks.test_databricks_backend [s] (from the project root).
if __name__ == "__main__":  # pragma: no cover
    import sys
    import tempfile
    from pathlib import Path

    from nbpipeline_tests.fakes.databricks_workspace import write_notebooks

    os.environ["NBPIPELINE_NOTEBOOKS_DIR"] = str(write_notebooks(Path(tempfile.mkdtemp()) / "nb"))
    os.environ["DATABRICKS_CONFIG_FILE"] = os.devnull
    print(
        json.dumps(simulate_pipeline(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0), indent=2)
    )


# ----------------------------------------------------------------------------------------------
# Compute over HTTP, sync once per run
# ----------------------------------------------------------------------------------------------


def test_http_serverless_submit_sends_no_cluster(loopback: LoopbackDatabricks) -> None:
    backend = make_backend(existing_cluster_id=None, serverless=True)
    run = backend.run_notebook("Notebook1", PARAMS)
    assert run.exit_value["notebook"] == "Notebook1"
    (submit,) = loopback.requests_to("/jobs/runs/submit")
    (task,) = submit.body["tasks"]
    assert not {"existing_cluster_id", "new_cluster", "job_cluster_key"} & task.keys()
    assert "cluster_id" not in run.extra


def test_http_new_cluster_submit_sends_the_cluster_spec(loopback: LoopbackDatabricks) -> None:
    spec = {
        "spark_version": "17.3.x-scala2.13",
        "node_type_id": "Standard_D4ds_v5",
        "num_workers": 2,
        "data_security_mode": "SINGLE_USER",
    }
    loopback.behave("Notebook3", setup_s=0.3)  # a job cluster takes time to start
    backend = make_backend(existing_cluster_id=None, new_cluster=spec)
    run = backend.run_notebook("Notebook3", PARAMS)
    (submit,) = loopback.requests_to("/jobs/runs/submit")
    (task,) = submit.body["tasks"]
    assert task["new_cluster"] == spec and "existing_cluster_id" not in task
    truth = loopback.timeline(run.extra["run_id"])["tasks"][0]
    assert run.extra["setup_s"] == pytest.approx(truth["setup_s"], abs=0.002)
    assert run.extra["setup_s"] >= 0.3


def test_notebooks_sync_once_per_dagster_run_across_step_processes(
    loopback: LoopbackDatabricks, databricks_env, monkeypatch
) -> None:
    """Each step process of a run starts with an empty in-process cache (simulated here by
    clearing it); the marker on disk makes only the first one sync. test_secrets.py runs the
    real four-process case through `nbpipeline run parallel`."""
    import nbpipeline.databricks.sync as dbmod_sync

    ws = make_backend().workspace_client()
    log = logging.getLogger("test")

    def step_process(dagster_run: str) -> bool:
        dbmod_sync._SYNCED.clear()  # a fresh process
        monkeypatch.setattr(dbmod_sync, "current_dagster_step", lambda: (dagster_run, "step", 0))
        return dbmod_sync.sync_once_per_run(
            ws, loopback.host, "/Users/me/nbpipeline", dbmod_sync.local_notebooks(), log=log
        )

    assert [step_process("run-1") for _ in range(4)] == [True, False, False, False]
    notebooks = len(list(databricks_env.glob("*.py")))
    assert len(loopback.requests_to("/workspace/import")) == notebooks
    assert len(loopback.requests_to("/workspace/get-status")) == notebooks
    # The next Dagster run checks the workspace again (someone may have edited it).
    assert step_process("run-2") is True
    assert len(loopback.requests_to("/workspace/export")) == notebooks
    assert len(loopback.requests_to("/workspace/import")) == notebooks  # nothing changed


def test_ui_resource_view_shows_the_databricks_client_resource(
    loopback: LoopbackDatabricks, monkeypatch
) -> None:
    from dagster._core.remote_representation.external_data import ResourceConfigEnvVarSnap

    from nbpipeline.defs.resources import resource_defs

    monkeypatch.setenv("NBPIPELINE_BACKEND", "databricks")
    resources = resource_defs()
    assert isinstance(resources["databricks"], DatabricksClientResource)
    assert resources["notebook_backend"].databricks is resources["databricks"]
    defs = dg.Definitions(resources=resources)
    snaps = {r.name: r for r in RepositorySnap.from_def(defs.get_repository_def()).resources}
    client = snaps["databricks"]
    assert client.configured_values["host"] == ResourceConfigEnvVarSnap(name="DATABRICKS_HOST")
    assert client.configured_values["token"] == ResourceConfigEnvVarSnap(name="DATABRICKS_TOKEN")
    nested = snaps["notebook_backend"].nested_resources["databricks"]
    assert nested.name == "databricks" and nested.type.value == "TOP_LEVEL"
    # And the backend really talks to the workspace through it.
    run = resources["notebook_backend"].run_notebook("Notebook1", PARAMS)
    assert run.engine == loopback.host
