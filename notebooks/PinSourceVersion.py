# Databricks notebook source
# MAGIC %md
# MAGIC # Pin the source version
# MAGIC
# MAGIC First task of the `nbpipeline-comparison` job: resolves the Delta version of the source table
# MAGIC that both orchestrations will read (the `source_version` widget if given, else the newest) and
# MAGIC hands it to the next tasks as the task value `source_version`, so the sequential and the
# MAGIC parallel run of one comparison read the same data.

# COMMAND ----------

dbutils.widgets.text("source_table", "nbpipeline.orders", "Source table ([catalog.]schema.table or delta.`/path`)")
dbutils.widgets.text("source_version", "", "Delta version or ISO timestamp to pin (empty: the newest)")

# COMMAND ----------

# MAGIC %run ./_common

# COMMAND ----------

import json

source = parse_table_name(dbutils.widgets.get("source_table"))["sql"]
wanted = dbutils.widgets.get("source_version").strip()
history = spark.sql(f"DESCRIBE HISTORY {source}").select("version", "timestamp")
if not wanted:
    version = history.agg({"version": "max"}).first()[0]
elif wanted.isdigit():
    if history.filter(f"version = {int(wanted)}").count() == 0:
        raise NotebookInputError(f"source {source} has no Delta version {wanted}")
    version = int(wanted)
else:
    import datetime

    try:
        datetime.datetime.fromisoformat(wanted)
    except ValueError:
        raise NotebookInputError(f"invalid source_version {wanted!r}: expected a version number or an ISO timestamp") from None
    version = history.filter(f"timestamp <= timestamp'{wanted}'").agg({"version": "max"}).first()[0]
    if version is None:
        raise NotebookInputError(f"source {source} has no version at or before {wanted}")
dbutils.jobs.taskValues.set(key="source_version", value=str(version))
print(f"pinned {source} at version {version}")

# COMMAND ----------

dbutils.notebook.exit(json.dumps({"notebook": "PinSourceVersion", "source_table": source, "source_version": int(version)}))
