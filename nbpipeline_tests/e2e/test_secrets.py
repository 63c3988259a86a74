"""A canary Databricks token through a whole Dagster run and the UI: it must never show.

`nbpipeline run parallel` runs on the Databricks backend against the loopback workspace (real
HTTP, real auth header) with the canary as DATABRICKS_TOKEN. Then every byte Dagster stored in
DAGSTER_HOME (run storage, event logs, captured step output), the CLI's stdout and stderr, and
the webserver's GraphQL answers for the run and the backend resource are searched for it. The
webserver is started the way `dagster dev` starts it, with no host given, and must listen on
127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import pytest

from nbpipeline.backend import NOTEBOOK_NAMES
from nbpipeline.instance import WORKSPACE_YAML
from nbpipeline.settings import PROJECT_ROOT
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests.fakes.databricks_http import LoopbackDatabricks
from nbpipeline_tests.fakes.databricks_workspace import canary_token
from nbpipeline_tests.helpers import free_port, launch, stop_group

pytestmark = [pytest.mark.dagster, pytest.mark.ui]

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      status
      runConfigYaml
      tags { key value }
      eventConnection(afterCursor: null) {
        events {
          __typename
          ... on MessageEvent { message }
          ... on ExecutionStepFailureEvent { error { message } }
          ... on MaterializationEvent {
            metadataEntries { label ... on TextMetadataEntry { text } ... on UrlMetadataEntry { url } }
          }
        }
      }
    }
  }
}
"""

RESOURCE_QUERY = """
query Resource($selector: ResourceSelector!) {
  topLevelResourceDetailsOrError(resourceSelector: $selector) {
    __typename
    ... on ResourceDetails { name configuredValues { key value type } }
  }
}
"""


def exit_value(notebook: str) -> dict[str, Any]:
    """What a successful notebook reports: one entry per table it writes."""
    tables = [
        {
            "asset": name,
            "table": f"main.s.{name}",
            "location": f"dbfs:/w/s/{name}",
            "rows_inserted": 1,
            "rows_updated": 0,
            "rows_deleted": 0,
            "delta_version": 1,
            "row_count": 1,
            "columns": [{"name": "k", "type": "bigint"}],
        }
        for name, owner in OUTPUT_TABLES.items()
        if owner == notebook
    ]
    return {"notebook": notebook, "source_version": 3, "rows_read": 1, "tables": tables}


def graphql(port: int, query: str, variables: dict[str, Any]) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode()


def wait_listening(pid: int, port: int, timeout_s: float = 600) -> list[str]:
    """The addresses the process tree of `pid` listens on at `port`, once it listens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        found = [
            c.laddr.ip
            for p in procs
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"nothing listened on port {port} within {timeout_s}s")


def outside_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_canary_token_never_shows_in_a_run_its_storage_or_the_ui(
    loopback: LoopbackDatabricks,
    instance: dg.DagsterInstance,
) -> None:
    canary = canary_token()
    loopback.token = canary
    for notebook in NOTEBOOK_NAMES:
        loopback.set_output(notebook, exit_value(notebook))
    home = Path(instance.root_directory)
    env = {
        "NBPIPELINE_BACKEND": "databricks",
        "DATABRICKS_TOKEN": canary,
        "DATABRICKS_CLUSTER_ID": "0101-010101-loopback",
    }
    proc = launch("parallel", "main.s.orders", home, **env)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        stop_group([proc])
    assert proc.returncode == 0, stderr[-3000:]
    run_id = stdout.strip().splitlines()[-1]
    # The token was really used: the loopback saw it in the auth header.
    assert any(r.authorization == f"Bearer {canary}" for r in loopback.requests)
    # Four step processes, one sync: each notebook was looked up and uploaded once.
    notebooks = {r.body["path"] for r in loopback.requests_to("/workspace/import")}
    assert len(loopback.requests_to("/workspace/import")) == len(notebooks)
    assert canary not in stdout and canary not in stderr

    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    mats = [
        e
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.is_step_materialization
    ]
    assert len(mats) == len(OUTPUT_TABLES)  # the run did the work it reports
    # Everything Dagster stored: run storage (config, tags), event logs, captured step output.
    stored = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in stored)
    leaked = [str(p) for p in stored if canary.encode() in p.read_bytes()]
    assert not leaked

    # The webserver, as `dagster dev` starts it without --host: 127.0.0.1 only.
    port = free_port()
    web = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-webserver"),
            "-w",
            str(WORKSPACE_YAML),
            "-p",
            str(port),
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, "DAGSTER_HOME": str(home), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        addresses = wait_listening(web.pid, port)
        assert set(addresses) == {"127.0.0.1"}, addresses
        other = outside_address()
        if other:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
        answers = [graphql(port, RUN_QUERY, {"runId": run_id})]
        assert '"status": "SUCCESS"' in answers[0].replace('":"', '": "')
        selector = {
            "repositoryLocationName": "nbpipeline",
            "repositoryName": "__repository__",
            # The credentials live in dagster-databricks' DatabricksClientResource, bound beside
            # the backend that uses it.
            "resourceName": "databricks",
        }
        answers.append(graphql(port, RESOURCE_QUERY, {"selector": selector}))
        resource = json.loads(answers[-1])["data"]["topLevelResourceDetailsOrError"]
        values = {v["key"]: v for v in resource["configuredValues"]}
        # The UI shows which variable holds the token, never its value.
        assert (
            values["token"]["type"] == "ENV_VAR" and values["token"]["value"] == "DATABRICKS_TOKEN"
        )
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web_out, _ = web.communicate(timeout=60)
    assert not [a[:300] for a in answers if canary in a]
    assert canary not in web_out
