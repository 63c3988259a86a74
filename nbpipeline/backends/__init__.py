"""Backends that run a notebook: the embedded local engine, or a Databricks workspace."""
