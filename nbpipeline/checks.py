"""Asset checks on the five outputs, one check step per notebook step.

What is checked is the table state a materialization produced: when the check runs in the same
run as the materialization, it reads the output at the Delta version that run committed (so a
concurrent run writing the table afterwards cannot make it fail or pass by accident) and the
source at the version the notebook reported. Run on its own (from the UI or a test), it checks
the table as it is now, against the latest materialization's source version.

Checks read tables through a Spark session from `nbpipeline.resources.spark_session`; where the
backend offers none, every check reports "not evaluated" as a warning instead of failing the run.

Deliberately no `from __future__ import annotations`: Dagster reads the resource parameter's
annotation as an object.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from nbpipeline.backends.base import NOTEBOOK_NAMES, NotebookBackend
from nbpipeline.errors import NbPipelineError
from nbpipeline.identifiers import parse_table
from nbpipeline.metadata import (
    DELTA_VERSION_KEY,
    SOURCE_TABLE_KEY,
    SOURCE_VERSION_KEY,
    TABLE_KEY,
    metadata_value,
)
from nbpipeline.resources import spark_session
from nbpipeline.tables import OUTPUT_KEYS, OUTPUT_TABLES

UNIQUE_KEYS = "unique_keys"
NO_NEGATIVE_REVENUE = "no_negative_revenue"
MATCHES_SOURCE = "row_count_matches_source"
SUBSET_OF_ORDER_FACTS = "subset_of_order_facts"

#: Money (and unit) columns that can never be negative, per output table.
AMOUNT_COLUMNS: dict[str, tuple[str, ...]] = {
    "daily_sales": ("units", "gross_revenue", "net_revenue"),
    "customer_summary": ("lifetime_value",),
    "product_performance": ("units_sold", "net_revenue"),
    "order_facts": ("gross_amount", "net_amount"),
    "high_value_orders": ("net_amount",),
}

# The data contract's definition of a valid source row, written independently of the notebooks.
VALID_ROW_SQL = (
    "order_id IS NOT NULL AND customer_id IS NOT NULL AND product_id IS NOT NULL "
    "AND order_ts IS NOT NULL AND status IN ('placed', 'shipped', 'delivered', 'returned', "
    "'cancelled') AND quantity >= 1 AND unit_price >= 0 AND discount >= 0 AND discount < 1"
)
_EXAMPLES = 5


@dataclass(frozen=True)
class Target:
    """The table state a check looks at, taken from a materialization's metadata."""

    asset: str
    table: str
    version: int | None  # None: the table as it is now
    metadata: Mapping[str, Any]
    in_this_run: bool

    @property
    def sql(self) -> str:
        return versioned(self.table, self.version)

    @property
    def described(self) -> str:
        return self.table if self.version is None else f"{self.table} version {self.version}"


def versioned(table: str, version: int | None) -> str:
    """`table` (validated) as a SQL relation, pinned to a Delta version if one is given."""
    ref = parse_table(table, what="table in materialization metadata")
    return ref.sql if version is None else f"{ref.sql} VERSION AS OF {int(version)}"


def _value(metadata: Mapping[str, Any], key: str) -> Any:
    return metadata_value(metadata.get(key))


def _materialization(
    context: dg.AssetCheckExecutionContext, asset: str
) -> tuple[Mapping[str, Any], bool] | None:
    """This run's materialization of `asset` if there is one, else the latest one."""
    key = dg.AssetKey(asset)
    entries = context.instance.all_logs(
        context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    )
    for entry in reversed(entries):
        mat = entry.asset_materialization
        if mat is not None and mat.asset_key == key:
            return mat.metadata, True
    latest = context.instance.get_latest_materialization_event(key)
    if latest is not None and latest.asset_materialization is not None:
        return latest.asset_materialization.metadata, False
    return None


def find_target(context: dg.AssetCheckExecutionContext, asset: str) -> Target | None:
    found = _materialization(context, asset)
    if found is None:
        return None
    metadata, in_this_run = found
    table = _value(metadata, TABLE_KEY)
    if not table:
        return None
    version = _value(metadata, DELTA_VERSION_KEY) if in_this_run else None
    return Target(
        asset=asset,
        table=str(table),
        version=None if version is None else int(version),
        metadata=metadata,
        in_this_run=in_this_run,
    )


def _result(
    asset: str,
    check: str,
    passed: bool,
    description: str,
    metadata: Mapping[str, Any] | None = None,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=dg.AssetKey(asset),
        check_name=check,
        passed=passed,
        severity=severity,
        description=description,
        metadata=dict(metadata or {}),
    )


def _rows_text(rows: Sequence[Any]) -> str:
    return "; ".join(", ".join(f"{k}={v}" for k, v in row.asDict().items()) for row in rows)


# --------------------------------------------------------------------------- the checks


