"""Deterministic synthetic `orders` data, generated inside Spark.

Every value is a pure function of (seed, row number) computed with `xxhash64` in SQL expressions
over `spark.range`, so the data never passes through Python, 10M rows take a minute or two on a
laptop, the same seed always gives the same table, and the code runs unchanged on a Spark Connect
session, a local engine or Databricks serverless (no caching, no RDDs, no UDFs).

`seed_orders` (re)creates the source table; with `dirty=True` it adds rows of every kind the data
contract rejects, duplicate order_ids that exercise each tie-break rule, and valid rows with NULL
category, region and updated_at. `apply_changes` MERGEs an upstream-like change batch (status
changes, corrections, cancellations, new orders) into an existing table.

This is a demo tool, and a real source belongs to its user: every table `seed_orders` writes
carries the Delta table property `nbpipeline.demo = true`, and both functions refuse (before
writing anything) an existing table without it unless `replace=True` (`--replace` on the CLI).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbpipeline.errors import ConfigError
from nbpipeline.identifiers import TableRef, parse_table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

Progress = Callable[[str], None]

#: The source table's columns and their exact types, as the data contract specifies them.
ORDER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("order_id", "BIGINT"),
    ("customer_id", "BIGINT"),
    ("product_id", "BIGINT"),
    ("category", "STRING"),
    ("region", "STRING"),
    ("order_ts", "TIMESTAMP"),
    ("quantity", "INT"),
    ("unit_price", "DECIMAL(10,2)"),
    ("discount", "DECIMAL(4,3)"),
    ("status", "STRING"),
    ("updated_at", "TIMESTAMP"),
)

STATUSES = ("placed", "shipped", "delivered", "returned", "cancelled")
CATEGORIES = (
    "automotive",
    "beauty",
    "books",
    "electronics",
    "fashion",
    "garden",
    "grocery",
    "home",
    "sports",
    "toys",
)
REGIONS: tuple[tuple[str, float], ...] = (
    ("north", 0.28),
    ("south", 0.24),
    ("east", 0.20),
    ("west", 0.18),
    ("central", 0.10),
)
# Most orders of a two-year history are delivered; a few are still in flight.
BASE_STATUS_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("placed", 0.06),
    ("shipped", 0.10),
    ("delivered", 0.62),
    ("returned", 0.08),
    ("cancelled", 0.14),
)
# Orders added by a change batch are recent, so mostly not yet delivered.
NEW_STATUS_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("placed", 0.55),
    ("shipped", 0.25),
    ("delivered", 0.12),
    ("returned", 0.01),
    ("cancelled", 0.07),
)

#: The Delta table property marking a table as created by `seed_orders` (synthetic demo data).
DEMO_PROPERTY = "nbpipeline.demo"
REPLACE_OPTION = "--replace"
_MISSING_DELTA = "DELTA_MISSING_DELTA_TABLE"

_T0 = 1672531200  # 2023-01-01T00:00:00Z
_TWO_YEARS = 730 * 86400
_DAY = 86400
# Share of generated rows (beyond the guaranteed ones) that get a dirty or odd-but-valid kind.
_DIRTY_RATE = 0.01
_MIN_DIRTY_ROWS = 200

# The generator's internal columns between `_draws` and `_finish`.
_WORK_COLUMNS = (
    "order_id",
    "customer_id",
    "product_id",
    "region",
    "ts_s",
    "status",
    "quantity",
    "unit_price",
    "discount",
    "updated_s",
    "null_category",
    "u_variant",
)
_DRAWS = (
    "customer",
    "product",
    "region",
    "ts",
    "status",
    "quantity",
    "price",
    "promo",
    "discount",
    "lag",
    "dirty",
    "kind",
    "variant",
)

_NEXT_STATUS = (
    "CASE status WHEN 'placed' THEN 'shipped' WHEN 'shipped' THEN 'delivered' "
    "WHEN 'delivered' THEN 'returned' ELSE status END"
)
_OTHER_STATUS = "CASE WHEN status = 'shipped' THEN 'placed' ELSE 'shipped' END"

# Rows the contract rejects, one kind each: (name, overrides of work columns as SQL).
REJECTED_KINDS: tuple[tuple[str, dict[str, str]], ...] = (
    ("null_order_id", {"order_id": "NULL"}),
    ("null_customer_id", {"customer_id": "NULL"}),
    ("null_product_id", {"product_id": "NULL"}),
    ("null_order_ts", {"ts_s": "NULL"}),
    ("null_status", {"status": "NULL"}),
    ("zero_quantity", {"quantity": "0"}),
    ("negative_quantity", {"quantity": "-1 - CAST(floor(u_variant * 5) AS INT)"}),
    ("null_quantity", {"quantity": "NULL"}),
    ("negative_unit_price", {"unit_price": "-unit_price - 0.01"}),
    ("null_unit_price", {"unit_price": "NULL"}),
    ("negative_discount", {"discount": "-0.05"}),
    ("discount_one", {"discount": "1"}),
    ("discount_above_one", {"discount": "1.25"}),
    ("null_discount", {"discount": "NULL"}),
    (
        "unknown_status",
        {
            # Near-misses of valid values too: the contract compares exactly.
            "status": "element_at(array('lost', 'SHIPPED', '', 'shipped ', 'Delivered', "
            "'refunded'), 1 + CAST(floor(u_variant * 6) AS INT))"
        },
    ),
)
# Valid rows with unusual values the notebooks must still handle.
ODD_VALID_KINDS: tuple[tuple[str, dict[str, str]], ...] = (
    ("null_category", {"null_category": "true"}),
    ("null_region", {"region": "NULL"}),
    ("null_updated_at", {"updated_s": "NULL"}),
    ("free_item", {"unit_price": "0"}),
    ("max_discount", {"discount": "0.999"}),
)
# Extra rows sharing the order_id of a clean row (their "partner"), one tie-break rule each.
DUPLICATE_KINDS: tuple[tuple[str, dict[str, str]], ...] = (
    ("newer_version", {"status": _NEXT_STATUS, "updated_s": f"updated_s + {_DAY}"}),
    (
        "newer_moved",
        {"region": "'central'", "ts_s": f"ts_s + {_DAY}", "updated_s": "updated_s + 3600"},
    ),
    (
        "older_version",
        {"status": "'placed'", "quantity": "quantity + 1", "updated_s": f"updated_s - {_DAY}"},
    ),
    ("newer_cancelled", {"status": "'cancelled'", "updated_s": "updated_s + 7200"}),
    ("tie_status", {"status": _OTHER_STATUS}),
    (
        "tie_quantity",
        {
            "quantity": "CASE WHEN quantity > 1 AND u_variant < 0.5 "
            "THEN quantity - 1 ELSE quantity + 1 END"
        },
    ),
    (
        "tie_unit_price",
        {
            "unit_price": "CASE WHEN unit_price >= 0.01 AND u_variant < 0.5 "
            "THEN unit_price - 0.01 ELSE unit_price + 0.01 END"
        },
    ),
    (
        "tie_discount",
        {
            "discount": "CASE WHEN discount >= 0.01 AND u_variant < 0.5 "
            "THEN discount - 0.01 ELSE discount + 0.01 END"
        },
    ),
    (
        "tie_customer_id",
        {
            "customer_id": "CASE WHEN customer_id > 1 AND u_variant < 0.5 "
            "THEN customer_id - 1 ELSE customer_id + 1 END"
        },
    ),
    (
        "tie_product_id",
        {
            "product_id": "CASE WHEN product_id > 1 AND u_variant < 0.5 "
            "THEN product_id - 1 ELSE product_id + 1 END"
        },
    ),
    ("exact_copy", {}),
    ("invalid_newer", {"quantity": "0", "updated_s": f"updated_s + {_DAY}"}),
    ("invalid_older", {"status": "'lost'", "updated_s": "updated_s - 3600"}),
    ("null_updated_at_loses", {"status": _NEXT_STATUS, "updated_s": "NULL"}),
    # The partner row gets a NULL updated_at too (see `_PARTNER_NULL_UPDATED`).
    ("both_null_updated_at", {"status": _OTHER_STATUS, "updated_s": "NULL"}),
)
_BOTH_NULL_KIND = [name for name, _ in DUPLICATE_KINDS].index("both_null_updated_at")
_PARTNER_NULL_UPDATED: tuple[str, dict[str, str]] = (
    "partner_null_updated_at",
    {"updated_s": "NULL"},
)

#: Every kind of unusual row `seed_orders(dirty=True)` guarantees at least one of.
DIRTY_KINDS: tuple[str, ...] = tuple(
    name for name, _ in (*REJECTED_KINDS, *ODD_VALID_KINDS, *DUPLICATE_KINDS)
)


@dataclass(frozen=True)
class _Shape:
    """Parameters of one generated batch of clean orders."""

    seed: int
    id_offset: int
    n_customers: int
    n_products: int
    ts_start: int
    ts_span: int
    status_weights: tuple[tuple[str, float], ...]


def _uniform(seed: int, salt: int, column: str) -> str:
    """SQL for a double uniform in [0, 1): a pure function of (seed, salt, column)."""
    # The top 53 bits of the 64-bit hash fill a double's mantissa exactly.
    return (
        f"(shiftrightunsigned(xxhash64(CAST({seed} AS BIGINT), {salt}, {column}), 11) "
        "/ 9007199254740992.0D)"
    )


def _weighted(u: str, choices: Sequence[tuple[str, float]]) -> str:
    """SQL CASE picking a string by cumulative weight for a uniform draw `u`."""
    total = sum(w for _, w in choices)
    parts, acc = [], 0.0
    for value, weight in choices[:-1]:
        acc += weight / total
        parts.append(f"WHEN {u} < {acc!r} THEN '{value}'")
    return f"CASE {' '.join(parts)} ELSE '{choices[-1][0]}' END"


def _category(column: str) -> str:
    """SQL for the category of a product: unseeded, so a product keeps it across batches."""
    names = ", ".join(f"'{c}'" for c in CATEGORIES)
    return f"element_at(array({names}), 1 + CAST(pmod(xxhash64('category', {column}), {len(CATEGORIES)}) AS INT))"


def _list_price(column: str) -> str:
    """SQL for a product's list price, log-uniform 1.50 .. 1500.00 (unseeded, like category)."""
    u = f"(shiftrightunsigned(xxhash64('price', {column}), 11) / 9007199254740992.0D)"
    return f"(1.5D * pow(1000.0D, {u}))"


