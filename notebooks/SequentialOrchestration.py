# Databricks notebook source
# DBTITLE 1,About this notebook
# MAGIC %md
# MAGIC # Sequential orchestration
# MAGIC
# MAGIC The original design's sequential workflow: runs Notebook1 to Notebook4 one after another
# MAGIC with `dbutils.notebook.run`, each with a timeout, collects their exit values and prints how
# MAGIC long each took. A failing notebook stops the workflow and is reported by name. All four
# MAGIC read the same source version: `source_version`, or (empty) the latest version committed
# MAGIC when this workflow started.

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
dbutils.widgets.text("timeout_seconds", "3600", "Timeout per notebook, in seconds")

# COMMAND ----------

# DBTITLE 1,The notebooks and their parameters
import datetime
import json
import time

# Empty: this workflow's start time, so every notebook resolves the same version (the latest
# committed at or before it) however long the ones before it take.
source_version = dbutils.widgets.get("source_version").strip() or datetime.datetime.now(
    datetime.timezone.utc
).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
common = {
    "source_table": dbutils.widgets.get("source_table"),
    "target_schema": dbutils.widgets.get("target_schema"),
    "source_version": source_version,
}
children = [
    ("Notebook1", common),
    ("Notebook2", common),
    ("Notebook3", common),
    ("Notebook4", {**common, "high_value_threshold": dbutils.widgets.get("high_value_threshold")}),
]
timeout = int(dbutils.widgets.get("timeout_seconds"))

# COMMAND ----------

# DBTITLE 1,Run them one after another
t0 = time.time()
results = []
for name, arguments in children:
    start = time.time()
    try:
        value = dbutils.notebook.run(f"./{name}", timeout, arguments)
    except Exception as exc:
        raise RuntimeError(f"{name} failed: {str(exc).strip().splitlines()[0]}") from None
    end = time.time()
    results.append(
        {
            "notebook": name,
            "start_offset_s": round(start - t0, 3),
            "duration_s": round(end - start, 3),
            "exit": json.loads(value),
        }
    )
    print(f"{name}: started at +{start - t0:.1f}s, took {end - start:.1f}s")
wall = time.time() - t0
print(f"wall time {wall:.1f}s, sum of notebooks {sum(r['duration_s'] for r in results):.1f}s")

# COMMAND ----------

# DBTITLE 1,Exit with every notebook's figures
dbutils.notebook.exit(
    json.dumps({"mode": "sequential", "wall_s": round(wall, 3), "notebooks": results})
)
