# Databricks notebook source
# DBTITLE 1,About this notebook
# MAGIC %md
# MAGIC # Notebook2: customer summary
# MAGIC
# MAGIC Reads the `orders` source and MERGEs one row per customer with counted orders into
# MAGIC `customer_summary`: order count, first and last order time, lifetime value (net revenue of
# MAGIC revenue-bearing orders) and favourite category (greatest revenue-bearing net amount; ties go
# MAGIC to the alphabetically first; NULL without revenue-bearing orders). Exits with a JSON
# MAGIC summary.

# COMMAND ----------

# DBTITLE 1,Parameters
dbutils.widgets.text(
    "source_table", "nbpipeline.orders", "Source table ([catalog.]schema.table or delta.`/path`)"
)
dbutils.widgets.text("target_schema", "", "Output schema (empty: the source's schema)")
dbutils.widgets.text(
    "source_version", "", "Source version: empty (latest), a version or a UTC timestamp"
)

# COMMAND ----------

# DBTITLE 1,Shared code
# MAGIC %run ./_common

# COMMAND ----------

# DBTITLE 1,Pin and clean the source
run = NotebookRun(
    "Notebook2",
    dbutils.widgets.get("source_table"),
    dbutils.widgets.get("target_schema"),
    dbutils.widgets.get("source_version"),
)

# COMMAND ----------

# DBTITLE 1,MERGE customer_summary
# An order with a NULL category cannot make a category the favourite, so it is left out here.
run.merge(
    "customer_summary",
    columns=[
        ("customer_id", "BIGINT"),
        ("orders", "BIGINT"),
        ("first_order_ts", "TIMESTAMP"),
        ("last_order_ts", "TIMESTAMP"),
        ("lifetime_value", "DECIMAL(18,2)"),
        ("favourite_category", "STRING"),
    ],
    keys=["customer_id"],
    select_sql=f"""
        WITH counted AS (SELECT * FROM {run.clean_view} WHERE counted),
        per_category AS (
            SELECT customer_id, category, SUM(net_amount) AS net
            FROM counted WHERE revenue_bearing AND category IS NOT NULL
            GROUP BY customer_id, category
        ),
        favourite AS (
            SELECT customer_id, category FROM (
                SELECT customer_id, category,
                       ROW_NUMBER() OVER (PARTITION BY customer_id
                                          ORDER BY net DESC, category ASC) AS rn
                FROM per_category
            ) WHERE rn = 1
        ),
        totals AS (
            SELECT customer_id,
                   COUNT(*) AS orders,
                   MIN(order_ts) AS first_order_ts,
                   MAX(order_ts) AS last_order_ts,
                   CAST(COALESCE(SUM(CASE WHEN revenue_bearing THEN net_amount END), 0)
                       AS DECIMAL(18,2)) AS lifetime_value
            FROM counted GROUP BY customer_id
        )
        SELECT t.customer_id, t.orders, t.first_order_ts, t.last_order_ts, t.lifetime_value,
               f.category AS favourite_category
        FROM totals t LEFT JOIN favourite f ON t.customer_id = f.customer_id
    """,
    amounts=["lifetime_value"],
)

# COMMAND ----------

# DBTITLE 1,Exit with the run's figures
dbutils.notebook.exit(run.finish())
