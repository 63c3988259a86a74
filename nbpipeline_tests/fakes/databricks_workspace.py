"""What a test Databricks workspace starts with: the token, the notebooks, the environment the
SDK must not read, and the backend as Definitions binds it (pointed at the loopback workspace by
the `loopback` fixture in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from nbpipeline.databricks.backend import DatabricksNotebookBackend

TOKEN = "dapi-loopback-0123456789abcdef"
NOTEBOOKS = ("Notebook1", "Notebook2", "Notebook3", "Notebook4")

# Environment variables the Databricks SDK's unified auth reads; a developer's own settings must
# not leak into (or break) the tests.
SDK_ENV = (
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
    return json.dumps({"notebook": name, "tables": [{"table": "nbpipeline.x"}], **extra})


def canary_token() -> str:
    return "dapi-canary-" + os.urandom(12).hex()
