"""nbpipeline: Dagster assets that run Databricks notebooks on local Spark + Delta or Databricks."""

__version__ = "0.1.0"
