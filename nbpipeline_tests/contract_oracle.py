"""An independent, plain-Python implementation of DATA_CONTRACT.md, used as the tests' oracle.

It shares no code with the notebooks and uses no Spark: rows are dicts as collected from the
source table, amounts are `decimal.Decimal`, timestamps `datetime` (naive = UTC). Given the source
rows it computes what every output table must hold (without `_updated_at`) and the figures each
notebook must report.

Decisions the contract leaves open, which the notebooks follow too:
- a NULL updated_at sorts lowest; if (updated_at, status, quantity, unit_price, discount,
  customer_id, product_id) still ties, order_ts, category, region decide (NULLs lowest), which only
  matters for rows that are then identical in every output column anyway;
- favourite_category considers the non-NULL categories of revenue-bearing orders (NULL if none);
- product_performance.category is the smallest non-NULL category among the counted orders;
- region may be NULL and is then part of the daily_sales key;
- net_amount = ROUND_HALF_UP(gross * (1 - discount), 2); return_rate is computed exactly and
  rounded half-up to 4 decimals, then converted to float;
- units / orders sums are 0 and revenue sums 0.00 when there is no revenue-bearing order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import Any

VALID_STATUSES = frozenset({"placed", "shipped", "delivered", "returned", "cancelled"})
REVENUE_STATUSES = frozenset({"placed", "shipped", "delivered"})
DEFAULT_THRESHOLD = Decimal("1000.00")
CENTS = Decimal("0.01")
ZERO = Decimal("0.00")

#: Output tables: key columns, then value columns, in the contract's order.
TABLE_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "daily_sales": (
        ("order_date", "region"),
        ("orders", "returned_orders", "units", "gross_revenue", "net_revenue"),
    ),
    "customer_summary": (
        ("customer_id",),
        ("orders", "first_order_ts", "last_order_ts", "lifetime_value", "favourite_category"),
    ),
    "product_performance": (
        ("product_id",),
        ("category", "orders", "units_sold", "net_revenue", "return_rate"),
    ),
    "order_facts": (
        ("order_id",),
        (
            "customer_id",
            "product_id",
            "category",
            "region",
            "order_date",
            "status",
            "quantity",
            "gross_amount",
            "net_amount",
            "revenue_bearing",
        ),
    ),
    "high_value_orders": (
        ("order_id",),
        ("customer_id", "region", "order_date", "net_amount"),
    ),
}

#: Spark SQL types of the output columns (besides `_updated_at TIMESTAMP`).
TABLE_TYPES: dict[str, dict[str, str]] = {
    "daily_sales": {
        "order_date": "date",
        "region": "string",
        "orders": "bigint",
        "returned_orders": "bigint",
        "units": "bigint",
        "gross_revenue": "decimal(18,2)",
        "net_revenue": "decimal(18,2)",
    },
    "customer_summary": {
        "customer_id": "bigint",
        "orders": "bigint",
        "first_order_ts": "timestamp",
        "last_order_ts": "timestamp",
        "lifetime_value": "decimal(18,2)",
        "favourite_category": "string",
    },
    "product_performance": {
        "product_id": "bigint",
        "category": "string",
        "orders": "bigint",
        "units_sold": "bigint",
        "net_revenue": "decimal(18,2)",
        "return_rate": "double",
    },
    "order_facts": {
        "order_id": "bigint",
        "customer_id": "bigint",
        "product_id": "bigint",
        "category": "string",
        "region": "string",
        "order_date": "date",
        "status": "string",
        "quantity": "int",
        "gross_amount": "decimal(18,2)",
        "net_amount": "decimal(18,2)",
        "revenue_bearing": "boolean",
    },
    "high_value_orders": {
        "order_id": "bigint",
        "customer_id": "bigint",
        "region": "string",
        "order_date": "date",
        "net_amount": "decimal(18,2)",
    },
}

Key = tuple[Hashable, ...]
Table = dict[Key, dict[str, Any]]


@dataclass
class Expected:
    """What the notebooks must produce from one read of the source."""

    rows_read: int
    rows_rejected: int
    tables: dict[str, Table] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Table:
        return self.tables[name]


@dataclass(frozen=True)
class Order:
    """A valid, deduplicated order with its derived values."""

    order_id: int
    customer_id: int
    product_id: int
    category: str | None
    region: str | None
    order_ts: dt.datetime
    quantity: int
    unit_price: Decimal
    discount: Decimal
    status: str
    order_date: dt.date
    gross_amount: Decimal
    net_amount: Decimal

    @property
    def counted(self) -> bool:
        return self.status != "cancelled"

    @property
    def revenue_bearing(self) -> bool:
        return self.status in REVENUE_STATUSES


def _utc_naive(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


INT_MAX = 2**31 - 1


def _fits(value: Decimal, precision: int, scale: int) -> bool:
    """Whether `value`, rounded half-up to `scale` places, fits DECIMAL(precision, scale)."""
    rounded = Decimal(value).quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)
    return abs(rounded) < Decimal(10) ** (precision - scale)


def is_valid(row: Mapping[str, Any]) -> bool:
    """The contract's validity rule for one source row. A value its contract type cannot hold
    (a quantity beyond INT, a unit_price beyond DECIMAL(10,2), a gross amount beyond
    DECIMAL(18,2)) makes the row invalid too."""
    for column in ("order_id", "customer_id", "product_id", "order_ts", "status"):
        if row.get(column) is None:
            return False
    quantity, price, discount = row.get("quantity"), row.get("unit_price"), row.get("discount")
    if quantity is None or price is None or discount is None:
        return False
    if not (quantity <= INT_MAX and _fits(price, 10, 2) and _fits(discount, 4, 3)):
        return False
    price = Decimal(price).quantize(CENTS, rounding=ROUND_HALF_UP)
    return (
        quantity >= 1
        and price >= 0
        and 0 <= discount < 1
        and _fits(quantity * price, 18, 2)
        and row["status"] in VALID_STATUSES
    )


def _low(value: Any) -> tuple:
    """Sort key placing NULL below every value."""
    return (0,) if value is None else (1, value)


def _precedence(row: Mapping[str, Any]) -> tuple:
    """Greater wins among valid rows sharing an order_id."""
    updated = row.get("updated_at")
    return (
        _low(_utc_naive(updated) if updated is not None else None),
        row["status"],
        row["quantity"],
        row["unit_price"],
        row["discount"],
        row["customer_id"],
        row["product_id"],
        _low(_utc_naive(row["order_ts"])),
        _low(row.get("category")),
        _low(row.get("region")),
    )


def net_amount(gross: Decimal, discount: Decimal) -> Decimal:
    """gross * (1 - discount), rounded half-up to cents, computed exactly."""
    with localcontext() as ctx:
        ctx.prec = 60
        return (gross * (1 - discount)).quantize(CENTS, rounding=ROUND_HALF_UP)


def round_half_up(value: Fraction, places: int) -> Decimal:
    """Round a non-negative exact fraction half-up to `places` decimals."""
    scale = 10**places
    scaled = value * scale
    units = (scaled.numerator * 2 + scaled.denominator) // (2 * scaled.denominator)
    return Decimal(units).scaleb(-places)


def valid_orders(rows: Iterable[Mapping[str, Any]]) -> tuple[int, int, dict[int, Order]]:
    """(rows_read, rows_rejected, {order_id: winning valid order})."""
    read = rejected = 0
    winners: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        read += 1
        if not is_valid(row):
            rejected += 1
            continue
        current = winners.get(row["order_id"])
        if current is None or _precedence(row) > _precedence(current):
            winners[row["order_id"]] = row
    orders = {}
    for order_id, row in winners.items():
        ts = _utc_naive(row["order_ts"])
        gross = (Decimal(row["quantity"]) * row["unit_price"]).quantize(CENTS)
        orders[order_id] = Order(
            order_id=order_id,
            customer_id=row["customer_id"],
            product_id=row["product_id"],
            category=row.get("category"),
            region=row.get("region"),
            order_ts=ts,
            quantity=row["quantity"],
            unit_price=row["unit_price"],
            discount=row["discount"],
            status=row["status"],
            order_date=ts.date(),
            gross_amount=gross,
            net_amount=net_amount(gross, row["discount"]),
        )
    return read, rejected, orders


def _daily_sales(orders: Iterable[Order]) -> Table:
    out: Table = {}
    for o in orders:
        if not o.counted:
            continue
        key = (o.order_date, o.region)
        row = out.setdefault(
            key,
            {
                "order_date": o.order_date,
                "region": o.region,
                "orders": 0,
                "returned_orders": 0,
                "units": 0,
                "gross_revenue": ZERO,
                "net_revenue": ZERO,
            },
        )
        row["orders"] += 1
        row["returned_orders"] += o.status == "returned"
        if o.revenue_bearing:
            row["units"] += o.quantity
            row["gross_revenue"] += o.gross_amount
            row["net_revenue"] += o.net_amount
    return out


def _customer_summary(orders: Iterable[Order]) -> Table:
    out: Table = {}
    by_category: dict[int, dict[str, Decimal]] = {}
    for o in orders:
        if not o.counted:
            continue
        row = out.get((o.customer_id,))
        if row is None:
            row = out[(o.customer_id,)] = {
                "customer_id": o.customer_id,
                "orders": 0,
                "first_order_ts": o.order_ts,
                "last_order_ts": o.order_ts,
                "lifetime_value": ZERO,
                "favourite_category": None,
            }
        row["orders"] += 1
        row["first_order_ts"] = min(row["first_order_ts"], o.order_ts)
        row["last_order_ts"] = max(row["last_order_ts"], o.order_ts)
        if o.revenue_bearing:
            row["lifetime_value"] += o.net_amount
            if o.category is not None:
                sums = by_category.setdefault(o.customer_id, {})
                sums[o.category] = sums.get(o.category, ZERO) + o.net_amount
    for customer_id, sums in by_category.items():
        # Greatest sum first, then the alphabetically first category.
        best = min(sums.items(), key=lambda kv: (-kv[1], kv[0]))
        out[(customer_id,)]["favourite_category"] = best[0]
    return out


def _product_performance(orders: Iterable[Order]) -> Table:
    out: Table = {}
    returned: dict[int, int] = {}
    for o in orders:
        if not o.counted:
            continue
        row = out.setdefault(
            (o.product_id,),
            {
                "product_id": o.product_id,
                "category": None,
                "orders": 0,
                "units_sold": 0,
                "net_revenue": ZERO,
                "return_rate": 0.0,
            },
        )
        if o.category is not None and (row["category"] is None or o.category < row["category"]):
            row["category"] = o.category
        row["orders"] += 1
        returned[o.product_id] = returned.get(o.product_id, 0) + (o.status == "returned")
        if o.revenue_bearing:
            row["units_sold"] += o.quantity
            row["net_revenue"] += o.net_amount
    for (product_id,), row in out.items():
        rate = round_half_up(Fraction(returned[product_id], row["orders"]), 4)
        row["return_rate"] = float(rate)
    return out


def _order_facts(orders: Iterable[Order]) -> Table:
    return {
        (o.order_id,): {
            "order_id": o.order_id,
            "customer_id": o.customer_id,
            "product_id": o.product_id,
            "category": o.category,
            "region": o.region,
            "order_date": o.order_date,
            "status": o.status,
            "quantity": o.quantity,
            "gross_amount": o.gross_amount,
            "net_amount": o.net_amount,
            "revenue_bearing": o.revenue_bearing,
        }
        for o in orders
    }


def _high_value_orders(orders: Iterable[Order], threshold: Decimal) -> Table:
    return {
        (o.order_id,): {
            "order_id": o.order_id,
            "customer_id": o.customer_id,
            "region": o.region,
            "order_date": o.order_date,
            "net_amount": o.net_amount,
        }
        for o in orders
        if o.revenue_bearing and o.net_amount >= threshold
    }


def expected(
    rows: Iterable[Mapping[str, Any]], high_value_threshold: Decimal = DEFAULT_THRESHOLD
) -> Expected:
    """Every output table (keyed by its key tuple) and the read/rejected counts for `rows`."""
    read, rejected, orders = valid_orders(rows)
    values = list(orders.values())
    return Expected(
        rows_read=read,
        rows_rejected=rejected,
        tables={
            "daily_sales": _daily_sales(values),
            "customer_summary": _customer_summary(values),
            "product_performance": _product_performance(values),
            "order_facts": _order_facts(values),
            "high_value_orders": _high_value_orders(values, Decimal(high_value_threshold)),
        },
    )


def keyed(table: str, rows: Iterable[Mapping[str, Any]]) -> Table:
    """Rows collected from an output table, keyed like `expected`, without `_updated_at`.

    Raises ValueError on a duplicate key (an output must have one row per key).
    """
    key_columns, value_columns = TABLE_COLUMNS[table]
    out: Table = {}
    for row in rows:
        values = {c: row[c] for c in (*key_columns, *value_columns)}
        for column, value in values.items():
            if isinstance(value, dt.datetime):
                values[column] = _utc_naive(value)
        key = tuple(values[c] for c in key_columns)
        if key in out:
            raise ValueError(f"{table}: duplicate key {key}")
        out[key] = values
    return out


def diff(before: Table, after: Table) -> dict[str, int]:
    """Inserted / updated / deleted key counts between two versions of one output table."""
    return {
        "inserted": sum(1 for k in after if k not in before),
        "updated": sum(1 for k in after if k in before and after[k] != before[k]),
        "deleted": sum(1 for k in before if k not in after),
    }
