"""`nbpipeline bench`: the same notebook work in five modes, interleaved, on one source version.

Modes:
- `dagster-sequential` / `dagster-parallel`: the two Dagster jobs, through the Dagster instance
  (their runs appear in the UI, tagged `nbpipeline/bench`).
- `notebook-sequential` / `notebook-threads`: the original design's orchestration notebooks
  (`dbutils.notebook.run`, one after another or from a thread pool) on one shared session.
- `per-process-spark`: the parallel job with a local Spark JVM created inside each step process,
  the stock way to use PySpark from Dagster (a reference, not a product mode).

Every mode reads the same Delta path source (a classic in-process JVM cannot open the engine's
metastore) and MERGEs into the same outputs beside it. A warm-up run (not measured) writes the
outputs first, so every measured run does identical work: a full read and a MERGE that changes
nothing. Wall time is measured around each run; peak memory is the largest sum of the resident
set sizes of this process, its descendants (step processes, their JVMs) and, for modes that use
it, the engine JVM, sampled every 0.1 s.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import dagster as dg
import psutil

from nbpipeline import engine, settings
from nbpipeline.errors import ConfigError, NbPipelineError

MODES = (
    "dagster-sequential",
    "dagster-parallel",
    "notebook-sequential",
    "notebook-threads",
    "per-process-spark",
)
BENCH_TAG = "nbpipeline/bench"

# (numerator, denominator, comparison, target): the performance targets of issue 4.
TARGETS = (
    ("dagster-parallel", "notebook-threads", "<=", 1.15),
    ("dagster-sequential", "notebook-sequential", "<=", 1.10),
    ("dagster-parallel", "dagster-sequential", "<=", 0.90),
    ("per-process-spark", "dagster-parallel", ">=", 3.0),
)
PARALLEL_MEMORY_TARGET_MB = 3 * 1024


def per_process_parallel_job() -> dg.JobDefinition:
    """The parallel job with `PerProcessSparkBackend` bound instead of the shared engine: same
    assets, checks and executor; only the resource differs."""
    from nbpipeline.assets import ALL_ASSETS
    from nbpipeline.backends.classic import PerProcessSparkBackend
    from nbpipeline.checks import ALL_CHECKS
    from nbpipeline.jobs import PARALLEL_JOB, build_jobs
    from nbpipeline.resources import NOTEBOOK_BACKEND_KEY

    swapped = dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=build_jobs(),
        resources={NOTEBOOK_BACKEND_KEY: PerProcessSparkBackend()},
    )
    return swapped.resolve_job_def(PARALLEL_JOB)


class MemorySampler(threading.Thread):
    """Peak of the summed RSS of this process tree (plus extra pids' trees), sampled."""

    def __init__(self, extra_pids: list[int], interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.extra_pids = extra_pids
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._done = threading.Event()

    def _tree_rss(self) -> int:
        roots = [psutil.Process()]
        for pid in self.extra_pids:
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(pid))
        seen: set[int] = set()
        total = 0
        for root in roots:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                if proc.pid in seen:
                    continue
                seen.add(proc.pid)
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        return total

    def run(self) -> None:
        while not self._done.is_set():
            self.peak_bytes = max(self.peak_bytes, self._tree_rss())
            self._done.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
        self.peak_bytes = max(self.peak_bytes, self._tree_rss())


def _source_for_bench(spark: Any, rows: int, seed: int, progress: Callable[[str], None]) -> dict:
    """Seed the bench source once per (rows, seed); reuse it while it is unchanged."""
    from nbpipeline import seed as seeding
    from nbpipeline.identifiers import parse_table
    from nbpipeline.tables import table_info

    folder = settings.home() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    source = f"delta.`{folder / 'orders'}`"
    marker = folder / "source.json"
    wanted = {"rows": rows, "seed": seed}
    info = table_info(spark, parse_table(source))
    if marker.exists() and info["exists"]:
        saved = json.loads(marker.read_text())
        if {k: saved.get(k) for k in wanted} == wanted and saved.get("version") == info["version"]:
            progress(f"Reusing the bench source {source} ({rows} rows, version {info['version']})")
            return {"table": source, "version": info["version"]}
    progress(f"Seeding the bench source {source} with {rows} rows ...")
    result = seeding.seed_orders(spark, source, rows=rows, seed=seed, progress=progress)
    marker.write_text(json.dumps({**wanted, "version": result["version"]}))
    return {"table": source, "version": result["version"]}


def _run_dagster(
    job_fn: Callable[[], dg.JobDefinition], mode: str, source: str, tags: dict
) -> None:
    from nbpipeline.cli_pipeline import build_run_config, run_job_fn

    run_config = build_run_config(mode, source=source)
    result = run_job_fn(job_fn, run_config, tags=tags, out=lambda _m: None)
    if not result["success"]:
        raise NbPipelineError(f"bench run {result['run_id']} failed: {result['error']}")


def _run_orchestration(notebook: str, source: str) -> None:
    from nbpipeline.runtime import run_notebook

    spark = engine.get_spark()
    # The orchestration notebooks print their timings; keep stdout for the bench's own result.
    with contextlib.redirect_stdout(sys.stderr):
        run_notebook(settings.notebooks_dir() / notebook, {"source_table": source}, spark=spark)


def bench(
    *,
    rows: int,
    repeat: int,
    seed: int = 42,
    modes: tuple[str, ...] = MODES,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run every mode `repeat` times, interleaved; return figures per mode and the ratios."""
    from nbpipeline import definitions

    if rows < 1 or repeat < 1:
        raise ConfigError("bench needs --rows >= 1 and --repeat >= 1")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ConfigError(f"unknown bench mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    spark = engine.get_spark(progress=progress)  # starts (warms) the engine
    source = _source_for_bench(spark, rows, seed, progress)
    table = source["table"]
    engine_pid = engine.status().get("pid")
    tags = {BENCH_TAG: "1", "nbpipeline/source_version": str(source["version"])}
    runners: dict[str, Callable[[], None]] = {
        "dagster-sequential": lambda: _run_dagster(
            definitions.sequential_notebooks_job, "sequential", table, tags
        ),
        "dagster-parallel": lambda: _run_dagster(
            definitions.parallel_notebooks_job, "parallel", table, tags
        ),
        "notebook-sequential": lambda: _run_orchestration("SequentialOrchestration.py", table),
        "notebook-threads": lambda: _run_orchestration("ParallelOrchestration.py", table),
        "per-process-spark": lambda: _run_dagster(
            per_process_parallel_job, "parallel", table, {**tags, BENCH_TAG: "per-process"}
        ),
    }
    progress("Warm-up run (not measured): writes the outputs once so every measured run is alike")
    started = time.perf_counter()
    runners["notebook-sequential"]()
    progress(f"Warm-up took {time.perf_counter() - started:.1f}s")

    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    total = repeat * len(modes)
    done = 0
    for round_no in range(repeat):
        # Rotate the order each round so no mode always runs right after the same other one.
        order = list(modes[round_no % len(modes) :] + modes[: round_no % len(modes)])
        for mode in order:
            done += 1
            extra = [] if mode == "per-process-spark" or not engine_pid else [engine_pid]
            with MemorySampler(extra) as mem:
                t0 = time.perf_counter()
                runners[mode]()
                wall = time.perf_counter() - t0
            peak_mb = mem.peak_bytes / 2**20
            runs[mode].append({"wall_s": round(wall, 3), "peak_rss_mb": round(peak_mb, 1)})
            progress(
                f"[{done}/{total}] {mode:<20} round {round_no + 1}: {wall:7.2f}s, peak {peak_mb:7.0f} MB"
            )

    summary = {
        mode: {
            "median_s": round(statistics.median(r["wall_s"] for r in rs), 3),
            "min_s": round(min(r["wall_s"] for r in rs), 3),
            "max_s": round(max(r["wall_s"] for r in rs), 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
            "runs": rs,
        }
        for mode, rs in runs.items()
    }
    ratios = []
    for num, den, op, target in TARGETS:
        if num in summary and den in summary:
            value = summary[num]["median_s"] / summary[den]["median_s"]
            met = value <= target if op == "<=" else value >= target
            ratios.append(
                {
                    "ratio": f"{num} / {den}",
                    "value": round(value, 3),
                    "target": f"{op} {target}",
                    "met": met,
                }
            )
    if "dagster-parallel" in summary:
        peak = summary["dagster-parallel"]["peak_rss_mb"]
        ratios.append(
            {
                "ratio": "dagster-parallel peak memory (MB)",
                "value": peak,
                "target": f"<= {PARALLEL_MEMORY_TARGET_MB}",
                "met": peak <= PARALLEL_MEMORY_TARGET_MB,
            }
        )
    return {
        "rows": rows,
        "repeat": repeat,
        "source": table,
        "source_version": source["version"],
        "modes": summary,
        "targets": ratios,
    }


def format_table(result: dict[str, Any]) -> str:
    """The bench result as a plain-text table."""
    lines = [
        f"{result['rows']} rows, {result['repeat']} round(s), source version {result['source_version']}",
        f"{'mode':<20} {'median s':>9} {'min s':>8} {'max s':>8} {'peak MB':>8}",
    ]
    for mode, m in result["modes"].items():
        lines.append(
            f"{mode:<20} {m['median_s']:>9.2f} {m['min_s']:>8.2f} {m['max_s']:>8.2f} {m['peak_rss_mb']:>8.0f}"
        )
    lines.append("")
    for t in result["targets"]:
        lines.append(
            f"{t['ratio']:<45} {t['value']:>8} (target {t['target']}): {'met' if t['met'] else 'MISSED'}"
        )
    return "\n".join(lines)