def profile(spark: Any, target: Target) -> dict[str, int]:
    """Row count, distinct keys and negative amounts of a table state, in one scan."""
    keys = ", ".join(OUTPUT_KEYS[target.asset])
    negatives = "".join(f", COUNT_IF({c} < 0) AS neg_{c}" for c in AMOUNT_COLUMNS[target.asset])
    row = spark.sql(
        # struct(...) so that keys with NULL parts (a NULL region) still count as keys.
        f"SELECT COUNT(*) AS rows, COUNT(DISTINCT struct({keys})) AS keys{negatives} "
        f"FROM {target.sql}"
    ).collect()[0]
    return {k: int(v) for k, v in row.asDict().items()}


def check_unique_keys(spark: Any, target: Target, stats: Mapping[str, int]) -> dg.AssetCheckResult:
    """No two rows of the output share a key."""
    keys = ", ".join(OUTPUT_KEYS[target.asset])
    extra_rows = stats["rows"] - stats["keys"]
    metadata: dict[str, Any] = {
        "rows": stats["rows"],
        "distinct_keys": stats["keys"],
        "checked": target.described,
    }
    if extra_rows == 0:
        return _result(
            target.asset, UNIQUE_KEYS, True, f"({keys}) is unique in {target.described}", metadata
        )
    dups = f"SELECT {keys}, COUNT(*) AS n FROM {target.sql} GROUP BY {keys} HAVING COUNT(*) > 1"
    dup_keys = int(spark.sql(f"SELECT COUNT(*) AS n FROM ({dups})").collect()[0]["n"])
    examples = _rows_text(spark.sql(f"{dups} ORDER BY n DESC LIMIT {_EXAMPLES}").collect())
    metadata.update(duplicate_keys=dup_keys, examples=examples)
    return _result(
        target.asset,
        UNIQUE_KEYS,
        False,
        f"{dup_keys} key(s) ({keys}) occur more than once in {target.described} "
        f"({extra_rows} extra rows), e.g. {examples}",
        metadata,
    )


def check_no_negative_revenue(target: Target, stats: Mapping[str, int]) -> dg.AssetCheckResult:
    """Revenue, amount and unit columns are never negative."""
    columns = AMOUNT_COLUMNS[target.asset]
    negative = {c: stats[f"neg_{c}"] for c in columns}
    metadata: dict[str, Any] = {f"negative_{c}": n for c, n in negative.items()}
    metadata["checked"] = target.described
    bad = {c: n for c, n in negative.items() if n}
    if not bad:
        return _result(
            target.asset,
            NO_NEGATIVE_REVENUE,
            True,
            f"no negative {', '.join(columns)} in {target.described}",
            metadata,
        )
    return _result(
        target.asset,
        NO_NEGATIVE_REVENUE,
        False,
        "negative values in "
        + ", ".join(f"{c} ({n} rows)" for c, n in bad.items())
        + f" of {target.described}",
        metadata,
    )


def check_matches_source(
    spark: Any, target: Target, stats: Mapping[str, int]
) -> dg.AssetCheckResult:
    """order_facts has exactly one row per valid, deduplicated source order, at the source
    version the notebook read."""
    source = _value(target.metadata, SOURCE_TABLE_KEY)
    version = _value(target.metadata, SOURCE_VERSION_KEY)
    if not source:
        return _result(
            target.asset,
            MATCHES_SOURCE,
            False,
            "the materialization records no source_table to compare with",
            {"checked": target.described},
            severity=dg.AssetCheckSeverity.WARN,
        )
    source_sql = versioned(str(source), None if version is None else int(version))
    expected = int(
        spark.sql(
            f"SELECT COUNT(DISTINCT order_id) AS n FROM {source_sql} WHERE {VALID_ROW_SQL}"
        ).collect()[0]["n"]
    )
    actual = stats["rows"]
    read = f"{source} version {version}" if version is not None else str(source)
    metadata = {
        "expected_rows": expected,
        "actual_rows": actual,
        "source": read,
        "checked": target.described,
    }
    if expected == actual:
        return _result(
            target.asset,
            MATCHES_SOURCE,
            True,
            f"{actual} rows = valid deduplicated orders in {read}",
            metadata,
        )
    return _result(
        target.asset,
        MATCHES_SOURCE,
        False,
        f"{target.described} has {actual} rows but {read} has {expected} valid deduplicated "
        f"orders ({actual - expected:+d})",
        metadata,
    )


