"""The one cron and time-zone rule of nbpipeline's schedules, Dagster's and Databricks' alike.

A schedule is a standard 5-field cron expression (minute hour day-of-month month day-of-week,
names and `@daily`-style macros allowed) in an IANA time zone. `parse_cron` is the only parser:
Dagster's schedules check with it, and the Databricks jobs convert its result to Quartz.
"""

from __future__ import annotations

import calendar
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass

from nbpipeline.errors import ConfigError

CRON_HINT = "5 fields: minute hour day-of-month month day-of-week, e.g. '30 6 * * MON-FRI'"
TIMEZONE_HINT = "use an IANA name such as UTC or Europe/Amsterdam"

_MONTHS = {
    m: i
    for i, m in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], 1
    )
}
_DAYS = {
    d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])
}  # cron: SUN=0
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True)
class CronField:
    name: str
    low: int
    high: int
    names: Mapping[str, int] | None = None


CRON_FIELDS = (
    CronField("minute", 0, 59),
    CronField("hour", 0, 23),
    CronField("day-of-month", 1, 31),
    CronField("month", 1, 12, _MONTHS),
    CronField("day-of-week", 0, 7, _DAYS),  # 7 is Sunday too, as in every common cron
)


@dataclass(frozen=True)
class CronElement:
    """One comma-separated item: `*`, `a`, `a-b`, with an optional `/step`."""

    start: int | None  # None: `*`
    end: int | None
    step: int | None

    def values(self, fld: CronField) -> list[int]:
        low = fld.low if self.start is None else self.start
        high = fld.high if self.end is None else self.end
        return list(range(low, high + 1, self.step or 1))


@dataclass(frozen=True)
class Cron:
    """A parsed 5-field cron: each field's elements, in CRON_FIELDS order."""

    expression: str
    fields: tuple[tuple[CronElement, ...], ...]

    @property
    def any_day_of_month(self) -> bool:
        return _is_star(self.fields[2])

    @property
    def any_day_of_week(self) -> bool:
        return _is_star(self.fields[4])

    def values(self, index: int) -> set[int]:
        """The values field `index` fires on; day-of-week as 0..6 (Sunday 0)."""
        fld = CRON_FIELDS[index]
        found = {v for el in self.fields[index] for v in el.values(fld)}
        return {v % 7 for v in found} if fld.name == "day-of-week" else found


def _is_star(elements: tuple[CronElement, ...]) -> bool:
    return len(elements) == 1 and elements[0] == CronElement(None, None, None)


def cron_error(expr: str, reason: str, *, setting: str | None = None) -> ConfigError:
    """The error for an invalid cron; with `setting`, the message names the variable or flag."""
    if setting:
        return ConfigError(
            f"{setting}={expr!r} is not a valid 5-field cron expression: {reason}", hint=CRON_HINT
        )
    return ConfigError(f"invalid cron {expr!r}: {reason}", hint=CRON_HINT)


class _Invalid(Exception):
    """A reason an expression is not valid cron; turned into ConfigError by `parse_cron`."""


def _value(fld: CronField, token: str) -> int:
    upper = token.upper()
    if fld.names is not None and upper in fld.names:
        return fld.names[upper]
    if not token.isdigit():
        names = f" or a name ({', '.join(fld.names)})" if fld.names else ""
        raise _Invalid(f"{fld.name} value {token!r} is not a number{names}")
    number = int(token)
    if not fld.low <= number <= fld.high:
        raise _Invalid(f"{fld.name} value {number} is outside {fld.low}-{fld.high}")
    return number


