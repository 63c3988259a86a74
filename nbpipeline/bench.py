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
nothing.

Like is compared with like: the Dagster modes run the jobs' four notebook steps (an op
selection of the same jobs, so the runs still show up under their job in the UI), not the
asset-check steps, because the orchestration notebooks check nothing. `--with-checks` runs the
check steps too; `nbpipeline compare` times them on any real pair of runs.

Wall time is measured around each run. Memory is sampled every 0.1 s over this process, its
descendants (run worker, step processes, their JVMs) and, for modes that use it, the engine
JVM: the peak of the summed resident set sizes (RSS, which counts pages that forked step
processes share with their fork server once per process) and the peak of the summed
proportional set sizes (PSS, which splits each shared page between its sharers, so the sum is
the memory the tree really holds). The memory target is checked on PSS.
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
#: The Dagster modes run these steps of the jobs (the notebooks, not the check steps).
NOTEBOOK_STEPS = ["Notebook1", "Notebook2", "Notebook3", "Notebook4"]


def per_process_parallel_job() -> dg.JobDefinition:
    """The parallel job with `PerProcessSparkBackend` bound instead of the shared engine: same
    assets, checks and executor; only the resource differs."""
    from nbpipeline.assets import ALL_ASSETS
    from nbpipeline.backends.classic import PerProcessSparkBackend
    from nbpipeline.jobs import PARALLEL_JOB, build_jobs
    from nbpipeline.resources import NOTEBOOK_BACKEND_KEY

    swapped = dg.Definitions(
        assets=ALL_ASSETS,
        jobs=build_jobs(),
        resources={NOTEBOOK_BACKEND_KEY: PerProcessSparkBackend()},
    )
    return swapped.resolve_job_def(PARALLEL_JOB)


class MemorySampler(threading.Thread):
    """Peaks of the summed RSS and PSS of this process tree (plus extra pids' trees), sampled;
    and the CPU seconds the tree used meanwhile (`cpu_s`, and `engine_cpu_s` of the first extra
    pid's tree, the engine JVM), which tells whether the engine had idle cores to offer."""

    def __init__(self, extra_pids: list[int], interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.extra_pids = extra_pids
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        # pid -> (CPU seconds when first seen, when last seen, part of the engine's tree)
        self._cpu: dict[int, list[Any]] = {}
        self._first_sample = True
        self._done = threading.Event()

    @property
    def cpu_s(self) -> float:
        return sum(last - first for first, last, _ in self._cpu.values())

    @property
    def engine_cpu_s(self) -> float:
        return sum(last - first for first, last, engine in self._cpu.values() if engine)

    def _sample(self) -> None:
        rss, pss = self._tree_memory()
        self.peak_bytes = max(self.peak_bytes, rss)
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)

    def _tree_memory(self) -> tuple[int, int]:
        # The extra trees first: the engine JVM may also be a child of this process (when this
        # process started it), and each process is counted once, under the first root it is
        # found in, which decides whether its CPU counts as the engine's.
        roots = []
        for pid in self.extra_pids:
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(pid))
        roots.append(psutil.Process())
        seen: set[int] = set()
        rss = pss = 0
        engine_root = self.extra_pids[0] if self.extra_pids else None
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
                    times = proc.cpu_times()
                    used = times.user + times.system
                    # Processes already running when sampling began count from then; those
                    # started later (step processes, their JVMs) count from zero.
                    entry = self._cpu.setdefault(
                        proc.pid,
                        [used if self._first_sample else 0.0, used, root.pid == engine_root],
                    )
                    entry[1] = used
                    info = proc.memory_full_info()  # PSS comes from /proc/PID/smaps_rollup
                    rss += info.rss
                    # No PSS off Linux: count RSS. And never more than RSS: this machine's
                    # kernel was seen reporting a JVM's PSS above its RSS (1424 vs 1189 MB),
                    # which a proportional share of resident pages cannot be.
                    pss += min(getattr(info, "pss", info.rss), info.rss)
        self._first_sample = False
        return rss, pss

    def run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
        self._sample()


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
    job_fn: Callable[[], dg.JobDefinition],
    mode: str,
    source: str,
    tags: dict,
    op_selection: list[str] | None,
) -> str:
    from nbpipeline.cli_pipeline import build_run_config, run_job_fn

    run_config = build_run_config(mode, source=source)
    result = run_job_fn(
        job_fn, run_config, tags=tags, out=lambda _m: None, op_selection=op_selection
    )
    if not result["success"]:
        raise NbPipelineError(f"bench run {result['run_id']} failed: {result['error']}")
    return str(result["run_id"])


