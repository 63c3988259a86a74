"""The asset graph: the `orders` source (observed, never written) and the five Delta outputs, one
op per notebook.

Each notebook is one Dagster step (a `multi_asset`): Notebook1..3 write one table each, Notebook4
writes `order_facts` and `high_value_orders` in the same run. The notebook's widget values are
the step's run config (shown in the launchpad, defaults read from the notebook's own widgets) and
are validated before the notebook runs, so bad input fails with one line before anything is
written. Steps talk to an abstract `NotebookBackend` only, so the graph is the same on the local
engine and on Databricks.

Deliberately no `from __future__ import annotations`: the per-notebook config classes are made at
import time and Dagster reads the step functions' annotations as objects.
"""

import datetime as dt
import functools
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import dagster as dg
import pydantic
from pydantic import Field

from nbpipeline import settings
from nbpipeline.backend import NOTEBOOK_NAMES, NotebookBackend, NotebookResult
from nbpipeline.defs.checks import check_results, check_specs
from nbpipeline.defs.metadata import table_metadata
from nbpipeline.defs.source import SOURCE_TABLE_ENV
from nbpipeline.defs.tags import SOURCE_VERSION_TAG, SOURCE_VERSIONS_TAG
from nbpipeline.errors import (
    ConfigError,
    EngineError,
    EngineGoneError,
    JarsError,
    NbPipelineError,
    NotebookError,
)
from nbpipeline.local.runtime import declared_widgets
from nbpipeline.redact import redact, scrub
from nbpipeline.tables import OUTPUT_KEYS, OUTPUT_TABLES, OUTPUTS, notebook_tables, pool_name
from nbpipeline.widgets import (
    WIDGET_DESCRIPTIONS,
    format_timestamp,
    parse_source_version,
    validate_widget_values,
)

GROUP = "nbpipeline"
KINDS = {"spark", "delta"}
ORDERS_KEY = dg.AssetKey("orders")
DEFAULT_TIMEOUT_SECONDS = 3600

#: A bounded retry for transient failures (engine restart, Delta commit conflict, network).
#: Bad parameters and data errors are raised as `dg.Failure(allow_retries=False)` instead.
STEP_RETRY_POLICY = dg.RetryPolicy(
    max_retries=3, delay=2.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


@functools.cache
def notebook_widgets(notebook: str) -> dict[str, str]:
    """The widgets (name -> default) the notebook declares, read statically from its source."""
    return declared_widgets(settings.notebooks_dir() / f"{notebook}.py")


def all_widgets() -> dict[str, list[str]]:
    """Widget name -> the notebooks declaring it."""
    out: dict[str, list[str]] = {}
    for notebook in NOTEBOOK_NAMES:
        for name in notebook_widgets(notebook):
            out.setdefault(name, []).append(notebook)
    return out


class NotebookConfig(dg.Config):
    """Run config of a notebook step: the notebook's widget values and a timeout.

    Subclasses per notebook (made by `_config_class`) add one string field per declared widget,
    with the notebook's own default.
    """

    # `timeout_seconds: int` is declared per notebook, after the widgets, so the launchpad
    # lists the widgets first; this declaration is for the type checker only.
    if TYPE_CHECKING:
        timeout_seconds: int

    def widget_values(self) -> dict[str, str]:
        """The widget parameters to pass to the notebook (every field but the timeout)."""
        values = self.model_dump()
        values.pop("timeout_seconds", None)
        return {str(k): str(v) for k, v in values.items()}


def _config_class(notebook: str) -> type[NotebookConfig]:
    fields: dict[str, Any] = {
        name: (
            str,
            Field(default=default, description=WIDGET_DESCRIPTIONS.get(name, f"Widget {name}.")),
        )
        for name, default in notebook_widgets(notebook).items()
    }
    fields["timeout_seconds"] = (
        int,
        Field(
            default=DEFAULT_TIMEOUT_SECONDS,
            description="Seconds before the notebook run is cancelled and the step fails.",
        ),
    )
    return pydantic.create_model(
        f"{notebook}Config",
        __base__=NotebookConfig,
        __doc__=f"Widget values for {notebook} and its timeout.",
        **fields,
    )


NOTEBOOK_CONFIGS: dict[str, type[NotebookConfig]] = {nb: _config_class(nb) for nb in NOTEBOOK_NAMES}


def op_config(
    params: Mapping[str, str] | None = None,
    *,
    timeout_seconds: int | None = None,
    notebooks: tuple[str, ...] = NOTEBOOK_NAMES,
) -> dict[str, Any]:
    """Run config `ops` section giving each notebook step the params it declares.

    A parameter goes to every notebook that declares a widget of that name; an unknown one (no
    notebook declares it) is a ConfigError naming it and the known ones.
    """
    params = dict(params or {})
    widgets = all_widgets()
    unknown = sorted(set(params) - set(widgets))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)}: no notebook declares them; "
            f"known: {', '.join(sorted(widgets))}"
        )
    validate_widget_values(params)
    ops: dict[str, Any] = {}
    for notebook in notebooks:
        config: dict[str, Any] = {
            k: str(v) for k, v in params.items() if k in notebook_widgets(notebook)
        }
        if timeout_seconds is not None:
            config["timeout_seconds"] = int(timeout_seconds)
        ops[notebook] = {"config": config}
    return ops


