# Databricks notebook source
# DBTITLE 1,About this notebook
# MAGIC %md
# MAGIC # Notebook3: product performance
# MAGIC
# MAGIC Reads the `orders` source and MERGEs one row per product with counted orders into
# MAGIC `product_performance`: category, orders, units sold and net revenue of revenue-bearing
# MAGIC orders, and the return rate (returned / counted orders, rounded half-up to 4 decimals).
# MAGIC Exits with a JSON summary.

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
    "Notebook3",
    dbutils.widgets.get("source_table"),
    dbutils.widgets.get("target_schema"),
    dbutils.widgets.get("source_version"),
)

# COMMAND ----------

# DBTITLE 1,MERGE product_performance
# return_rate is rounded half-up in exact integer arithmetic: floor((2 * 10^4 * r + c) / 2c) / 10^4.
# Decimal division would round once at its own scale first and could round twice.
run.merge(
    "product_performance",
    columns=[
        ("product_id", "BIGINT"),
        ("category", "STRING"),
        ("orders", "BIGINT"),
        ("units_sold", "BIGINT"),
        ("net_revenue", "DECIMAL(18,2)"),
        ("return_rate", "DOUBLE"),
    ],
    keys=["product_id"],
    select_sql=f"""
        SELECT product_id,
               MIN(category) AS category,
               COUNT(*) AS orders,
               CAST(COALESCE(SUM(CASE WHEN revenue_bearing THEN quantity END), 0) AS BIGINT)
                   AS units_sold,
               CAST(COALESCE(SUM(CASE WHEN revenue_bearing THEN net_amount END), 0)
                   AS DECIMAL(18,2)) AS net_revenue,
               CAST((COUNT_IF(status = 'returned') * 20000 + COUNT(*)) DIV (2 * COUNT(*))
                   AS DOUBLE) / 10000 AS return_rate
        FROM {run.clean_view}
        WHERE counted
        GROUP BY product_id
    """,
    amounts=["units_sold", "net_revenue"],
)

# COMMAND ----------

# DBTITLE 1,Exit with the run's figures
dbutils.notebook.exit(run.finish())