def breakdown(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Where a Dagster run's wall time went, from its event log (seconds).

    - `launch_s`: run start to the first step start (executor and step process start-up);
    - `notebooks_s`: the notebooks' own durations (they time themselves), summed;
    - `step_overhead_s`: step time outside the notebook, summed over steps (imports, engine
      session, parameter checks, writing materializations);
    - `idle_s`: wall time during which no step was running (launch and tail included);
    - `wall_s`: the run's start to its end, as `nbpipeline compare` counts it.
    """
    from nbpipeline.comparison import run_timing
    from nbpipeline.metadata import metadata_value

    timing = run_timing(instance, run_id)
    notebook_s: dict[str, float] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        mat = entry.asset_materialization
        value = metadata_value(mat.metadata.get("notebook_duration_s")) if mat else None
        if value is not None and entry.step_key:
            notebook_s[entry.step_key] = float(value)  # one notebook run per step
    steps = {s.step: s.duration_s for s in timing.steps}
    return {
        "wall_s": round(timing.wall_s, 3),
        "launch_s": round(min((s.start_offset_s for s in timing.steps), default=0.0), 3),
        "notebooks_s": round(sum(notebook_s.values()), 3),
        "step_overhead_s": round(
            sum(steps[k] - notebook_s[k] for k in notebook_s if k in steps), 3
        ),
        "idle_s": round(timing.overhead_s, 3),
    }


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
    with_checks: bool = False,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run every mode `repeat` times, interleaved; return figures per mode and the ratios.

    The Dagster modes run the notebook steps only, unless `with_checks`."""
    from nbpipeline import definitions

    if rows < 1 or repeat < 1:
        raise ConfigError("bench needs --rows >= 1 and --repeat >= 1")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ConfigError(f"unknown bench mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    from nbpipeline.instance import get_instance

    instance = get_instance(progress)
    spark = engine.get_spark(progress=progress)  # starts (warms) the engine
    source = _source_for_bench(spark, rows, seed, progress)
    table = source["table"]
    engine_pid = engine.status().get("pid")
    tags = {BENCH_TAG: "1", "nbpipeline/source_version": str(source["version"])}
    steps = None if with_checks else NOTEBOOK_STEPS
    runners: dict[str, Callable[[], str | None]] = {
        "dagster-sequential": lambda: _run_dagster(
            definitions.sequential_notebooks_job, "sequential", table, tags, steps
        ),
        "dagster-parallel": lambda: _run_dagster(
            definitions.parallel_notebooks_job, "parallel", table, tags, steps
        ),
        "notebook-sequential": lambda: _run_orchestration("SequentialOrchestration.py", table),
        "notebook-threads": lambda: _run_orchestration("ParallelOrchestration.py", table),
        "per-process-spark": lambda: _run_dagster(
            per_process_parallel_job,
            "parallel",
            table,
            {**tags, BENCH_TAG: "per-process"},
            steps,
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
                run_id = runners[mode]()
                wall = time.perf_counter() - t0
            peak_mb = mem.peak_bytes / 2**20
            pss_mb = mem.peak_pss_bytes / 2**20
            figures: dict[str, Any] = {
                "wall_s": round(wall, 3),
                "peak_rss_mb": round(peak_mb, 1),
                "peak_pss_mb": round(pss_mb, 1),
                "cpu_s": round(mem.cpu_s, 1),
                # Average busy cores of the engine JVM over the run (2 = both cores saturated).
                "engine_cores_busy": round(mem.engine_cpu_s / wall, 2) if extra else None,
            }
            if run_id:
                figures["run_id"] = run_id
                figures["breakdown"] = breakdown(instance, run_id)
            runs[mode].append(figures)
            busy = figures["engine_cores_busy"]
            progress(
                f"[{done}/{total}] {mode:<20} round {round_no + 1}: {wall:7.2f}s, "
                f"peak RSS {peak_mb:6.0f} MB, PSS {pss_mb:6.0f} MB, CPU {mem.cpu_s:6.1f}s"
                + (f", engine {busy:.2f} cores busy" if busy is not None else "")
            )

    summary = {
        mode: {
            "median_s": round(statistics.median(r["wall_s"] for r in rs), 3),
            "min_s": round(min(r["wall_s"] for r in rs), 3),
            "max_s": round(max(r["wall_s"] for r in rs), 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs), 1),
            "peak_pss_mb": round(max(r["peak_pss_mb"] for r in rs), 1),
            "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 1),
            "engine_cores_busy": _median_or_none([r["engine_cores_busy"] for r in rs]),
            "runs": rs,
        }
        for mode, rs in runs.items()
    }
    for mode, rs in runs.items():
        parts = [r["breakdown"] for r in rs if "breakdown" in r]
        if parts:
            summary[mode]["breakdown_median"] = {
                key: round(statistics.median(p[key] for p in parts), 3) for key in parts[0]
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
        peak = summary["dagster-parallel"]["peak_pss_mb"]
        ratios.append(
            {
                "ratio": "dagster-parallel peak memory (PSS MB)",
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
        "with_checks": with_checks,
        "engine_memory": engine.EngineConfig.from_env().driver_memory,
        "modes": summary,
        "targets": ratios,
    }


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def format_table(result: dict[str, Any]) -> str:
    """The bench result as a plain-text table."""
    lines = [
        f"{result['rows']} rows, {result['repeat']} round(s), source version "
        f"{result['source_version']}, engine memory {result['engine_memory']}, "
        + ("with check steps" if result["with_checks"] else "notebook steps only"),
        f"{'mode':<20} {'median s':>9} {'min s':>8} {'max s':>8} {'RSS MB':>8} {'PSS MB':>8} "
        f"{'CPU s':>7} {'engine cores':>12}",
    ]
    for mode, m in result["modes"].items():
        busy = m.get("engine_cores_busy")
        lines.append(
            f"{mode:<20} {m['median_s']:>9.2f} {m['min_s']:>8.2f} {m['max_s']:>8.2f} "
            f"{m['peak_rss_mb']:>8.0f} {m['peak_pss_mb']:>8.0f} {m.get('cpu_s', 0):>7.1f} "
            + (f"{busy:>12.2f}" if busy is not None else f"{'-':>12}")
        )
    parts = {
        m: f["breakdown_median"] for m, f in result["modes"].items() if "breakdown_median" in f
    }
    if parts:
        keys = ("wall_s", "launch_s", "notebooks_s", "step_overhead_s", "idle_s")
        lines += ["", "where the time goes (Dagster runs, medians, seconds):"]
        lines.append(f"{'mode':<20} " + " ".join(f"{k:>16}" for k in keys))
        for mode, b in parts.items():
            lines.append(f"{mode:<20} " + " ".join(f"{b[k]:>16.2f}" for k in keys))
    lines.append("")
    for t in result["targets"]:
        lines.append(
            f"{t['ratio']:<45} {t['value']:>8} (target {t['target']}): {'met' if t['met'] else 'MISSED'}"
        )
    return "\n".join(lines)
