"""`demo_source`: synthetic demo data from the UI, outside the pipeline's assets.

The same tool as `nbpipeline seed`, as an op job (no asset, so "Materialize all" never runs it):
create a demo source, or apply an upstream-like change batch to one, for trying the pipeline
and the source-version sensor. Like the CLI it only touches tables it created (the
`nbpipeline.demo` mark); there is no override here, since the CLI's `--replace` is the one
deliberate way to overwrite a table nbpipeline did not create.

No `from __future__ import annotations`: Dagster reads the op's config and resource annotations
as objects.
"""

from typing import Literal

import dagster as dg
from pydantic import Field

from nbpipeline import settings
from nbpipeline.backend import NotebookBackend
from nbpipeline.defs.tags import DEMO_JOB
from nbpipeline.errors import ConfigError


class DemoSourceConfig(dg.Config):
    """Create a demo source table, or change one (only tables nbpipeline seed created)."""

    table: str = Field(
        default=settings.DEFAULT_SOURCE_TABLE,
        description="Demo table: [catalog.]schema.table or delta.`/absolute/path`.",
    )
    mode: Literal["changes", "seed"] = Field(
        default="changes",
        description="changes: MERGE an upstream-like change batch; seed: (re)create the table.",
    )
    rows: int = Field(default=10_000, description="seed: number of orders to generate.")
    seed: int = Field(default=42, description="Random seed (same seed, same data).")
    dirty: bool = Field(
        default=False, description="seed: add rejected rows and duplicate order_ids (rows >= 200)."
    )
    fraction: float = Field(
        default=0.05, description="changes: fraction of the orders to change, in (0, 1]."
    )


@dg.op(name="demo_source_data", description="Seeds or changes a demo source table.")
def demo_source_data(
    context: dg.OpExecutionContext, config: DemoSourceConfig, notebook_backend: NotebookBackend
) -> None:
    from nbpipeline.defs.resources import spark_session
    from nbpipeline.local import seed

    try:
        spark = spark_session(notebook_backend)
        if config.mode == "seed":
            result = seed.seed_orders(
                spark,
                config.table,
                rows=config.rows,
                seed=config.seed,
                dirty=config.dirty,
                progress=context.log.info,
            )
        else:
            result = seed.apply_changes(
                spark,
                config.table,
                fraction=config.fraction,
                seed=config.seed,
                progress=context.log.info,
            )
    except ConfigError as exc:
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        raise dg.Failure(
            description=f"demo_source: {exc.message}{hint}", allow_retries=False
        ) from None
    context.log.info(f"{result['table']} is now at version {result['version']}")


@dg.job(
    name=DEMO_JOB,
    description=(
        "Demo data: creates a synthetic source table or applies a change batch to one. Refuses "
        "any table nbpipeline seed did not create."
    ),
)
def demo_source() -> None:
    demo_source_data()