# --------------------------------------------------------------------------- failures


# Messages of failures worth retrying: Delta commit conflicts and a lost connection to the engine.
_TRANSIENT_MARKERS = (
    "ConcurrentAppendException",
    "ConcurrentDeleteReadException",
    "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException",
    "MetadataChangedException",
    "ProtocolChangedException",
    "DELTA_CONCURRENT",
    "UNAVAILABLE",
    "Connection refused",
    "Connection reset",
    "Socket closed",
)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed notebook step may succeed if simply tried again."""
    if isinstance(exc, JarsError):
        return False  # missing Delta JARs stay missing
    if isinstance(exc, EngineGoneError):
        # The engine process died (killed, out of memory, `engine stop`): fail the run saying so
        # rather than quietly start a new engine mid-run; the next run starts it again.
        return False
    if isinstance(exc, EngineError):
        return True
    if isinstance(exc, NotebookError):
        # A failing cell is a data or code error unless the message says otherwise; a timeout
        # would most likely time out again.
        return any(marker in str(exc.reason) for marker in _TRANSIENT_MARKERS)
    # Anything unexpected (gRPC hiccups, HTTP errors) gets the bounded retry; our own errors
    # (bad settings, engine JARs missing) would fail the same way again.
    return not isinstance(exc, NbPipelineError)


def _failure(notebook: str, exc: Exception) -> dg.Failure:
    """A one-line, non-retried step failure carrying the details as metadata."""
    text = redact(str(exc))
    metadata: dict[str, Any] = {"notebook": notebook, "error": text}
    if isinstance(exc, NotebookError):
        if exc.cell is not None:
            metadata["cell"] = exc.cell
        if exc.traceback_text:
            metadata["notebook_traceback"] = dg.MetadataValue.md(f"```\n{exc.traceback_text}```")
        if exc.run_url:
            metadata["run_url"] = dg.MetadataValue.url(exc.run_url)
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if not first_line.startswith(notebook):
        first_line = f"{notebook}: {first_line}"
    return dg.Failure(description=first_line, metadata=metadata, allow_retries=False)


# --------------------------------------------------------------------------- notebook steps


def _tag_source_version(context: dg.AssetExecutionContext, run: NotebookResult) -> None:
    """Tag the run with the source version its notebooks read, so runs on the same input pair up.

    The first step to finish sets `nbpipeline/source_version` unless the launch set it; a step
    that read another version (which `run_source_version` prevents) records all of them in
    `nbpipeline/source_versions`.
    """
    version = run.exit_value.get("source_version")
    if version is None:
        return
    value = str(version)
    instance = context.instance
    dagster_run = instance.get_run_by_id(context.run_id)
    tags = dagster_run.tags if dagster_run else {}
    current = tags.get(SOURCE_VERSION_TAG)
    if current is None:
        instance.add_run_tags(context.run_id, {SOURCE_VERSION_TAG: value})
    elif current != value:
        seen = set(tags.get(SOURCE_VERSIONS_TAG, current).split(",")) | {value}
        context.log.warning(
            f"{run.notebook} read source version {value}, another step of this run read {current}"
        )
        instance.add_run_tags(
            context.run_id, {SOURCE_VERSIONS_TAG: ",".join(sorted(seen, key=int))}
        )


def run_source_version(context: dg.AssetExecutionContext, configured: str) -> tuple[str, str]:
    """(source_version widget value, where it came from) for a step of this run.

    Every step of a run computes the same value without talking to the others: the step's
    config if it sets one; else the `nbpipeline/source_version` tag (set at launch by the sensor or by the run's first step);
    else the run's creation time, which every notebook resolves to the same Delta version (the
    latest committed at or before it), on the local engine and on Databricks alike.
    """
    if configured.strip():
        return configured.strip(), "run config"
    dagster_run = context.instance.get_run_by_id(context.run_id)
    tagged = (dagster_run.tags if dagster_run else {}).get(SOURCE_VERSION_TAG, "").strip()
    if tagged:
        return tagged, f"run tag {SOURCE_VERSION_TAG}"
    created = run_created_at(context.instance, context.run_id)
    if created is None:
        return "", "the source's latest version"
    return format_timestamp(created), "run creation time"


def run_created_at(instance: dg.DagsterInstance, run_id: str) -> dt.datetime | None:
    """When the run was created, to the microsecond: its first event (logged as the run is
    created); the run record's creation time only has whole seconds on SQLite storage, which
    would miss a source commit made in the same second before the launch."""
    records = instance.get_records_for_run(run_id, limit=1).records
    if records:
        return dt.datetime.fromtimestamp(records[0].event_log_entry.timestamp, dt.UTC)
    record = instance.get_run_record_by_id(run_id)
    return record.create_timestamp if record is not None else None


def execute_notebook_step(
    context: dg.AssetExecutionContext,
    notebook: str,
    config: NotebookConfig,
    backend: NotebookBackend,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Validate the parameters, run the notebook on the run's source version, and yield one
    materialization per table, then the checks the notebook evaluated on them."""
    params = config.widget_values()
    try:
        validate_widget_values(params, where=notebook)
        if config.timeout_seconds <= 0:
            raise ConfigError(
                f"{notebook}: timeout_seconds must be > 0, got {config.timeout_seconds}"
            )
        if "source_version" in params:
            value, origin = run_source_version(context, params["source_version"])
            parse_source_version(value, what=f"{notebook}: source_version from {origin}")
            params["source_version"] = value
            context.log.info(f"{notebook} reads source version {value!r} ({origin})")
    except ConfigError as exc:
        raise _failure(notebook, exc) from None
    context.log.info(
        f"Running {notebook} on the {backend.backend_name} backend ({backend.engine_address()}) "
        f"with {params}"
    )
    try:
        run = backend.run_notebook(
            notebook, params, timeout_seconds=config.timeout_seconds, log=context.log
        )
    except Exception as exc:
        if not is_transient(exc):
            raise _failure(notebook, exc) from None
        # Dagster's retry event carries the full error; this line says why, in one line, in the
        # run's log and `nbpipeline run`'s progress.
        attempt = context.retry_number + 1
        left = STEP_RETRY_POLICY.max_retries - context.retry_number
        text = redact(str(exc)).strip()
        detail = text.splitlines()[0] if text else type(exc).__name__
        context.log.warning(
            f"{notebook}: transient failure on attempt {attempt} "
            f"({'retrying' if left > 0 else 'no retries left'}): {detail[:300]}"
        )
        clean = scrub(exc)  # the event log stores the exception's text
        if clean is exc:
            raise
        raise clean from None
    _tag_source_version(context, run)
    by_asset = {str(t.get("asset")): t for t in run.tables}
    checks = []
    for name in notebook_tables(notebook):
        table = by_asset.get(name)
        if table is None:
            raise dg.Failure(
                description=f"{notebook} finished but its exit value reports no table {name!r}",
                metadata={"exit_value": dg.MetadataValue.json(run.exit_value)},
                allow_retries=False,
            )
        metadata = table_metadata(run, table)
        if "high_value_threshold" in params and name == "high_value_orders":
            metadata["high_value_threshold"] = params["high_value_threshold"]
        yield dg.MaterializeResult(asset_key=dg.AssetKey(name), metadata=metadata)
        checks.extend(check_results(name, table))
    # After every materialization: subset_of_order_facts depends on order_facts.
    yield from checks


