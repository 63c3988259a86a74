"""What the Databricks-native jobs are (names, layouts, compute kinds), apart from their settings:
the CLI builds its options from these without importing the Databricks SDK."""

from __future__ import annotations

from dataclasses import dataclass

TASK_GRAPH, ORCHESTRATION = "task-graph", "orchestration"
LAYOUTS = (TASK_GRAPH, ORCHESTRATION)


@dataclass(frozen=True)
class JobKind:
    """One deployable job: its name, layout and what kind of run it is for `compare`."""

    key: str
    name: str
    layout: str
    style: str  # sequential | parallel | comparison
    summary: str


JOB_KINDS: dict[str, JobKind] = {
    k.key: k
    for k in (
        JobKind(
            "sequential",
            "nbpipeline-sequential",
            TASK_GRAPH,
            "sequential",
            "Notebook1 -> Notebook4 as chained job tasks",
        ),
        JobKind(
            "parallel",
            "nbpipeline-parallel",
            TASK_GRAPH,
            "parallel",
            "Notebook1..4 as independent job tasks, all at once",
        ),
        JobKind(
            "orchestration-sequential",
            "nbpipeline-orchestration-sequential",
            ORCHESTRATION,
            "sequential",
            "one task running SequentialOrchestration (dbutils.notebook.run, one after another)",
        ),
        JobKind(
            "orchestration-parallel",
            "nbpipeline-orchestration-parallel",
            ORCHESTRATION,
            "parallel",
            "one task running ParallelOrchestration (dbutils.notebook.run from a thread pool)",
        ),
        JobKind(
            "comparison",
            "nbpipeline-comparison",
            ORCHESTRATION,
            "comparison",
            "pins the source version, then SequentialOrchestration, then ParallelOrchestration",
        ),
    )
}
JOB_KEYS = tuple(JOB_KINDS)
JOB_NAMES = {k: kind.name for k, kind in JOB_KINDS.items()}
COMPUTE_KINDS = ("serverless", "job-cluster", "existing:<cluster-id>")
# The node type a job cluster gets on each cloud unless --node-type-id says otherwise: general
# purpose, 4 cores, local disk for Spark's shuffle and Delta's caches.
DEFAULT_NODE_TYPES = {"aws": "i3.xlarge", "azure": "Standard_D4ds_v5", "gcp": "n2-standard-4"}