def _draws(df: DataFrame, seed: int, carry: Sequence[str] = ()) -> DataFrame:
    """Add one independent uniform draw per purpose (`u_<name>`) to rows with an `id`."""
    draws = [f"{_uniform(seed, salt, 'id')} AS u_{name}" for salt, name in enumerate(_DRAWS, 1)]
    return df.selectExpr("id", *carry, *draws)


def _clean(df: DataFrame, shape: _Shape, carry: Sequence[str] = ()) -> DataFrame:
    """Turn draws into the work columns of a clean order (see `_WORK_COLUMNS`)."""
    lag = (
        "CASE status "
        "WHEN 'placed' THEN 60 + CAST(floor(u_lag * 6 * 3600) AS BIGINT) "
        f"WHEN 'shipped' THEN CAST(floor((1 + 2 * u_lag) * {_DAY}) AS BIGINT) "
        f"WHEN 'delivered' THEN CAST(floor((3 + 7 * u_lag) * {_DAY}) AS BIGINT) "
        f"WHEN 'returned' THEN CAST(floor((10 + 30 * u_lag) * {_DAY}) AS BIGINT) "
        f"ELSE 600 + CAST(floor(2 * u_lag * {_DAY}) AS BIGINT) END"
    )
    first = df.selectExpr(
        "id",
        *carry,
        f"CAST({shape.id_offset} + id AS BIGINT) AS order_id",
        # Squaring a uniform gives a power law: customer/product 1 gets ~1/sqrt(n) of all orders.
        f"CAST(1 + floor({shape.n_customers} * u_customer * u_customer) AS BIGINT) AS customer_id",
        f"CAST(1 + floor({shape.n_products} * u_product * u_product) AS BIGINT) AS product_id",
        f"{_weighted('u_region', REGIONS)} AS region",
        f"CAST({shape.ts_start} + floor(u_ts * {shape.ts_span}) AS BIGINT) AS ts_s",
        f"{_weighted('u_status', shape.status_weights)} AS status",
        # Mostly 1-3 items, a long tail up to 31.
        "CAST(1 + floor(pow(u_quantity, 6) * 31) AS INT) AS quantity",
        "u_price",
        # 70% pay list price; the rest get 5%-50% off with three decimals (rounding cases).
        "CAST(CASE WHEN u_promo < 0.7 THEN 0 ELSE round(0.05D + 0.45D * u_discount, 3) END "
        "AS DECIMAL(4,3)) AS discount",
        "u_lag",
        "u_variant",
    )
    return first.selectExpr(
        "id",
        *carry,
        "order_id",
        "customer_id",
        "product_id",
        "region",
        "ts_s",
        "status",
        "quantity",
        # A product's price varies +-5% around its list price (promotions, currency).
        f"CAST(round({_list_price('product_id')} * (0.95D + 0.1D * u_price), 2) AS DECIMAL(10,2))"
        " AS unit_price",
        "discount",
        f"ts_s + ({lag}) AS updated_s",
        "false AS null_category",
        "u_variant",
    )