def _notebook_assets(notebook: str) -> dg.AssetsDefinition:
    specs = [
        dg.AssetSpec(
            key=name,
            deps=[ORDERS_KEY],
            description=OUTPUTS[name].description,
            kinds=KINDS,
            group_name=GROUP,
            metadata={"notebook": notebook, "key_columns": ", ".join(OUTPUT_KEYS[name])},
        )
        for name in notebook_tables(notebook)
    ]

    def _step(context, config, notebook_backend) -> Iterator[Any]:
        yield from execute_notebook_step(context, notebook, config, notebook_backend)

    # Annotations as objects: the config class differs per notebook.
    _step.__annotations__ = {
        "context": dg.AssetExecutionContext,
        "config": NOTEBOOK_CONFIGS[notebook],
        "notebook_backend": NotebookBackend,
    }
    _step.__name__ = notebook
    return dg.multi_asset(
        name=notebook,
        specs=specs,
        description=f"Runs notebooks/{notebook}.py and MERGEs {', '.join(notebook_tables(notebook))}.",
        check_specs=check_specs(notebook),
        pool=pool_name(notebook),
        retry_policy=STEP_RETRY_POLICY,
    )(_step)


NOTEBOOK_ASSETS: dict[str, dg.AssetsDefinition] = {
    nb: _notebook_assets(nb) for nb in NOTEBOOK_NAMES
}

