# Databricks notebook source
# MAGIC %md
# MAGIC # Notebook4: order facts and high-value orders
# MAGIC
# MAGIC Reads the `orders` source and MERGEs two tables: `order_facts`, one row per valid
# MAGIC deduplicated order (all statuses) with its derived amounts, and `high_value_orders`, the
# MAGIC revenue-bearing orders whose net amount is at least `high_value_threshold`. Exits with a JSON
# MAGIC summary of both.

# COMMAND ----------

dbutils.widgets.text("source_table", "nbpipeline.orders", "Source table ([catalog.]schema.table or delta.`/path`)")
dbutils.widgets.text("target_schema", "", "Output schema (empty: the source's schema)")
dbutils.widgets.text("high_value_threshold", "1000.00", "Net amount from which an order is high-value")

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

# Every parameter is checked before anything is written.
threshold = parse_threshold(dbutils.widgets.get("high_value_threshold"))
run = NotebookRun("Notebook4", dbutils.widgets.get("source_table"), dbutils.widgets.get("target_schema"))

# COMMAND ----------

facts = run.merge(
    "order_facts",
    columns=[
        ("order_id", "BIGINT"),
        ("customer_id", "BIGINT"),
        ("product_id", "BIGINT"),
        ("category", "STRING"),
        ("region", "STRING"),
        ("order_date", "DATE"),
        ("status", "STRING"),
        ("quantity", "INT"),
        ("gross_amount", "DECIMAL(18,2)"),
        ("net_amount", "DECIMAL(18,2)"),
        ("revenue_bearing", "BOOLEAN"),
    ],
    keys=["order_id"],
    select_sql=f"""
        SELECT order_id, customer_id, product_id, category, region, order_date, status, quantity,
               gross_amount, net_amount, revenue_bearing
        FROM {run.clean_view}
    """,
)

# COMMAND ----------

# high_value_orders is a filter of the order_facts version just committed (the same rows the clean
# view gives, since that MERGE synced them): reading it is a plain scan, where the clean view would
# deduplicate the whole source again.
run.merge(
    "high_value_orders",
    columns=[
        ("order_id", "BIGINT"),
        ("customer_id", "BIGINT"),
        ("region", "STRING"),
        ("order_date", "DATE"),
        ("net_amount", "DECIMAL(18,2)"),
    ],
    keys=["order_id"],
    select_sql=f"""
        SELECT order_id, customer_id, region, order_date, net_amount
        FROM {facts["table"]} VERSION AS OF {facts["delta_version"]}
        WHERE revenue_bearing AND net_amount >= CAST('{threshold:f}' AS DECIMAL(38,6))
    """,
)

# COMMAND ----------

dbutils.notebook.exit(run.finish())
