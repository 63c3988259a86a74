"""The bench's floor (`reference` mode): the five outputs in one Spark session, the least work.

One read of the source, cleaned and deduplicated once and cached, then the five outputs
derived from that cache and written with plain Delta overwrites: no MERGE, no per-notebook
re-read, no orchestration. The rules are the data contract's (docs: DATA_CONTRACT.md), written
here independently of the notebooks, and the bench tests check both give the same rows. It
writes only into its own folder beside the bench source, never the pipeline's outputs.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

VALID_STATUSES = ("placed", "shipped", "delivered", "returned", "cancelled")
REVENUE_STATUSES = ("placed", "shipped", "delivered")

_CLEAN = """
SELECT order_id, customer_id, product_id, category, region, order_ts,
       CAST(order_ts AS DATE) AS order_date, status, quantity, gross_amount,
       CAST(ROUND(gross_amount * (1 - discount), 2) AS DECIMAL(18,2)) AS net_amount,
       status IN ({revenue}) AS revenue_bearing
FROM (
    SELECT *, CAST(quantity * unit_price AS DECIMAL(18,2)) AS gross_amount,
           ROW_NUMBER() OVER (
               PARTITION BY order_id
               ORDER BY updated_at DESC NULLS LAST, status DESC, quantity DESC, unit_price DESC,
                        discount DESC, customer_id DESC, product_id DESC, order_ts DESC,
                        category DESC NULLS LAST, region DESC NULLS LAST) AS _rn
    FROM (
        SELECT CAST(order_id AS BIGINT) AS order_id, CAST(customer_id AS BIGINT) AS customer_id,
               CAST(product_id AS BIGINT) AS product_id, CAST(category AS STRING) AS category,
               CAST(region AS STRING) AS region, CAST(order_ts AS TIMESTAMP) AS order_ts,
               CAST(quantity AS INT) AS quantity, CAST(unit_price AS DECIMAL(10,2)) AS unit_price,
               CAST(discount AS DECIMAL(4,3)) AS discount, CAST(status AS STRING) AS status,
               CAST(updated_at AS TIMESTAMP) AS updated_at
        FROM {source}
    )
    WHERE order_id IS NOT NULL AND customer_id IS NOT NULL AND product_id IS NOT NULL
      AND order_ts IS NOT NULL AND status IN ({statuses})
      AND quantity >= 1 AND unit_price >= 0 AND discount >= 0 AND discount < 1
) WHERE _rn = 1
"""

#: Output name -> SELECT over the cached clean view `{clean}`.
OUTPUTS: dict[str, str] = {
    "daily_sales": """
        SELECT order_date, region, COUNT(*) AS orders,
               CAST(COUNT_IF(status = 'returned') AS BIGINT) AS returned_orders,
               CAST(COALESCE(SUM(IF(revenue_bearing, quantity, NULL)), 0) AS BIGINT) AS units,
               CAST(COALESCE(SUM(IF(revenue_bearing, gross_amount, NULL)), 0) AS DECIMAL(18,2))
                   AS gross_revenue,
               CAST(COALESCE(SUM(IF(revenue_bearing, net_amount, NULL)), 0) AS DECIMAL(18,2))
                   AS net_revenue
        FROM {clean} WHERE status <> 'cancelled' GROUP BY order_date, region
    """,
    "customer_summary": """
        WITH counted AS (SELECT * FROM {clean} WHERE status <> 'cancelled'),
        favourite AS (
            SELECT customer_id, MIN_BY(category, STRUCT(-net, category)) AS category FROM (
                SELECT customer_id, category, SUM(net_amount) AS net FROM counted
                WHERE revenue_bearing AND category IS NOT NULL GROUP BY customer_id, category
            ) GROUP BY customer_id
        )
        SELECT t.*, f.category AS favourite_category FROM (
            SELECT customer_id, COUNT(*) AS orders, MIN(order_ts) AS first_order_ts,
                   MAX(order_ts) AS last_order_ts,
                   CAST(COALESCE(SUM(IF(revenue_bearing, net_amount, NULL)), 0) AS DECIMAL(18,2))
                       AS lifetime_value
            FROM counted GROUP BY customer_id
        ) t LEFT JOIN favourite f ON t.customer_id = f.customer_id
    """,
    "product_performance": """
        SELECT product_id, MIN(category) AS category, COUNT(*) AS orders,
               CAST(COALESCE(SUM(IF(revenue_bearing, quantity, NULL)), 0) AS BIGINT) AS units_sold,
               CAST(COALESCE(SUM(IF(revenue_bearing, net_amount, NULL)), 0) AS DECIMAL(18,2))
                   AS net_revenue,
               CAST((COUNT_IF(status = 'returned') * 20000 + COUNT(*)) DIV (2 * COUNT(*))
                   AS DOUBLE) / 10000 AS return_rate
        FROM {clean} WHERE status <> 'cancelled' GROUP BY product_id
    """,
    "order_facts": """
        SELECT order_id, customer_id, product_id, category, region, order_date, status,
               quantity, gross_amount, net_amount, revenue_bearing
        FROM {clean}
    """,
    "high_value_orders": """
        SELECT order_id, customer_id, region, order_date, net_amount FROM {clean}
        WHERE revenue_bearing AND net_amount >= CAST('{threshold}' AS DECIMAL(38,6))
    """,
}


def compute(
    spark: Any, source: str, folder: Path, threshold: Decimal = Decimal("1000.00")
) -> dict[str, str]:
    """Write the five outputs of `source` (a table name or delta.`/path`) under `folder` as
    Delta tables, overwriting; return output name -> delta.`path`."""
    spark.conf.set("spark.sql.session.timeZone", "UTC")  # the contract's dates are UTC dates
    quoted = ", ".join(f"'{s}'" for s in VALID_STATUSES)
    revenue = ", ".join(f"'{s}'" for s in REVENUE_STATUSES)
    clean = spark.sql(_CLEAN.format(source=source, statuses=quoted, revenue=revenue)).persist()
    view = "nbp_reference_clean"
    try:
        clean.createOrReplaceTempView(view)
        out = {}
        for name, sql in OUTPUTS.items():
            path = folder / name
            df = spark.sql(sql.format(clean=view, threshold=f"{threshold:f}"))
            df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(
                str(path)
            )
            out[name] = f"delta.`{path}`"
        return out
    finally:
        spark.catalog.dropTempView(view)
        clean.unpersist()
