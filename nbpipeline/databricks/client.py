"""The Databricks workspace client: settings, credentials and API error handling.

Secrets: credentials come through dagster-databricks' `DatabricksClientResource`, whose host and
token are read from the environment (`dg.EnvVar("DATABRICKS_HOST")`,
`dg.EnvVar("DATABRICKS_TOKEN")`), so Dagster only ever stores and shows the variable *names*. The
token itself is handed to the Databricks SDK and to nothing else: no log line or exception built
here contains it. With no token configured the SDK's unified auth finds credentials on its own
(OAuth M2M variables, a `~/.databrickscfg` profile, Azure CLI, ...).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import requests
from dagster_databricks import DatabricksClientResource
from dagster_databricks.resources import OauthCredentials
from databricks.sdk import WorkspaceClient
from databricks.sdk.credentials_provider import DefaultCredentials
from databricks.sdk.errors import DatabricksError

from nbpipeline import reachability
from nbpipeline.errors import ConfigError, NbPipelineError

HOST_ENV = "DATABRICKS_HOST"
TOKEN_ENV = "DATABRICKS_TOKEN"
CLUSTER_ENV = "DATABRICKS_CLUSTER_ID"
WORKSPACE_DIR_ENV = "NBPIPELINE_DATABRICKS_WORKSPACE_DIR"
# Each user gets their own copy: a shared folder would let any user or branch change the code
# another user's scheduled job runs. `{user}` is the caller's workspace user name.
USER_WORKSPACE_DIR = "/Users/{user}/nbpipeline"
DEFAULT_WORKSPACE_DIR = USER_WORKSPACE_DIR

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


@contextlib.contextmanager
def api_errors_reported() -> Iterator[None]:
    """Report a Databricks API failure as one NbPipelineError line, not a traceback; usable as a
    decorator too."""
    try:
        yield
    except API_ERRORS as exc:
        raise NbPipelineError(f"Databricks API error: {describe_api_error(exc)}") from None


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
    oauth = resource.oauth_credentials
    if oauth is not None:
        oauth = OauthCredentials(
            client_id=str(config_value(oauth.client_id)),
            client_secret=str(config_value(oauth.client_secret)),
        )
    token = config_value(resource.token)
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
    if resource is None:
        resource = DatabricksClientResource(host=host, token=token or None)
    # In seconds, not after the SDK's retry window: wrong host, TLS failure, bad credentials.
    peeked = config_value(resource.token)
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


def config_value(value: Any) -> Any:
    """The value a config field will have at run time: EnvVars are looked up, others unchanged."""
    if isinstance(value, dg.EnvVar):
        return value.get_value()
    return value


def env_var_name(value: Any) -> str | None:
    return value.env_var_name if isinstance(value, dg.EnvVar) else None


# A minute of retries rides out throttling and blips; the SDK's default five minutes would leave
# someone with a mistyped DATABRICKS_HOST staring at a silent terminal.
COMMAND_RETRY_TIMEOUT_SECONDS = 60


def command_workspace_client() -> tuple[str, WorkspaceClient]:
    """(host, client) for a command-line command: the environment's credentials, short retries."""
    return workspace_client_from_env(retry_timeout_seconds=COMMAND_RETRY_TIMEOUT_SECONDS)
