# Databricks notebook source
# DBTITLE 1,About this notebook
# MAGIC %md
# MAGIC # Parallel orchestration
# MAGIC
# MAGIC The original design's concurrent notebook workflow: runs Notebook1 to Notebook4 at the
# MAGIC same time from a thread pool with `dbutils.notebook.run`, each with a timeout, collects
# MAGIC their exit values and prints how long each took. A failing notebook does not stop the
# MAGIC others; the workflow fails at the end naming every notebook that failed. All four read the
# MAGIC same source version: `source_version`, or (empty) the latest version committed when this
# MAGIC workflow started.

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
dbutils.widgets.text("max_workers", "4", "Notebooks running at once")

# COMMAND ----------

# DBTITLE 1,The notebooks and their parameters
import datetime
import json
import time
from concurrent.futures import ThreadPoolExecutor

# Empty: this workflow's start time, so every notebook resolves the same version (the latest
# committed at or before it) whenever its thread starts.
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
max_workers = int(dbutils.widgets.get("max_workers"))

# COMMAND ----------

# DBTITLE 1,Run them at once
t0 = time.time()


def run_child(name, arguments):
    start = time.time()
    try:
        value = dbutils.notebook.run(f"./{name}", timeout, arguments)
        error = None
    except Exception as exc:  # reported below, after the other notebooks have finished
        value, error = None, str(exc).strip().splitlines()[0]
    end = time.time()
    return {
        "notebook": name,
        "start_offset_s": round(start - t0, 3),
        "duration_s": round(end - start, 3),
        "exit": json.loads(value) if value else None,
        "error": error,
    }


with ThreadPoolExecutor(max_workers=max_workers) as pool:
    results = list(pool.map(lambda child: run_child(*child), children))
wall = time.time() - t0
for r in results:
    outcome = "failed: " + r["error"] if r["error"] else "ok"
    print(
        f"{r['notebook']}: started at +{r['start_offset_s']:.1f}s, "
        f"took {r['duration_s']:.1f}s, {outcome}"
    )
print(f"wall time {wall:.1f}s, sum of notebooks {sum(r['duration_s'] for r in results):.1f}s")
failed = [r for r in results if r["error"]]
if failed:
    raise RuntimeError("; ".join(f"{r['notebook']} failed: {r['error']}" for r in failed))

# COMMAND ----------

# DBTITLE 1,Exit with every notebook's figures
dbutils.notebook.exit(
    json.dumps({"mode": "parallel", "wall_s": round(wall, 3), "notebooks": results})
)
