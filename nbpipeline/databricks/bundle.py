"""A Databricks Asset Bundle with the notebooks and the same jobs as `deploy`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from nbpipeline.databricks.jobs import JobOptions, all_job_settings
from nbpipeline.databricks.sync import local_notebooks, notebooks_digest
from nbpipeline.errors import ConfigError

BUNDLE_NAME = "nbpipeline"
BUNDLE_JOBS_FILE = "resources/nbpipeline.jobs.yml"


def bundle_job_resources(
    options: JobOptions, modes: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The jobs as bundle job resources: deploy's settings with notebook paths relative to the
    resource file (the bundle uploads `src/` and rewrites them to workspace paths)."""
    out: dict[str, dict[str, Any]] = {}
    for mode, settings in all_job_settings(options, modes).items():
        for task in settings["tasks"]:
            name = task["notebook_task"]["notebook_path"].rsplit("/", 1)[-1]
            task["notebook_task"]["notebook_path"] = f"../src/{name}.py"
        out[mode.replace("-", "_")] = settings
    return out


def write_bundle(out: Any, options: JobOptions, *, modes: Sequence[str] | None = None) -> list[Any]:
    """Write a Databricks Asset Bundle to folder `out`; return the files written.

    databricks.yml (dev and prod targets), src/ (every notebook), and one resource file with the
    same jobs as `deploy`. Deploy it with the Databricks CLI: `databricks bundle deploy -t dev`.
    """
    root = Path(out)
    local = local_notebooks()
    options = replace(options, notebooks_sha256=notebooks_digest(local))
    resources = bundle_job_resources(options, modes)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} exists and is not a folder")
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "resources").mkdir(exist_ok=True)
    written = []
    for name, data in sorted(local.items()):
        path = root / "src" / f"{name}.py"
        path.write_bytes(data)
        written.append(path)
    workspace: dict[str, Any] = {}
    if options.host:
        workspace["host"] = options.host
    prod: dict[str, Any] = {
        "mode": "production",
        "workspace": {
            **workspace,
            # Production deploys once per workspace, not into a per-user development copy.
            "root_path": "/Workspace/Users/${workspace.current_user.userName}/.bundle/"
            "${bundle.name}/${bundle.target}",
        },
    }
    if options.run_as:
        who = "user_name" if "@" in options.run_as else "service_principal_name"
        prod["run_as"] = {who: options.run_as}
    bundle = {
        "bundle": {"name": BUNDLE_NAME},
        "include": ["resources/*.yml"],
        "targets": {
            # Development mode prefixes job names with the user and pauses schedules.
            "dev": {
                "mode": "development",
                "default": True,
                **({"workspace": workspace} if workspace else {}),
            },
            "prod": prod,
        },
    }
    header = (
        "# Written by `nbpipeline databricks bundle`: the nbpipeline notebooks (src/) and jobs\n"
        "# (resources/). Deploy: databricks bundle deploy -t dev (or -t prod).\n"
    )
    path = root / "databricks.yml"
    path.write_text(header + yaml.safe_dump(bundle, sort_keys=False))
    written.append(path)
    path = root / BUNDLE_JOBS_FILE
    path.write_text(
        "# The same jobs as `nbpipeline databricks deploy`.\n"
        + yaml.safe_dump({"resources": {"jobs": resources}}, sort_keys=False)
    )
    written.append(path)
    return written