#: Asset keys of the five outputs, in the contract's order.
OUTPUT_ASSET_KEYS: list[dg.AssetKey] = [dg.AssetKey(name) for name in OUTPUT_TABLES]


# --------------------------------------------------------------------------- the source


ORDERS_DESCRIPTION = (
    "The orders source table (one row per order), written upstream, never by this pipeline. "
    "Observing it records its Delta version as the data version (with row count and last "
    f"commit time), so the outputs show as stale when it moves. Table: ${{{SOURCE_TABLE_ENV}}}, "
    f"default {settings.DEFAULT_SOURCE_TABLE}."
)


def _observe_orders(
    context: dg.AssetExecutionContext, notebook_backend: NotebookBackend
) -> Iterator[dg.ObserveResult]:
    from nbpipeline.defs.source import configured_source_table, observe_with_backend

    try:
        state = observe_with_backend(notebook_backend, configured_source_table())
    except ConfigError as exc:
        # No observation at all rather than a guessed version.
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        raise dg.Failure(description=f"orders: {exc.message}{hint}", allow_retries=False) from None
    context.log.info(f"{state.table} is at version {state.version} ({state.rows:,} rows)")
    yield dg.ObserveResult(
        asset_key=ORDERS_KEY,
        data_version=dg.DataVersion(str(state.version)),
        metadata=state.metadata(),
    )


with warnings.catch_warnings():
    # The decorator is marked beta; the warning would print at every load of the definitions.
    warnings.simplefilter("ignore", dg.BetaWarning)
    orders = dg.multi_observable_source_asset(
        specs=[
            dg.AssetSpec(
                key=ORDERS_KEY, group_name=GROUP, kinds=KINDS, description=ORDERS_DESCRIPTION
            )
        ],
        name="orders",
        description=ORDERS_DESCRIPTION,
    )(_observe_orders)


ALL_ASSETS: list[dg.AssetsDefinition] = [orders, *NOTEBOOK_ASSETS.values()]
