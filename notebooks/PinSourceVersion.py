# Databricks notebook source
# DBTITLE 1,About this notebook
# MAGIC %md
# MAGIC # Pin the source version
# MAGIC
# MAGIC First task of the `nbpipeline-comparison` job: resolves the Delta version of the source
# MAGIC table that both orchestrations will read (the `source_version` widget if given, else the
# MAGIC newest) and hands it to the next tasks as the task value `source_version`, so the
# MAGIC sequential and the parallel run of one comparison read the same data.

# COMMAND ----------

# DBTITLE 1,Parameters
dbutils.widgets.text(
    "source_table", "nbpipeline.orders", "Source table ([catalog.]schema.table or delta.`/path`)"
)
dbutils.widgets.text(
    "source_version", "", "Source version: empty (latest), a version or a UTC timestamp"
)

# COMMAND ----------

# DBTITLE 1,Shared notebook code
# MAGIC %run ./_common

# COMMAND ----------

# DBTITLE 1,Resolve the version once and hand it on
import json

source = parse_table_name(dbutils.widgets.get("source_table"))["sql"]
version = resolve_source_version(
    source, parse_source_version(dbutils.widgets.get("source_version"))
)
if version is None:
    raise NotebookInputError(f"source table {source} has no Delta history to pin a version of")
dbutils.jobs.taskValues.set(key="source_version", value=str(version))
print(f"pinned {source} at version {version}")

# COMMAND ----------

# DBTITLE 1,Exit value
dbutils.notebook.exit(
    json.dumps({"notebook": "PinSourceVersion", "source_table": source, "source_version": version})
)
