"""The synthetic source data: exact schema, determinism, dirty rows, skew, change batches."""

from __future__ import annotations

import math
import uuid
from collections import Counter, defaultdict
from decimal import Decimal

import pytest

from nbpipeline.errors import ConfigError
from nbpipeline.local import seed
from nbpipeline_tests import contract_oracle as oracle

pytestmark = pytest.mark.spark

EXPECTED_SCHEMA = [
    ("order_id", "bigint"),
    ("customer_id", "bigint"),
    ("product_id", "bigint"),
    ("category", "string"),
    ("region", "string"),
    ("order_ts", "timestamp"),
    ("quantity", "int"),
    ("unit_price", "decimal(10,2)"),
    ("discount", "decimal(4,3)"),
    ("status", "string"),
    ("updated_at", "timestamp"),
]


@pytest.fixture(scope="module")
def seed_schema(spark) -> str:
    name = f"t_seed_{uuid.uuid4().hex[:8]}"
    spark.sql(f"CREATE SCHEMA {name}")
    return name


@pytest.fixture(scope="module")
def dirty_rows(spark, seed_schema: str) -> list[dict]:
    seed.seed_orders(spark, f"{seed_schema}.dirty", rows=2000, dirty=True)
    return [r.asDict() for r in spark.table(f"{seed_schema}.dirty").collect()]


def fingerprint(spark, table: str) -> tuple:
    """Order-independent digest of every column of every row."""
    row = spark.sql(
        f"SELECT count(*) AS n, sum(CAST(xxhash64(*) AS DECIMAL(38,0))) AS h, "
        "sum(pmod(xxhash64(*, 1), 1000003)) AS h2 "
        f"FROM {table}"
    ).collect()[0]
    return tuple(row)


def test_schema_and_determinism(spark, seed_schema: str, dirty_rows: list[dict]) -> None:
    table = f"{seed_schema}.dirty"
    assert [(f.name, f.dataType.simpleString()) for f in spark.table(table).schema.fields] == (
        EXPECTED_SCHEMA
    )
    assert len(dirty_rows) == 2000

    again = seed.seed_orders(spark, f"{seed_schema}.dirty_again", rows=2000, dirty=True)
    assert again["rows"] == 2000 and again["version"] == 0 and again["seconds"] > 0
    assert fingerprint(spark, table) == fingerprint(spark, again["table"])

    other = seed.seed_orders(spark, f"{seed_schema}.dirty_again", rows=2000, seed=43, dirty=True)
    assert other["version"] == 1  # overwritten in place
    assert fingerprint(spark, table) != fingerprint(spark, other["table"])


def test_dirty_rows_of_every_kind(dirty_rows: list[dict]) -> None:
    rows = dirty_rows
    valid = [r for r in rows if oracle.is_valid(r)]
    invalid = [r for r in rows if not oracle.is_valid(r)]

    def some(pred) -> bool:
        return any(pred(r) for r in rows)

    for column in ("order_id", "customer_id", "product_id", "order_ts", "status"):
        assert some(lambda r, c=column: r[c] is None), f"no row with NULL {column}"
    assert some(lambda r: r["quantity"] == 0)
    assert some(lambda r: r["quantity"] is not None and r["quantity"] < 0)
    assert some(lambda r: r["quantity"] is None)
    assert some(lambda r: r["unit_price"] is not None and r["unit_price"] < 0)
    assert some(lambda r: r["unit_price"] is None)
    assert some(lambda r: r["discount"] is not None and r["discount"] < 0)
    assert some(lambda r: r["discount"] == 1)
    assert some(lambda r: r["discount"] is not None and r["discount"] > 1)
    assert some(lambda r: r["discount"] is None)
    assert some(lambda r: r["status"] is not None and r["status"] not in oracle.VALID_STATUSES)
    assert 20 <= len(invalid) < 100  # a small share of the table

    # Odd but valid values.
    assert any(r["category"] is None for r in valid)
    assert any(r["region"] is None for r in valid)
    assert any(r["updated_at"] is None for r in valid)
    assert any(r["unit_price"] == 0 for r in valid)
    assert any(r["discount"] == Decimal("0.999") for r in valid)

    # Duplicate order_ids, covering each tie-break rule.
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if r["order_id"] is not None:
            groups[r["order_id"]].append(r)
    dups = {k: g for k, g in groups.items() if len(g) > 1}
    assert len(dups) >= 2 * len(seed.DUPLICATE_KINDS)
    valid_dups = [[r for r in g if oracle.is_valid(r)] for g in dups.values()]
    valid_dups = [g for g in valid_dups if len(g) > 1]
    assert any(g[0]["updated_at"] != g[1]["updated_at"] for g in valid_dups)
    ties = [g for g in valid_dups if g[0]["updated_at"] == g[1]["updated_at"]]
    # Each field of the tie-break tuple decides at least one tie.
    deciding = Counter()
    tuple_fields = ("status", "quantity", "unit_price", "discount", "customer_id", "product_id")
    for a, b in (g[:2] for g in ties):
        differing = [f for f in tuple_fields if a[f] != b[f]]
        deciding[differing[0] if differing else "exact_copy"] += 1
    assert set(deciding) == {*tuple_fields, "exact_copy"}, deciding
    assert any(g[0]["updated_at"] is None for g in ties)  # both NULL
    assert any(
        any(oracle.is_valid(r) for r in g) and any(not oracle.is_valid(r) for r in g)
        for g in dups.values()
    )
    assert any(
        {r["updated_at"] is None for r in g} == {True, False}
        for g in dups.values()
        if all(oracle.is_valid(r) for r in g)
    )


