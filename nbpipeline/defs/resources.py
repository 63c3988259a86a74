"""Which notebook backend the Dagster definitions bind: decided here, and only here.

`NBPIPELINE_BACKEND=local|databricks` (default `local`) picks the implementation of the abstract
`NotebookBackend` bound to the resource key `notebook_backend`. Assets and checks only ever see the
abstract type, so the asset graph is the same whatever the backend. The Databricks backend (and
its SDK) is imported only when it is selected, so a local setup never needs Databricks settings.
"""

from __future__ import annotations

import os
from typing import Any

from nbpipeline.backend import NotebookBackend
from nbpipeline.errors import ConfigError

BACKEND_ENV = "NBPIPELINE_BACKEND"
BACKENDS = ("local", "databricks")
DEFAULT_BACKEND = "local"
#: The resource key every asset and check uses.
NOTEBOOK_BACKEND_KEY = "notebook_backend"


def selected_backend() -> str:
    """The backend named by NBPIPELINE_BACKEND (default local); an unknown name is a ConfigError."""
    raw = os.environ.get(BACKEND_ENV, "").strip()
    name = raw.lower() or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ConfigError(
            f"{BACKEND_ENV}={raw!r} is not a known backend; allowed values: {', '.join(BACKENDS)}",
            hint=f"unset {BACKEND_ENV} for the local engine",
        )
    return name


def build_backend(name: str | None = None) -> NotebookBackend:
    """The configured `NotebookBackend` for `name` (default: NBPIPELINE_BACKEND)."""
    name = name or selected_backend()
    if name == "databricks":
        # Imported lazily: the Databricks SDK is only needed when this backend is chosen.
        from nbpipeline.databricks.backend import DatabricksNotebookBackend

        return DatabricksNotebookBackend.from_env()
    if name == "local":
        from nbpipeline.local.backend import LocalNotebookBackend

        return LocalNotebookBackend()
    raise ConfigError(
        f"unknown backend {name!r}; allowed values for {BACKEND_ENV}: {', '.join(BACKENDS)}"
    )


#: dagster-databricks' client resource, bound beside the Databricks backend that uses it, so the
#: UI's resource view shows the workspace URL and credential variables.
DATABRICKS_CLIENT_KEY = "databricks"


def resource_defs() -> dict[str, Any]:
    """The resources of the Dagster definitions: one notebook backend (and, for Databricks, the
    DatabricksClientResource it is built on)."""
    backend = build_backend()
    resources: dict[str, Any] = {NOTEBOOK_BACKEND_KEY: backend}
    client = getattr(backend, "databricks", None)
    if client is not None:
        resources[DATABRICKS_CLIENT_KEY] = client
    return resources


SPARK_REMOTE_ENV = "NBPIPELINE_SPARK_REMOTE"


def spark_session(backend: NotebookBackend) -> Any:
    """A Spark session on the catalog the backend's notebooks write, for work outside notebooks
    (seeding the source, asset checks).

    The local backend gives its own engine. Other backends have no Spark session of their own;
    NBPIPELINE_SPARK_REMOTE (a Spark Connect URL onto the same catalog) then supplies one.
    """
    from nbpipeline.local import engine
    from nbpipeline.local.backend import LocalNotebookBackend

    if isinstance(backend, LocalNotebookBackend):
        return engine.get_spark(backend.spark_remote)
    remote = os.environ.get(SPARK_REMOTE_ENV)
    if remote:
        return engine.get_spark(remote)
    raise ConfigError(
        f"the {backend.backend_name} backend runs notebooks only; reading tables outside a "
        f"notebook needs a Spark Connect session onto the same catalog",
        hint=f"set {SPARK_REMOTE_ENV}=sc://... (e.g. a Databricks Connect URL)",
    )
