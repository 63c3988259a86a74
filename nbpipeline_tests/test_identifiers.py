"""Table names are validated before any SQL runs."""

from __future__ import annotations

import pytest

from nbpipeline.errors import ConfigError
from nbpipeline.identifiers import parse_schema, parse_table
from nbpipeline.tables import output_ref


@pytest.mark.parametrize(
    ("value", "sql"),
    [
        ("nbpipeline.orders", "nbpipeline.orders"),
        ("main.sales.orders", "main.sales.orders"),
        (" s.t ", "s.t"),
        ("delta.`/data/lake/orders`", "delta.`/data/lake/orders`"),
        ("delta.`s3://bucket/lake/orders/`", "delta.`s3://bucket/lake/orders`"),
    ],
)
def test_accepted_names(value: str, sql: str) -> None:
    assert parse_table(value).sql == sql


@pytest.mark.parametrize(
    "value",
    [
        "orders",  # no schema
        "a.b.c.d",
        "s.t; DROP TABLE x",
        "s.`t`",
        "s.t--",
        "s.1t",
        "s.t x",
        "delta.`relative/path`",
        "delta.`/a/../etc/orders`",
        "delta.`/a/b`; DROP TABLE s.t; --`",
        "delta.`/a/it's`",
        "",
    ],
)
def test_refused_names_name_the_value(value: str) -> None:
    with pytest.raises(ConfigError, match="invalid source_table"):
        parse_table(value, what="source_table")


def test_outputs_live_beside_the_source_or_in_target_schema() -> None:
    assert output_ref("nbpipeline.orders", "daily_sales").sql == "nbpipeline.daily_sales"
    assert output_ref("c.s.orders", "daily_sales").sql == "c.s.daily_sales"
    assert output_ref("delta.`/lake/orders`", "order_facts").sql == "delta.`/lake/order_facts`"
    assert output_ref("nbpipeline.orders", "x_y", "gold").sql == "gold.x_y"
    with pytest.raises(ConfigError, match="invalid target_schema"):
        output_ref("nbpipeline.orders", "daily_sales", "gold; drop")
    with pytest.raises(ConfigError, match="invalid schema"):
        parse_schema("a.b.c")
