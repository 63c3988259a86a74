# Databricks notebook source
# DBTITLE 1,About this notebook
# MAGIC %md
# MAGIC # Notebook1: daily sales
# MAGIC
# MAGIC Reads the `orders` source and MERGEs one row per (order_date, region) with counted orders
# MAGIC into `daily_sales`: orders, returned orders, and units / gross / net revenue of revenue-
# MAGIC bearing orders. Exits with a JSON summary of what it read and wrote.

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
    "Notebook1",
    dbutils.widgets.get("source_table"),
    dbutils.widgets.get("target_schema"),
    dbutils.widgets.get("source_version"),
)

# COMMAND ----------

# DBTITLE 1,MERGE daily_sales
run.merge(
    "daily_sales",
    columns=[
        ("order_date", "DATE"),
        ("region", "STRING"),
        ("orders", "BIGINT"),
        ("returned_orders", "BIGINT"),
        ("units", "BIGINT"),
        ("gross_revenue", "DECIMAL(18,2)"),
        ("net_revenue", "DECIMAL(18,2)"),
    ],
    keys=["order_date", "region"],
    select_sql=f"""
        SELECT order_date, region,
               COUNT(*) AS orders,
               CAST(COUNT_IF(status = 'returned') AS BIGINT) AS returned_orders,
               CAST(COALESCE(SUM(CASE WHEN revenue_bearing THEN quantity END), 0) AS BIGINT)
                   AS units,
               CAST(COALESCE(SUM(CASE WHEN revenue_bearing THEN gross_amount END), 0)
                   AS DECIMAL(18,2)) AS gross_revenue,
               CAST(COALESCE(SUM(CASE WHEN revenue_bearing THEN net_amount END), 0)
                   AS DECIMAL(18,2)) AS net_revenue
        FROM {run.clean_view}
        WHERE counted
        GROUP BY order_date, region
    """,
    amounts=["units", "gross_revenue", "net_revenue"],
)

# COMMAND ----------

# DBTITLE 1,Exit with the run's figures
dbutils.notebook.exit(run.finish())
