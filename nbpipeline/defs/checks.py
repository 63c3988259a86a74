"""Asset checks on the five outputs, evaluated by the notebooks themselves.

Each notebook checks every table it writes right after its MERGE, against the Delta version that
MERGE committed, and returns the outcomes in its exit JSON (`tables[].checks`). So the checks run
where the notebooks run (the local engine or Databricks) and need no Spark session of their own.
Here the checks are declared (`check_specs`, on the notebook's `multi_asset`) and the exit JSON's
outcomes are turned into `dg.AssetCheckResult`s, yielded by the notebook's own step.

A check the notebook could not evaluate (its query failed, or the exit JSON does not report it)
is a WARN result saying "not evaluated", never a failure of the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from nbpipeline.defs.metadata import metadata_value
from nbpipeline.tables import (
    MATCHES_SOURCE,
    NO_NEGATIVE_REVENUE,
    OUTPUT_TABLES,
    OUTPUTS,
    SUBSET_OF_ORDER_FACTS,
    UNIQUE_KEYS,
)

CHECK_DESCRIPTIONS = {
    UNIQUE_KEYS: "Each key occurs once.",
    NO_NEGATIVE_REVENUE: "No negative revenue, amount or unit values.",
    MATCHES_SOURCE: (
        "One row per valid, deduplicated source order, at the source version the notebook read."
    ),
    SUBSET_OF_ORDER_FACTS: "Every row matches a revenue-bearing order_facts row.",
}

# The contract's definition of a valid source row, as the notebooks' row_count_matches_source
# check states it (notebooks/_common.py), for recounts outside a notebook (tests, diagnosis).
VALID_ROW_SQL = (
    "order_id IS NOT NULL AND customer_id IS NOT NULL AND product_id IS NOT NULL "
    "AND order_ts IS NOT NULL AND status IN ('placed', 'shipped', 'delivered', 'returned', "
    "'cancelled') AND try_cast(quantity AS INT) >= 1 "
    "AND try_cast(unit_price AS DECIMAL(10,2)) >= 0 AND try_cast(discount AS DECIMAL(4,3)) >= 0 "
    "AND try_cast(discount AS DECIMAL(4,3)) < 1 "
    "AND try_cast(try_multiply(try_cast(quantity AS INT), try_cast(unit_price AS DECIMAL(10,2)))"
    " AS DECIMAL(18,2)) IS NOT NULL"
)

_SEVERITIES = {"ERROR": dg.AssetCheckSeverity.ERROR, "WARN": dg.AssetCheckSeverity.WARN}


def check_names(asset: str) -> list[str]:
    """The checks defined on an output table."""
    return list(OUTPUTS[asset].checks)


def check_specs(notebook: str) -> list[dg.AssetCheckSpec]:
    """The checks on the tables `notebook` writes, declared on its step."""
    return [
        dg.AssetCheckSpec(
            name=name,
            asset=asset,
            description=CHECK_DESCRIPTIONS[name],
            additional_deps=["order_facts"] if name == SUBSET_OF_ORDER_FACTS else None,
        )
        for asset, nb in OUTPUT_TABLES.items()
        if nb == notebook
        for name in check_names(asset)
    ]


def not_evaluated(asset: str, name: str, reason: str) -> dg.AssetCheckResult:
    """A check that could not be evaluated: a warning, not failed data."""
    return dg.AssetCheckResult(
        asset_key=dg.AssetKey(asset),
        check_name=name,
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"not evaluated: {reason}",
        metadata={"evaluated": False},
    )


def _metadata_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return dg.MetadataValue.json(value) if isinstance(value, dict | list) else str(value)


def check_results(asset: str, table: Mapping[str, Any]) -> list[dg.AssetCheckResult]:
    """The AssetCheckResults of `asset`'s checks from its exit-JSON table entry, in the order
    of `check_names` (every declared check gets exactly one result)."""
    reported = {str(c.get("name")): c for c in table.get("checks") or [] if isinstance(c, Mapping)}
    out = []
    for name in check_names(asset):
        outcome = reported.get(name)
        if outcome is None:
            out.append(not_evaluated(asset, name, "the notebook did not report this check"))
            continue
        passed = outcome.get("passed")
        description = str(outcome.get("description") or "")
        if passed is None:
            text = description.removeprefix("not evaluated: ") or "no reason given"
            out.append(not_evaluated(asset, name, text))
            continue
        metadata = {
            str(k): _metadata_value(metadata_value(v))
            for k, v in (outcome.get("metadata") or {}).items()
        }
        out.append(
            dg.AssetCheckResult(
                asset_key=dg.AssetKey(asset),
                check_name=name,
                passed=bool(passed),
                severity=_SEVERITIES.get(str(outcome.get("severity")), dg.AssetCheckSeverity.ERROR),
                description=description,
                metadata=metadata,
            )
        )
    return out
