"""The notebooks' widgets: the one definition of each widget's validation in the package.

Every value a user passes to a notebook (run config, `nbpipeline run --param`, job parameters) is
checked here before any notebook starts. The notebooks keep their own copy of these rules in
`notebooks/_common.py` (they run on Databricks without this package); a test runs both on the same
table of cases, so the two cannot drift apart.

- `source_table`: `[catalog.]schema.table` of plain names, or ``delta.`/absolute/path` ``.
- `target_schema`: empty (beside the source) or `[catalog.]schema` of plain names.
- `high_value_threshold`: a non-negative decimal in plain notation with at most 6 decimals,
  below 10^30 (it is compared as DECIMAL(38,6)).
- `source_version`: empty (the source's latest version when the notebook starts), a Delta
  version (a non-negative integer), or an ISO-8601 UTC timestamp (the latest version committed
  at or before it; `Z`, `+00:00` or no offset, seconds optional, up to 6 fractional digits).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

from nbpipeline.errors import ConfigError
from nbpipeline.identifiers import parse_schema, parse_table

_THRESHOLD_RE = re.compile(r"^\d+(\.\d{1,6})?$")
_VERSION_RE = re.compile(r"^\d{1,18}$")
_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?(Z|\+00:?00)?$"
)

WIDGET_DESCRIPTIONS: dict[str, str] = {
    "source_table": "Source table: [catalog.]schema.table or delta.`/absolute/path`.",
    "target_schema": "Output schema ([catalog.]schema); empty: the source table's schema.",
    "high_value_threshold": "Net amount (decimal, >= 0) from which an order is high-value.",
    "source_version": (
        "Source Delta version to read: empty (the latest when the notebook starts), a version "
        "number, or an ISO-8601 UTC timestamp (the latest version committed at or before it). "
        "Empty in a Dagster run: the version is resolved once for the whole run."
    ),
}


def parse_threshold(value: object, *, what: str = "high_value_threshold") -> Decimal:
    """The threshold as a Decimal; ConfigError unless it is a plain non-negative decimal."""
    raw = str(value).strip()
    number = None
    if _THRESHOLD_RE.match(raw):
        try:
            number = Decimal(raw)
        except InvalidOperation:
            number = None
    if number is None or number >= Decimal(10) ** 30:
        raise ConfigError(
            f"invalid {what} {value!r}: expected a non-negative decimal with at most 6 decimals, "
            "e.g. 1000.00"
        )
    return number


def parse_source_version(
    value: object, *, what: str = "source_version"
) -> int | dt.datetime | None:
    """None (latest at start), a Delta version, or an aware UTC datetime; ConfigError otherwise."""
    raw = str(value if value is not None else "").strip()
    if raw == "":
        return None
    if _VERSION_RE.match(raw):
        return int(raw)
    m = _TIMESTAMP_RE.match(raw)
    if m:
        year, month, day, hour, minute, second, fraction, _zone = m.groups()
        try:
            return dt.datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second or 0),
                int((fraction or "0").ljust(6, "0")),
                tzinfo=dt.UTC,
            )
        except ValueError:
            pass
    raise ConfigError(
        f"invalid {what} {value!r}: expected empty, a Delta version (0, 1, ...) or an ISO-8601 "
        "UTC timestamp such as 2026-01-31T12:00:00Z"
    )


def format_timestamp(value: dt.datetime) -> str:
    """A datetime as the UTC timestamp form `parse_source_version` reads (microseconds kept)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def validate_widget_values(values: Mapping[str, object], *, where: str = "") -> None:
    """Check the widget values nbpipeline understands; raise ConfigError naming the bad one.

    The notebooks check them again (they run on Databricks too); checking here fails a step
    before any notebook starts, with one clear line and no retry.
    """
    prefix = f"{where}: " if where else ""
    try:
        if "source_table" in values:
            parse_table(str(values["source_table"]), what="source_table")
        if values.get("target_schema"):
            parse_schema(str(values["target_schema"]).strip(), what="target_schema")
        if "high_value_threshold" in values:
            parse_threshold(values["high_value_threshold"])
        if "source_version" in values:
            parse_source_version(values["source_version"])
    except ConfigError as exc:
        raise ConfigError(prefix + exc.message, hint=exc.hint) from None
