"""A local runtime for Databricks source notebooks (see `nbpipeline.local.runtime.notebook`)."""

from nbpipeline.local.runtime.notebook import declared_widgets, parse_notebook, run_notebook

__all__ = ["declared_widgets", "parse_notebook", "run_notebook"]
