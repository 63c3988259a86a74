"""A local runtime for Databricks source notebooks (see `nbpipeline.runtime.notebook`)."""

from nbpipeline.runtime.notebook import declared_widgets, parse_notebook, run_notebook

__all__ = ["declared_widgets", "parse_notebook", "run_notebook"]
