"""The widgets' validation: one rule per widget in nbpipeline/widgets.py, and the notebooks' own
copy (notebooks/_common.py, which runs on Databricks without the package) agreeing with it."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from nbpipeline import widgets
from nbpipeline.defs import assets
from nbpipeline.errors import ConfigError
from nbpipeline.local.runtime import parse_notebook
from nbpipeline.settings import notebooks_dir

# (widget, value, accepted)
CASES: list[tuple[str, str, bool]] = [
    ("source_table", "nbpipeline.orders", True),
    ("source_table", "main.nbpipeline.orders", True),
    ("source_table", " s.orders ", True),
    ("source_table", "delta.`/data/lake/orders`", True),
    ("source_table", "delta.`s3://bucket/lake/orders`", True),
    ("source_table", "delta.`/data/lake/orders/`", True),
    ("source_table", "orders", False),
    ("source_table", "a.b.c.d", False),
    ("source_table", "s.orders; DROP TABLE x", False),
    ("source_table", "s.`orders`", False),
    ("source_table", "delta.`relative/orders`", False),
    ("source_table", "delta.`/data/../orders`", False),
    ("source_table", "delta.`/data/my-orders`", False),
    ("source_table", "", False),
    ("target_schema", "", True),
    ("target_schema", "out", True),
    ("target_schema", "main.out", True),
    ("target_schema", "a.b.c", False),
    ("target_schema", "a b", False),
    ("target_schema", "out;", False),
    ("high_value_threshold", "1000.00", True),
    ("high_value_threshold", "0", True),
    ("high_value_threshold", " 250 ", True),
    ("high_value_threshold", "0.000001", True),
    ("high_value_threshold", "9" * 30, True),
    ("high_value_threshold", "1" + "0" * 30, False),
    ("high_value_threshold", "0.0000001", False),
    ("high_value_threshold", "-1", False),
    ("high_value_threshold", "+5", False),
    ("high_value_threshold", "1e3", False),
    ("high_value_threshold", ".5", False),
    ("high_value_threshold", "5.", False),
    ("high_value_threshold", "NaN", False),
    ("high_value_threshold", "lots", False),
    ("high_value_threshold", "", False),
    ("source_version", "", True),
    ("source_version", "  ", True),
    ("source_version", "0", True),
    ("source_version", "42", True),
    ("source_version", "-1", False),
    ("source_version", "1.5", False),
    ("source_version", "v3", False),
    ("source_version", "2026-01-31T12:00:00Z", True),
    ("source_version", "2026-01-31T12:00:00.123456Z", True),
    ("source_version", "2026-01-31T12:00:00+00:00", True),
    ("source_version", "2026-01-31 12:00", True),
    ("source_version", "2026-01-31T12:00:00+02:00", False),
    ("source_version", "2026-02-30T12:00:00Z", False),
    ("source_version", "2026-01-31T12:00:00.1234567Z", False),
    ("source_version", "2026-01-31", False),
    ("source_version", "yesterday", False),
]


def package_accepts(widget: str, value: str) -> bool:
    try:
        widgets.validate_widget_values({widget: value})
    except ConfigError:
        return False
    return True


@pytest.fixture(scope="module")
def notebook_rules() -> dict[str, Any]:
    """The notebooks' validation functions, from the cells of _common.py that define them."""
    namespace: dict[str, Any] = {}
    for cell in parse_notebook(notebooks_dir() / "_common.py"):
        if cell.title and cell.title.startswith(("Imports", "Parameter validation")):
            exec(compile(cell.source, str(cell.path), "exec"), namespace)
    return namespace


def notebook_accepts(rules: dict[str, Any], widget: str, value: str) -> bool:
    parse = {
        "source_table": rules["parse_table_name"],
        "target_schema": rules["parse_schema_name"],
        "high_value_threshold": rules["parse_threshold"],
        "source_version": rules["parse_source_version"],
    }[widget]
    try:
        parse(value)
    except rules["NotebookInputError"]:
        return False
    return True


@pytest.mark.parametrize(("widget", "value", "accepted"), CASES)
def test_package_and_notebooks_agree(
    notebook_rules: dict[str, Any], widget: str, value: str, accepted: bool
) -> None:
    assert package_accepts(widget, value) is accepted
    assert notebook_accepts(notebook_rules, widget, value) is accepted


def test_parsed_values_agree(notebook_rules: dict[str, Any]) -> None:
    for raw in ("1000.00", "0.5", "12"):
        assert widgets.parse_threshold(raw) == notebook_rules["parse_threshold"](raw)
        assert widgets.parse_threshold(raw) == Decimal(raw)
    for raw in ("", "7", "2026-01-31T12:00:00.5Z", "2026-01-31 12:00"):
        assert widgets.parse_source_version(raw) == notebook_rules["parse_source_version"](raw)
    stamp = widgets.parse_source_version("2026-01-31T12:00:00.5Z")
    assert stamp == dt.datetime(2026, 1, 31, 12, 0, 0, 500000, tzinfo=dt.UTC)
    # The form a Dagster run passes (its creation time) reads back to the same instant.
    created = dt.datetime(2026, 3, 1, 8, 30, 15, 123456)
    assert widgets.parse_source_version(widgets.format_timestamp(created)) == created.replace(
        tzinfo=dt.UTC
    )


def test_one_definition_of_each_rule() -> None:
    """assets.py validates through widgets.py (no copy of its own)."""
    assert assets.validate_widget_values is widgets.validate_widget_values
    assert set(widgets.WIDGET_DESCRIPTIONS) >= set(assets.all_widgets())
    with pytest.raises(ConfigError, match=r"^Notebook4: invalid high_value_threshold '1e3'"):
        widgets.validate_widget_values({"high_value_threshold": "1e3"}, where="Notebook4")
    with pytest.raises(ConfigError, match="invalid source_version 'v3'"):
        assets.op_config({"source_version": "v3"})