def _override(
    df: DataFrame, kind_column: str, kinds: Sequence[tuple[str, dict[str, str]]]
) -> DataFrame:
    """Replace work columns per row kind (`kind_column` indexes `kinds`; -1 = unchanged)."""
    exprs = []
    for column in _WORK_COLUMNS:
        whens = [
            f"WHEN {i} THEN {overrides[column]}"
            for i, (_, overrides) in enumerate(kinds)
            if column in overrides
        ]
        exprs.append(
            f"CASE {kind_column} {' '.join(whens)} ELSE {column} END AS {column}"
            if whens
            else column
        )
    return df.selectExpr(*exprs)


def _finish(df: DataFrame) -> DataFrame:
    """Work columns -> the source table's exact columns and types."""
    return df.selectExpr(
        "CAST(order_id AS BIGINT) AS order_id",
        "CAST(customer_id AS BIGINT) AS customer_id",
        "CAST(product_id AS BIGINT) AS product_id",
        # Derived last, so duplicates with another product_id keep "one category per product".
        f"CAST(CASE WHEN null_category THEN NULL ELSE {_category('product_id')} END AS STRING)"
        " AS category",
        "CAST(region AS STRING) AS region",
        "timestamp_seconds(ts_s) AS order_ts",
        "CAST(quantity AS INT) AS quantity",
        "CAST(unit_price AS DECIMAL(10,2)) AS unit_price",
        "CAST(discount AS DECIMAL(4,3)) AS discount",
        "CAST(status AS STRING) AS status",
        "timestamp_seconds(updated_s) AS updated_at",
    )