def test_realistic_shape(spark, seed_schema: str) -> None:
    table = f"{seed_schema}.clean"
    seed.seed_orders(spark, table, rows=20_000, seed=5)
    rows = [r.asDict() for r in spark.table(table).collect()]
    assert len(rows) == 20_000
    assert all(oracle.is_valid(r) for r in rows)
    assert all(r["category"] and r["region"] and r["updated_at"] for r in rows)
    assert len({r["order_id"] for r in rows}) == 20_000

    # Power-law skew: the busiest customer / product has far more orders than the average.
    for column in ("customer_id", "product_id"):
        counts = Counter(r[column] for r in rows)
        mean = len(rows) / len(counts)
        assert counts.most_common(1)[0][1] > 5 * mean, column

    categories = defaultdict(set)
    for r in rows:
        categories[r["product_id"]].add(r["category"])
    assert all(len(c) == 1 for c in categories.values())
    assert 2 <= len({next(iter(c)) for c in categories.values()}) <= len(seed.CATEGORIES)
    assert {r["region"] for r in rows} == {name for name, _ in seed.REGIONS}

    days = (max(r["order_ts"] for r in rows) - min(r["order_ts"] for r in rows)).days
    assert 700 <= days <= 731
    assert all(r["updated_at"] >= r["order_ts"] for r in rows)

    statuses = Counter(r["status"] for r in rows)
    assert set(statuses) == oracle.VALID_STATUSES
    assert statuses.most_common(1)[0][0] == "delivered"

    discounts = [r["discount"] for r in rows]
    assert sum(d == 0 for d in discounts) > len(rows) / 2
    assert all(d == 0 or Decimal("0.05") <= d <= Decimal("0.5") for d in discounts)
    big = [
        r
        for r in rows
        if oracle.net_amount(r["quantity"] * r["unit_price"], r["discount"]) > Decimal("1000.00")
    ]
    assert len(rows) / 100 < len(big) < len(rows) / 2


def test_change_batch(spark, seed_schema: str) -> None:
    table = f"{seed_schema}.changing"
    seed.seed_orders(spark, table, rows=2000, dirty=True)
    before_rows = [r.asDict() for r in spark.table(table).collect()]
    result = seed.apply_changes(spark, table, fraction=0.2)
    after_rows = [r.asDict() for r in spark.table(table).collect()]

    assert result["table"] == table and result["version"] == 1
    assert result["inserted"] == 200 and len(after_rows) == 2200
    # ~20% of ~2000 ids, duplicated ids count every matched row
    assert 300 < result["updated"] < 500, result

    max_before = max(r["order_id"] for r in before_rows if r["order_id"] is not None)
    new = [r for r in after_rows if r["order_id"] is not None and r["order_id"] > max_before]
    assert len(new) == 200 and len({r["order_id"] for r in new}) == 200
    assert all(oracle.is_valid(r) for r in new)
    assert min(r["order_ts"] for r in new) > max(
        r["order_ts"] for r in before_rows if r["order_ts"] is not None
    )

    # Every changed row has a newer updated_at than all versions of its order before.
    latest = {}
    for r in before_rows:
        if r["order_id"] is not None and r["updated_at"] is not None:
            latest[r["order_id"]] = max(latest.get(r["order_id"], r["updated_at"]), r["updated_at"])
    old_rows = Counter(tuple(sorted(r.items(), key=lambda kv: kv[0])) for r in before_rows)
    changed = [
        r
        for r in after_rows
        if r["order_id"] is not None
        and r["order_id"] <= max_before
        and not old_rows[tuple(sorted(r.items(), key=lambda kv: kv[0]))]
    ]
    assert len(changed) > 300
    assert all(r["updated_at"] > latest[r["order_id"]] for r in changed if r["order_id"] in latest)
    before_status = {r["order_id"]: r["status"] for r in before_rows}
    moves = Counter((before_status[r["order_id"]], r["status"]) for r in changed)
    assert moves[("placed", "shipped")] and moves[("shipped", "delivered")]
    assert moves[("delivered", "returned")] and moves[("delivered", "delivered")]
    assert any(s == "cancelled" for (_, s) in moves)

    # Deterministic: the same table and seed give the same batch.
    copy = f"{seed_schema}.changing_copy"
    seed.seed_orders(spark, copy, rows=2000, dirty=True)
    again = seed.apply_changes(spark, copy, fraction=0.2)
    assert (again["updated"], again["inserted"]) == (result["updated"], result["inserted"])
    assert fingerprint(spark, copy) == fingerprint(spark, table)


def test_delta_path_table(spark, tmp_path) -> None:
    table = f"delta.`{tmp_path}/src/orders`"
    result = seed.seed_orders(spark, table, rows=300, dirty=True)
    assert result["table"] == table
    assert (tmp_path / "src" / "orders" / "_delta_log").is_dir()
    assert spark.sql(f"SELECT count(*) FROM {table}").collect()[0][0] == 300
    changed = seed.apply_changes(spark, table, fraction=1.0, seed=3)
    assert changed["version"] == 1 and changed["inserted"] == 150


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, math.nan, "0.5", True])
def test_bad_fraction(fraction) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        seed.apply_changes(None, "s.orders", fraction=fraction)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("table", "kwargs"),
    [
        ("orders", {"rows": 10}),
        ("s.orders; DROP TABLE x", {"rows": 10}),
        ("delta.`relative/path`", {"rows": 10}),
        ("s.orders", {"rows": 0}),
        ("s.orders", {"rows": 100, "dirty": True}),
        ("s.orders", {"rows": 10, "seed": "42"}),
    ],
)
def test_bad_arguments(table: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        seed.seed_orders(None, table, **kwargs)  # type: ignore[arg-type]
