# Databricks notebook source
# DBTITLE 1,About this notebook
# MAGIC %md
# MAGIC # Notebook4: order facts and high-value orders
# MAGIC
# MAGIC Reads the `orders` source and MERGEs two tables: `order_facts`, one row per valid
# MAGIC deduplicated order (all statuses) with its derived amounts, and `high_value_orders`, the
# MAGIC revenue-bearing orders whose net amount is at least `high_value_threshold`. Exits with a
# MAGIC JSON summary of both.

# COMMAND ----------

# DBTITLE 1,Parameters
dbutils.widgets.text(
    "source_table", "nbpipeline.orders", "Source table ([catalog.]schema.table or delta.`/path`)"
)
dbutils.widgets.text("target_schema", "", "Output schema (empty: the source's schema)")
dbutils.widgets.text(
    "high_value_threshold", "1000.00", "Net amount from which an order is high-value"
)
dbutils.widgets.text(
    "source_version", "", "Source version: empty (latest), a version or a UTC timestamp"
)

# COMMAND ----------

# DBTITLE 1,Shared code
# MAGIC %run ./_common

# COMMAND ----------

# DBTITLE 1,Pin and clean the source
# Every parameter is checked before anything is written.
threshold = parse_threshold(dbutils.widgets.get("high_value_threshold"))
run = NotebookRun(
    "Notebook4",
    dbutils.widgets.get("source_table"),
    dbutils.widgets.get("target_schema"),
    dbutils.widgets.get("source_version"),
    # Both MERGEs below read the cleaned rows: derived once and kept for the run.
    reuse=True,
    # order_facts' row count is checked against a count of the source by the check's own rule.
    recount=True,
)

# COMMAND ----------

# DBTITLE 1,MERGE order_facts
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
    amounts=["gross_amount", "net_amount"],
)
facts_sql = f"{facts['table']} VERSION AS OF {facts['delta_version']}"
facts_described = f"{facts['table']} version {facts['delta_version']}"
# Recounted from the pinned source with the contract's rule, apart from the MERGE's own query.
run.add_check(
    facts,
    "row_count_matches_source",
    lambda: check_matches_source(
        facts_described,
        run.valid_orders,
        run.source_described,
        {"rows": facts["row_count"]},
    ),
)

# COMMAND ----------

# DBTITLE 1,MERGE high_value_orders
# high_value_orders filters the very rows this run MERGEd into order_facts (that MERGE's
# source), not whatever order_facts holds now: another writer cannot slip rows in between.
high = run.merge(
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
        FROM {facts["view"]}
        WHERE revenue_bearing AND net_amount >= CAST('{threshold:f}' AS DECIMAL(38,6))
    """,
    amounts=["net_amount"],
)
run.add_check(
    high,
    "subset_of_order_facts",
    lambda: check_subset(
        f"{high['table']} VERSION AS OF {high['delta_version']}",
        f"{high['table']} version {high['delta_version']}",
        facts_sql,
        facts_described,
    ),
)

# COMMAND ----------

# DBTITLE 1,Exit with the run's figures
dbutils.notebook.exit(run.finish())