def _orders(spark: SparkSession, rows: int, *, seed: int, dirty: bool) -> DataFrame:
    """The whole source table as one lazy DataFrame of exactly `rows` rows."""
    n_customers = max(10, rows // 20)
    n_products = max(20, min(20_000, rows // 200))
    shape = _Shape(
        seed=seed,
        id_offset=1,
        n_customers=n_customers,
        n_products=n_products,
        ts_start=_T0,
        ts_span=_TWO_YEARS,
        status_weights=BASE_STATUS_WEIGHTS,
    )
    n_dup = max(2 * len(DUPLICATE_KINDS), rows // 500) if dirty else 0
    n_base = rows - n_dup
    # ~1M rows per partition: one task per core on small tables, bounded task size on big ones.
    partitions = max(1, math.ceil(n_base / 1_000_000))
    if not dirty:
        return _finish(_clean(_draws(spark.range(0, n_base, 1, partitions), seed), shape))

    pool = (*REJECTED_KINDS, *ODD_VALID_KINDS)
    base_kinds = (*pool, _PARTNER_NULL_UPDATED)
    guaranteed = len(pool)
    # Duplicates pair with clean base rows spread evenly over the ids after the guaranteed ones.
    stride = (n_base - guaranteed) // n_dup
    is_partner = (
        f"(id >= {guaranteed} AND pmod(id - {guaranteed}, {stride}) = 0 "
        f"AND id < {guaranteed} + {n_dup} * {stride})"
    )
    partner_kind = f"pmod(div(id - {guaranteed}, {stride}), {len(DUPLICATE_KINDS)})"
    base = _draws(spark.range(0, n_base, 1, partitions), seed)
    base = base.selectExpr(
        "*",
        # The first rows get one kind each, so even a tiny table has every kind.
        f"CAST(CASE WHEN id < {guaranteed} THEN id "
        f"WHEN {is_partner} THEN CASE WHEN {partner_kind} = {_BOTH_NULL_KIND} "
        f"THEN {len(pool)} ELSE -1 END "
        f"WHEN u_dirty < {_DIRTY_RATE} THEN floor(u_kind * {len(pool)}) "
        "ELSE -1 END AS INT) AS dirty_kind",
    )
    base = _override(_clean(base, shape, carry=["dirty_kind"]), "dirty_kind", base_kinds)

    # Regenerating the partner's id reproduces its columns exactly, without a join.
    extra = spark.range(0, n_dup, 1, 1).selectExpr(
        f"{guaranteed} + id * {stride} AS id",
        f"CAST(pmod(id, {len(DUPLICATE_KINDS)}) AS INT) AS dup_kind",
    )
    extra = _clean(_draws(extra, seed, carry=["dup_kind"]), shape, carry=["dup_kind"])
    extra = _override(extra, "dup_kind", DUPLICATE_KINDS)
    return _finish(base).unionByName(_finish(extra))


def _check_rows(rows: int, dirty: bool) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"rows must be a positive integer, got {rows!r}")
    if dirty and rows < _MIN_DIRTY_ROWS:
        raise ConfigError(
            f"dirty=True needs rows >= {_MIN_DIRTY_ROWS} to hold every kind of dirty row, "
            f"got {rows}"
        )


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


def _latest_commit(spark: SparkSession, ref: TableRef) -> tuple[int, dict[str, str]]:
    """The latest Delta version of a table and its operation metrics."""
    row = spark.sql(f"DESCRIBE HISTORY {ref.sql} LIMIT 1").collect()[0]
    return int(row["version"]), dict(row["operationMetrics"] or {})


def table_exists(spark: SparkSession, ref: TableRef) -> bool:
    """Whether a table (or a Delta table at a path) exists."""
    try:
        return bool(spark.catalog.tableExists(ref.sql))
    except Exception as exc:
        # A path without a Delta log is reported as an error, not as False; files of another
        # format there are someone's data all the same.
        if ref.path is not None and _MISSING_DELTA in str(exc):
            return _has_files(spark, ref.path)
        raise


def _has_files(spark: SparkSession, path: str) -> bool:
    """Whether anything is stored under `path` (read by the engine, which may be remote)."""
    try:
        files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(path)
        return bool(files.select("path").limit(1).collect())
    except Exception as exc:
        if "PATH_NOT_FOUND" in str(exc):
            return False
        raise


def is_demo_table(spark: SparkSession, ref: TableRef) -> bool:
    """Whether an existing table carries the demo mark (`nbpipeline.demo = true`)."""
    try:
        detail = spark.sql(f"DESCRIBE DETAIL {ref.sql}").collect()[0]
    except Exception as exc:
        if ref.path is not None and _MISSING_DELTA in str(exc):
            return False  # files, but no Delta table: not ours
        raise
    properties = detail["properties"] or {}
    return str(properties.get(DEMO_PROPERTY, "")).strip().lower() == "true"


def check_demo_table(spark: SparkSession, ref: TableRef, *, action: str, replace: bool) -> bool:
    """Refuse to `action` an existing table nbpipeline did not create; True if the table exists.

    A table without the demo mark belongs to the user: a ConfigError naming it and the override
    is raised before anything is written, unless `replace` is set.
    """
    if not table_exists(spark, ref):
        return False
    if replace or is_demo_table(spark, ref):
        return True
    raise ConfigError(
        f"refusing to {action} {ref.sql}: it exists and was not created by nbpipeline seed "
        f"(no {DEMO_PROPERTY} table property); {REPLACE_OPTION} overrides this",
        hint=f"use another --table for demo data, or pass {REPLACE_OPTION} if {ref.sql} may be "
        "overwritten with synthetic rows",
    )


def _write(spark: SparkSession, df: DataFrame, ref: TableRef) -> None:
    """Create or replace the table with `df`, marked as demo data, in one Delta commit."""
    view = f"nbpipeline_seed_{uuid.uuid4().hex[:12]}"
    df.createOrReplaceTempView(view)
    try:
        spark.sql(
            f"CREATE OR REPLACE TABLE {ref.sql} USING DELTA "
            f"TBLPROPERTIES ('{DEMO_PROPERTY}' = 'true') AS SELECT * FROM {view}"
        )
    finally:
        spark.catalog.dropTempView(view)


def seed_orders(
    spark: SparkSession,
    table: str,
    *,
    rows: int,
    seed: int = 42,
    dirty: bool = False,
    progress: Progress | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """(Re)create the demo source table `table` with `rows` deterministic synthetic orders.

    `table` is `[catalog.]schema.table` (the schema is created if missing) or ``delta.`/path` ``.
    A table this function created (marked `nbpipeline.demo = true`) is overwritten; any other
    existing table is refused with a ConfigError unless `replace` is set. Customers and products follow a power law (a few have many
    orders), each product has one category, regions are a handful of values, order_ts spans
    2023-2024 (UTC), statuses and discounts have realistic weights and some orders exceed
    1000.00 net. With `dirty=True` the table also holds rows of every kind the data contract
    rejects, duplicate order_ids covering each tie-break rule, and valid rows with NULL
    category, region or updated_at (see `DIRTY_KINDS`); `rows` then counts them too and must be
    at least 200.

    Returns {"table", "rows", "version", "seconds"}.
    """
    ref = parse_table(table)
    _check_rows(rows, dirty)
    _check_seed(seed)
    started = time.monotonic()
    check_demo_table(spark, ref, action="overwrite", replace=replace)
    if progress:
        progress(f"Seeding {rows:,} {'dirty ' if dirty else ''}orders into {ref.sql} ...")
    if ref.schema_sql is not None:
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {ref.schema_sql}")
    _write(spark, _orders(spark, rows, seed=seed, dirty=dirty), ref)
    version, _ = _latest_commit(spark, ref)
    seconds = round(time.monotonic() - started, 3)
    if progress:
        progress(f"Seeded {ref.sql} (version {version}) in {seconds:.1f}s")
    return {"table": ref.sql, "rows": rows, "version": version, "seconds": seconds}


def _changed_rows_sql(source: str, *, fraction: float, seed: int) -> str:
    """SQL for the updated versions of a deterministic `fraction` of the orders in `source`."""

    def u(salt: int) -> str:
        return _uniform(seed, salt, "order_id")

    fix_price = "CAST(0.9 + 0.2 * u_amount AS DECIMAL(5,4))"
    new_discount = (
        "CAST(CASE WHEN u_amount < 0.4 THEN 0 ELSE round(0.05D + 0.45D * u_amount, 3) END "
        "AS DECIMAL(4,3))"
    )
    return f"""
WITH picked AS (
  SELECT * FROM {source}
  WHERE order_id IS NOT NULL AND {u(101)} < {fraction!r}
),
latest AS (
  -- One change per order_id (MERGE allows one source row per key); for duplicated ids the
  -- greatest row by the contract's ordering is the base, deterministically.
  SELECT order_id,
         max(struct(updated_at, status, quantity, unit_price, discount, customer_id,
                    product_id, order_ts, category, region)) AS r
  FROM picked GROUP BY order_id
),
drawn AS (
  SELECT order_id, r.*, {u(102)} AS u_next, {u(103)} AS u_fix, {u(104)} AS u_what,
         {u(105)} AS u_amount, {u(106)} AS u_lag
  FROM latest
),
moved AS (
  SELECT *,
    CASE
      WHEN status = 'placed' THEN CASE WHEN u_next < 0.8 THEN 'shipped' ELSE 'cancelled' END
      WHEN status = 'shipped' THEN CASE WHEN u_next < 0.9 THEN 'delivered' ELSE 'returned' END
      WHEN status = 'delivered' THEN CASE WHEN u_next < 0.3 THEN 'returned' ELSE status END
      ELSE status
    END AS new_status
  FROM drawn
),
fixed AS (
  -- Orders whose status cannot move get a correction; some moved ones get one as well.
  SELECT *, (new_status <=> status) OR u_fix < 0.2 AS is_fix FROM moved
)
SELECT
  order_id, customer_id, product_id, category, region, order_ts,
  CASE WHEN is_fix AND u_what < 0.34 THEN
    CASE WHEN quantity > 1 AND u_amount < 0.5 THEN quantity - 1 ELSE quantity + 1 END
  ELSE quantity END AS quantity,
  CASE WHEN is_fix AND u_what >= 0.34 AND u_what < 0.67 THEN
    CAST(round(unit_price * {fix_price}, 2) AS DECIMAL(10,2))
  ELSE unit_price END AS unit_price,
  CASE WHEN is_fix AND u_what >= 0.67 THEN {new_discount} ELSE discount END AS discount,
  new_status AS status,
  -- Always newer than the row it replaces (a NULL updated_at counts as oldest).
  timestamp_seconds(
    unix_seconds(coalesce(updated_at, order_ts, TIMESTAMP '2025-01-01 00:00:00'))
    + 3600 + CAST(floor(u_lag * 14 * {_DAY}) AS BIGINT)
  ) AS updated_at
FROM fixed
"""


def apply_changes(
    spark: SparkSession,
    table: str,
    *,
    fraction: float,
    seed: int = 7,
    progress: Progress | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """MERGE a deterministic upstream change batch into the demo source table `table`.

    Only a table `seed_orders` created (marked `nbpipeline.demo = true`) is changed; any other is
    refused with a ConfigError unless `replace` is set.

    About `fraction` of the existing orders change, each with a newer updated_at: status moves
    (placed -> shipped/cancelled, shipped -> delivered/returned, delivered -> returned) and
    corrections of quantity, unit_price or discount. About `fraction / 2` of the row count is
    added as new, recent orders with new order_ids. The same table and seed give the same batch.
    Duplicated order_ids are updated together (they then become identical rows).

    Returns {"table", "updated", "inserted", "version", "seconds"}; the counts are the MERGE's
    own metrics (target rows updated / inserted).
    """
    ref = parse_table(table)
    _check_seed(seed)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be a number in (0, 1], got {fraction!r}")
    fraction = float(fraction)
    started = time.monotonic()
    if not check_demo_table(spark, ref, action="change", replace=replace):
        raise ConfigError(
            f"{ref.sql} does not exist",
            hint=f"create a demo source first: nbpipeline seed --rows 10000 --table {ref.sql}",
        )
    if progress:
        progress(f"Applying a change batch ({fraction:.1%}) to {ref.sql} ...")

    stats = spark.sql(
        "SELECT count(*) AS n, max(order_id) AS max_id, max(customer_id) AS max_customer, "
        f"max(product_id) AS max_product, unix_seconds(max(order_ts)) AS max_ts FROM {ref.sql}"
    ).collect()[0]
    n = int(stats["n"])
    n_new = round(n * fraction / 2)
    # A few new customers appear; products stay those already sold.
    shape = _Shape(
        seed=seed + 1_000_003,
        id_offset=int(stats["max_id"] or 0) + 1,
        n_customers=max(10, math.ceil((stats["max_customer"] or 0) * 1.02) + 1),
        n_products=max(1, int(stats["max_product"] or 20)),
        ts_start=int(stats["max_ts"] if stats["max_ts"] is not None else _T0 + _TWO_YEARS) + 1,
        ts_span=3 * _DAY,
        status_weights=NEW_STATUS_WEIGHTS,
    )
    inserts = _finish(_clean(_draws(spark.range(0, n_new, 1, 1), shape.seed), shape))
    updates = spark.sql(_changed_rows_sql(ref.sql, fraction=fraction, seed=seed))
    batch = updates.unionByName(inserts)

    view = f"nbpipeline_changes_{uuid.uuid4().hex[:12]}"
    batch.createOrReplaceTempView(view)
    try:
        spark.sql(
            f"MERGE INTO {ref.sql} AS t USING {view} AS s ON t.order_id = s.order_id "
            "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
        ).collect()
    finally:
        spark.catalog.dropTempView(view)
    version, metrics = _latest_commit(spark, ref)
    seconds = round(time.monotonic() - started, 3)
    updated = int(metrics.get("numTargetRowsUpdated", 0))
    inserted = int(metrics.get("numTargetRowsInserted", 0))
    if progress:
        progress(
            f"Changed {ref.sql}: {updated:,} updated, {inserted:,} inserted "
            f"(version {version}) in {seconds:.1f}s"
        )
    return {
        "table": ref.sql,
        "updated": updated,
        "inserted": inserted,
        "version": version,
        "seconds": seconds,
    }