def check_subset_of_order_facts(
    spark: Any, target: Target, facts: Target | None
) -> dg.AssetCheckResult:
    """Every high-value order is a revenue-bearing order_facts row with the same values."""
    if facts is None:
        return _result(
            target.asset,
            SUBSET_OF_ORDER_FACTS,
            False,
            "order_facts has no recorded materialization to compare with",
            {"checked": target.described},
            severity=dg.AssetCheckSeverity.WARN,
        )
    orphans = (
        f"SELECT h.order_id, h.net_amount FROM {target.sql} h LEFT ANTI JOIN {facts.sql} f "
        "ON h.order_id = f.order_id AND f.revenue_bearing AND h.customer_id <=> f.customer_id "
        "AND h.region <=> f.region AND h.order_date <=> f.order_date "
        "AND h.net_amount <=> f.net_amount"
    )
    count = int(spark.sql(f"SELECT COUNT(*) AS n FROM ({orphans})").collect()[0]["n"])
    metadata: dict[str, Any] = {
        "rows_not_in_order_facts": count,
        "checked": target.described,
        "order_facts": facts.described,
    }
    if count == 0:
        return _result(
            target.asset,
            SUBSET_OF_ORDER_FACTS,
            True,
            f"every row of {target.described} matches a revenue-bearing row of {facts.described}",
            metadata,
        )
    examples = _rows_text(spark.sql(f"{orphans} LIMIT {_EXAMPLES}").collect())
    metadata["examples"] = examples
    return _result(
        target.asset,
        SUBSET_OF_ORDER_FACTS,
        False,
        f"{count} row(s) of {target.described} have no matching revenue-bearing row in "
        f"{facts.described}, e.g. {examples}",
        metadata,
    )


# --------------------------------------------------------------------------- definitions


def check_names(asset: str) -> list[str]:
    """The checks defined on an output table."""
    names = [UNIQUE_KEYS, NO_NEGATIVE_REVENUE]
    if asset == "order_facts":
        names.append(MATCHES_SOURCE)
    if asset == "high_value_orders":
        names.append(SUBSET_OF_ORDER_FACTS)
    return names


CHECK_DESCRIPTIONS = {
    UNIQUE_KEYS: "Each key occurs once.",
    NO_NEGATIVE_REVENUE: "No negative revenue, amount or unit values.",
    MATCHES_SOURCE: (
        "One row per valid, deduplicated source order, at the source version the notebook read."
    ),
    SUBSET_OF_ORDER_FACTS: "Every row matches a revenue-bearing order_facts row.",
}


def _evaluate(
    context: dg.AssetCheckExecutionContext, backend: NotebookBackend, assets: Sequence[str]
) -> Iterator[dg.AssetCheckResult]:
    selected = context.selected_asset_check_keys
    wanted = [
        (asset, name)
        for asset in assets
        for name in check_names(asset)
        if dg.AssetCheckKey(dg.AssetKey(asset), name) in selected
    ]
    try:
        spark = spark_session(backend)
    except NbPipelineError as exc:
        for asset, name in wanted:
            yield _result(
                asset,
                name,
                False,
                f"not evaluated: {exc}",
                severity=dg.AssetCheckSeverity.WARN,
            )
        return
    targets = {asset: find_target(context, asset) for asset in assets}
    stats: dict[str, dict[str, int]] = {}
    for asset, name in wanted:
        target = targets[asset]
        if target is not None and asset not in stats and name != SUBSET_OF_ORDER_FACTS:
            stats[asset] = profile(spark, target)
        if target is None:
            yield _result(
                asset,
                name,
                False,
                f"no materialization of {asset} recorded: nothing to check",
                severity=dg.AssetCheckSeverity.WARN,
            )
        elif name == UNIQUE_KEYS:
            yield check_unique_keys(spark, target, stats[asset])
        elif name == NO_NEGATIVE_REVENUE:
            yield check_no_negative_revenue(target, stats[asset])
        elif name == MATCHES_SOURCE:
            yield check_matches_source(spark, target, stats[asset])
        else:
            yield check_subset_of_order_facts(spark, target, targets.get("order_facts"))


def _checks_for(notebook: str) -> dg.AssetChecksDefinition:
    assets = [name for name, nb in OUTPUT_TABLES.items() if nb == notebook]
    specs = [
        dg.AssetCheckSpec(
            name=name,
            asset=asset,
            description=CHECK_DESCRIPTIONS[name],
            additional_deps=["order_facts"] if name == SUBSET_OF_ORDER_FACTS else None,
        )
        for asset in assets
        for name in check_names(asset)
    ]

    def _run(context, notebook_backend) -> Iterator[dg.AssetCheckResult]:
        yield from _evaluate(context, notebook_backend, assets)

    _run.__annotations__ = {
        "context": dg.AssetCheckExecutionContext,
        "notebook_backend": NotebookBackend,
    }
    return dg.multi_asset_check(
        name=f"{notebook}_checks",
        specs=specs,
        can_subset=True,
        description=f"Checks on the tables {notebook} writes: {', '.join(assets)}.",
    )(_run)


CHECKS: dict[str, dg.AssetChecksDefinition] = {nb: _checks_for(nb) for nb in NOTEBOOK_NAMES}
ALL_CHECKS: list[dg.AssetChecksDefinition] = list(CHECKS.values())
