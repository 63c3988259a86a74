"""Standard 5-field cron (as `nbpipeline.cron` parses it) to the Quartz syntax Databricks expects."""

from __future__ import annotations

from nbpipeline.cron import CRON_FIELDS, CronElement, CronField, cron_error, parse_cron

_QUARTZ_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")  # Quartz: SUN=1 .. SAT=7


def _quartz_plain(fld: CronField, elements: tuple[CronElement, ...]) -> str:
    """Minute, hour, day-of-month, month: same numbering in cron and Quartz."""
    out: list[str] = []
    for el in elements:
        if el.start is None:
            # Quartz writes `*/n` as `first/n`; its `*` needs no translation.
            out.append(f"{fld.low}/{el.step}" if el.step else "*")
        elif el.end is None:
            out.append(f"{el.start}/{el.step}")  # same meaning in Quartz
        elif el.step:
            # Ranges with steps are spelled out: a plain list is unambiguous in every parser.
            out.extend(str(v) for v in el.values(fld))
        elif el.start == el.end:
            out.append(str(el.start))
        else:
            out.append(f"{el.start}-{el.end}")
    return ",".join(out)


def _quartz_days(fld: CronField, elements: tuple[CronElement, ...]) -> str:
    """Day-of-week: cron SUN=0 (or 7) .. SAT=6 becomes Quartz SUN=1 .. SAT=7, written as names.

    The field is expanded to the set of days and re-written, so ranges that end on Sunday
    (`5-7`) and steps (`*/2`) come out right without relying on Quartz's wrap-around rules.
    """
    days = sorted({(v % 7) + 1 for el in elements for v in el.values(fld)})
    if len(days) == 7:
        return "*"
    runs: list[list[int]] = []
    for d in days:
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    parts: list[str] = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{_QUARTZ_DAYS[run[0] - 1]}-{_QUARTZ_DAYS[run[-1] - 1]}")
        else:
            parts.extend(_QUARTZ_DAYS[d - 1] for d in run)
    return ",".join(parts)


def cron_to_quartz(expr: str) -> str:
    """Convert a standard 5-field cron expression to a Databricks (Quartz) cron expression.

    Quartz adds a seconds field (always 0 here), numbers weekdays SUN=1..SAT=7, and requires `?`
    in exactly one of day-of-month and day-of-week. Standard cron runs on day-of-month OR
    day-of-week when both are restricted; Quartz cannot say that, so it is refused.
    """
    cron = parse_cron(expr)
    fields = cron.fields
    minute, hour, dom, month = (_quartz_plain(CRON_FIELDS[i], fields[i]) for i in range(4))
    dow = _quartz_days(CRON_FIELDS[4], fields[4])
    if not cron.any_day_of_month and not cron.any_day_of_week:
        raise cron_error(
            expr,
            "both day-of-month and day-of-week are set; cron runs on either, which Quartz "
            "cannot express (use '*' in one of them)",
        )
    if cron.any_day_of_week:
        dow = "?"
    else:
        dom = "?"
    return f"0 {minute} {hour} {dom} {month} {dow}"