def _parse_element(fld: CronField, item: str) -> CronElement:
    if not item:
        raise _Invalid(f"empty item in {fld.name}")
    body, _, step_text = item.partition("/")
    step = None
    if "/" in item:
        if not step_text.isdigit() or int(step_text) == 0:
            raise _Invalid(f"{fld.name} step {step_text!r} must be a positive number")
        step = int(step_text)
    if body == "*":
        return CronElement(None, None, step)
    if body in ("?", "L", "W") or any(c in body for c in "#LW?"):
        raise _Invalid(f"{body!r} in {fld.name} is Quartz syntax, not standard cron")
    low_text, dash, high_text = body.partition("-")
    start = _value(fld, low_text)
    if not dash:
        # `a/n` (cronie): from a to the field's maximum every n. Plain `a` is just a.
        return CronElement(start, None if step else start, step)
    end = _value(fld, high_text)
    if end < start:
        raise _Invalid(f"{fld.name} range {body!r} runs backwards")
    return CronElement(start, end, step)


def _parse(expr: str) -> Cron:
    if not isinstance(expr, str) or not expr.strip():
        raise _Invalid("empty expression")
    text = " ".join(expr.split())
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise _Invalid(f"unknown macro {text!r} (known: {', '.join(MACROS)})")
        text = MACROS[text.lower()]
    raw_fields = text.split(" ")
    if len(raw_fields) != 5:
        raise _Invalid(f"expected 5 fields, got {len(raw_fields)}")
    parsed: list[tuple[CronElement, ...]] = []
    for fld, raw in zip(CRON_FIELDS, raw_fields, strict=True):
        elements = tuple(_parse_element(fld, item) for item in raw.split(","))
        if len(elements) > 1 and any(el.start is None and el.step is None for el in elements):
            raise _Invalid(f"'*' cannot be part of a list in {fld.name}")
        parsed.append(elements)
    cron = Cron(text, tuple(parsed))
    if cron.any_day_of_week and not cron.any_day_of_month:
        # A schedule that can never fire is a mistake, not a schedule (e.g. 31 February).
        longest = {m: calendar.monthrange(2024, m)[1] for m in range(1, 13)}  # a leap year
        if not any(d <= longest[m] for d in cron.values(2) for m in cron.values(3)):
            raise _Invalid("no month of the schedule has that day, so it never runs")
    return cron


def parse_cron(expr: str, *, setting: str | None = None) -> Cron:
    """Parse a standard 5-field cron expression; ConfigError (naming `setting`) if invalid."""
    try:
        return _parse(expr)
    except _Invalid as exc:
        raise cron_error(str(expr), str(exc), setting=setting) from None


def check_cron(expr: str, *, setting: str | None = None) -> str:
    """`expr` if it is a valid standard 5-field cron expression, else ConfigError."""
    parse_cron(expr, setting=setting)
    return expr


def first_common_start(a: str, b: str) -> str | None:
    """'HH:MM' at which both crons (same time zone) start on some day, or None if they never do.

    Only schedules that restrict at most one of day-of-month and day-of-week are compared (the
    Databricks jobs refuse the others): a day-of-month set and a day-of-week set always meet on
    some date, so only two sets of the same kind can keep two schedules apart.
    """
    ca, cb = parse_cron(a), parse_cron(b)
    minutes, hours = ca.values(0) & cb.values(0), ca.values(1) & cb.values(1)
    if not (minutes and hours and ca.values(3) & cb.values(3)):
        return None
    if not ca.any_day_of_month and not cb.any_day_of_month and not ca.values(2) & cb.values(2):
        return None
    if not ca.any_day_of_week and not cb.any_day_of_week and not ca.values(4) & cb.values(4):
        return None
    return f"{min(hours):02d}:{min(minutes):02d}"


def check_timezone(name: str, *, setting: str | None = None) -> str:
    """`name` if it is an IANA time zone (what Dagster and Databricks accept), else ConfigError;
    with `setting`, the message names the variable or flag."""
    if not isinstance(name, str) or not name.strip():
        what = f"{setting} is empty" if setting else "timezone is empty"
        raise ConfigError(what, hint=TIMEZONE_HINT)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        shown = f"{setting}={name!r} is not a known IANA time zone" if setting else None
        raise ConfigError(shown or f"unknown timezone {name!r}", hint=TIMEZONE_HINT) from None
    return name
