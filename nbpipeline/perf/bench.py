"""`nbpipeline bench`: the same notebook work in six modes, interleaved, on one source version.

Modes:
- `dagster-sequential` / `dagster-parallel`: the two Dagster jobs, through the Dagster instance
  (their runs appear in the UI, tagged `nbpipeline/bench`).
- `notebook-sequential` / `notebook-threads`: the original design's orchestration notebooks
  (`dbutils.notebook.run`, one after another or from a thread pool) on one shared session.
- `per-process-spark`: the parallel job with a local Spark JVM created inside each step process,
  the stock way to use PySpark from Dagster (a reference, not a product mode).
- `reference`: the floor, the least work this engine can do for this data: the five outputs
  computed in one session from one cached, cleaned snapshot and written with plain overwrites
  (`nbpipeline.perf.reference`), into a folder of its own. Every mode's ratio to it is reported.

Every mode reads the same Delta path source (a classic in-process JVM cannot open the engine's
metastore) and MERGEs into the same outputs beside it. A warm-up run (not measured) writes the
outputs first, so every measured run does identical work: a full read and a MERGE that changes
nothing.

Like is compared with like: every mode runs the same four notebooks, which evaluate their asset
checks inside their own runs (the Dagster jobs have no separate check steps).

Wall time is measured around each run. Memory is sampled every 0.5 s over this process, its
descendants (run worker, step processes, their JVMs) and, for modes that use it, the engine
JVM: the peak of the summed resident set sizes (RSS, which counts pages that forked step
processes share with their fork server once per process) and the peak of the summed
proportional set sizes (PSS, which splits each shared page between its sharers, so the sum is
the memory the tree really holds). The memory target is checked on PSS.

Where the CPU goes, per run: CPU seconds by process role (the engine; this process, which
coordinates Dagster runs, writes their event log and runs the sequential job's notebooks; the
parallel job's step processes; helper processes such as the fork server; per-step JVMs). With
the engine's UI on (`NBPIPELINE_ENGINE_UI=1` when it starts) also inside the engine, from its
metrics servlet: Spark jobs, stages, tasks, task run and CPU seconds, GC, generated-code
compilations and Hive catalog calls, and the engine CPU spent outside tasks (planning, code
generation, Delta log work, gRPC), the engine's CPU minus its tasks' CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import dagster as dg
import psutil

from nbpipeline import settings
from nbpipeline.backend import NOTEBOOK_NAMES
from nbpipeline.defs.tags import BENCH_TAG, SOURCE_VERSION_TAG
from nbpipeline.errors import ConfigError, NbPipelineError
from nbpipeline.local import engine

BENCH_MODES = (
    "dagster-sequential",
    "dagster-parallel",
    "notebook-sequential",
    "notebook-threads",
    "per-process-spark",
    "reference",
)
REFERENCE = "reference"

# (numerator, denominator, comparison, target): the performance targets.
TARGETS = (
    ("dagster-parallel", "notebook-threads", "<=", 1.10),
    ("dagster-sequential", "notebook-sequential", "<=", 1.10),
    ("dagster-parallel", "dagster-sequential", "<=", 0.90),
    ("per-process-spark", "dagster-parallel", ">=", 3.0),
    ("dagster-sequential", REFERENCE, "<=", 1.5),
    ("dagster-parallel", REFERENCE, "<=", 1.5),
)
#: Below this many rows the parallel job only has to be no slower than the sequential one
#: (fixed per-step costs weigh more on small data).
PARALLEL_GAIN_MIN_ROWS = 1_000_000
#: Process roles of the CPU breakdown.
ROLES = (
    "engine",
    "this_process",
    "step_processes",
    "helper_processes",
    "step_jvms",
    "sampler",
)
PARALLEL_MEMORY_TARGET_MB = 3 * 1024


def per_process_parallel_job() -> dg.JobDefinition:
    """The parallel job with `PerProcessSparkBackend` bound instead of the shared engine: same
    assets, checks and executor; only the resource differs."""
    from nbpipeline.defs.assets import ALL_ASSETS
    from nbpipeline.defs.jobs import build_jobs
    from nbpipeline.defs.resources import NOTEBOOK_BACKEND_KEY
    from nbpipeline.defs.tags import PARALLEL_JOB
    from nbpipeline.local.classic import PerProcessSparkBackend

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

    # Reading every process's PSS (/proc/PID/smaps_rollup) is costly for a JVM: a shorter
    # interval takes CPU from the modes being measured.
    def __init__(self, extra_pids: list[int], interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.extra_pids = extra_pids
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        # pid -> (CPU seconds when first seen, when last seen, part of the engine's tree)
        self._cpu: dict[int, list[Any]] = {}
        self._first_sample = True
        self._done = threading.Event()
        self.own_cpu_s = 0.0

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the processes measured, this sampler's own excluded."""
        return sum(last - first for first, last, _ in self._cpu.values()) - self.own_cpu_s

    @property
    def engine_cpu_s(self) -> float:
        return sum(last - first for first, last, role in self._cpu.values() if role == "engine")

    @property
    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per process role (see ROLES)."""
        out = dict.fromkeys(ROLES, 0.0)
        for first, last, role in self._cpu.values():
            out[role] += last - first
        # This sampler's own reading of /proc (PSS is costly) is not the work being measured.
        out["sampler"] = self.own_cpu_s
        out["this_process"] = max(out["this_process"] - self.own_cpu_s, 0.0)
        return {k: round(v, 2) for k, v in out.items()}

    @staticmethod
    def _role(proc: psutil.Process, engine: bool) -> str:
        if engine:
            return "engine"
        me = os.getpid()
        if proc.pid == me:
            return "this_process"
        with contextlib.suppress(psutil.Error):
            if proc.name().startswith("java"):
                return "step_jvms"
            if proc.ppid() == me:  # the fork server, multiprocessing's resource tracker
                return "helper_processes"
        return "step_processes"

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
                    entry = self._cpu.get(proc.pid)
                    if entry is None:
                        role = self._role(proc, root.pid == engine_root)
                        entry = self._cpu[proc.pid] = [
                            used if self._first_sample else 0.0,
                            used,
                            role,
                        ]
                    entry[1] = used
                    info = proc.memory_full_info()  # PSS comes from /proc/PID/smaps_rollup
                    rss += info.rss
                    # No PSS off Linux: count RSS. And never more than RSS, which a
                    # proportional share of resident pages cannot exceed (kernels misreport it).
                    pss += min(getattr(info, "pss", info.rss), info.rss)
        self._first_sample = False
        return rss, pss

    def run(self) -> None:
        start = time.thread_time()
        while not self._done.is_set():
            self._sample()
            self._done.wait(self.interval_s)
        self.own_cpu_s = time.thread_time() - start

    def __enter__(self) -> MemorySampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()
        self._sample()


#: Engine metrics (the metrics servlet's counter / histogram names after `<app>.driver.`):
#: breakdown key -> (kind, metric, scale to seconds or counts).
SPARK_METRICS = {
    "spark_jobs": ("counters", "appStatus.jobs.succeededJobs", 1),
    "spark_stages": ("counters", "appStatus.stages.completedStages", 1),
    "spark_skipped_stages": ("counters", "appStatus.stages.skippedStages", 1),
    "spark_tasks": ("counters", "appStatus.tasks.completedTasks", 1),
    "task_run_s": ("counters", "executor.runTime", 1e-3),
    "task_cpu_s": ("counters", "executor.cpuTime", 1e-9),
    "task_gc_s": ("counters", "executor.jvmGCTime", 1e-3),
    "codegen_compilations": ("histograms", "CodeGenerator.compilationTime", 1),
    "hive_client_calls": ("counters", "HiveExternalCatalog.hiveClientCalls", 1),
}


class EngineMetrics:
    """Cumulative figures of the local engine from its UI's metrics servlet (`/metrics/json/`),
    found on one of the engine process's listening ports; `available` is False when the
    engine runs without its UI."""

    def __init__(self, engine_pid: int | None) -> None:
        self.base: str | None = None
        if engine_pid is None:
            return
        with contextlib.suppress(psutil.Error):
            conns = psutil.Process(engine_pid).net_connections("tcp")
            ports = sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN})
            for port in ports:
                base = f"http://127.0.0.1:{port}"
                with contextlib.suppress(Exception):
                    apps = self._get(f"{base}/api/v1/applications")
                    if isinstance(apps, list) and apps:
                        self.base = base
                        break

    @staticmethod
    def _get(url: str) -> Any:
        # The engine's own loopback UI, never a user-supplied address.
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    @property
    def available(self) -> bool:
        return self.base is not None

    def snapshot(self) -> dict[str, float] | None:
        if self.base is None:
            return None
        try:
            data = self._get(f"{self.base}/metrics/json/")
        except Exception:
            return None
        out = {}
        for key, (kind, name, scale) in SPARK_METRICS.items():
            found = [v for k, v in data.get(kind, {}).items() if k.endswith(".driver." + name)]
            value = found[0].get("count", 0) if found else 0
            out[key] = float(value) * scale
        return out

    @staticmethod
    def delta(before: dict | None, after: dict | None, engine_cpu_s: float) -> dict | None:
        """What the engine did between two snapshots, plus its CPU outside tasks."""
        if not before or not after:
            return None
        out = {k: round(after[k] - before[k], 3) for k in SPARK_METRICS}
        out["engine_cpu_outside_tasks_s"] = round(engine_cpu_s - out["task_cpu_s"], 2)
        return out


def _source_for_bench(spark: Any, rows: int, seed: int, progress: Callable[[str], None]) -> dict:
    """Seed the bench source once per (rows, seed); reuse it while it is unchanged."""
    from nbpipeline.identifiers import parse_table
    from nbpipeline.local import seed as seeding
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
    from nbpipeline.runs import build_run_config, run_job_fn

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
    from nbpipeline.defs.metadata import metadata_value
    from nbpipeline.perf.comparison import run_timing

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


def _run_reference(source: str) -> None:
    from nbpipeline.perf import reference

    folder = settings.home() / "bench" / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    reference.compute(engine.get_spark(), source, folder)


def _run_orchestration(notebook: str, source: str) -> None:
    from nbpipeline.local.runtime import run_notebook

    spark = engine.get_spark()
    # The orchestration notebooks print their timings; keep stdout for the bench's own result.
    with contextlib.redirect_stdout(sys.stderr):
        run_notebook(settings.notebooks_dir() / notebook, {"source_table": source}, spark=spark)


def bench(
    *,
    rows: int,
    repeat: int,
    seed: int = 42,
    modes: tuple[str, ...] = BENCH_MODES,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run every mode `repeat` times, interleaved; return figures per mode and the ratios."""
    from nbpipeline import definitions

    if rows < 1 or repeat < 1:
        raise ConfigError("bench needs --rows >= 1 and --repeat >= 1")
    unknown = sorted(set(modes) - set(BENCH_MODES))
    if unknown:
        raise ConfigError(
            f"unknown bench mode(s) {', '.join(unknown)}; modes: {', '.join(BENCH_MODES)}"
        )
    from nbpipeline.instance import get_instance

    instance = get_instance(progress)
    spark = engine.get_spark(progress=progress)  # starts (warms) the engine
    source = _source_for_bench(spark, rows, seed, progress)
    table = source["table"]
    engine_pid = engine.status().get("pid")
    tags = {BENCH_TAG: "1", SOURCE_VERSION_TAG: str(source["version"])}
    steps = list(NOTEBOOK_NAMES)
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
        REFERENCE: lambda: _run_reference(table),
    }
    metrics = EngineMetrics(engine_pid)
    if not metrics.available:
        progress(
            "The engine's UI is off: no Spark jobs/stages/tasks breakdown (start the engine "
            "with NBPIPELINE_ENGINE_UI=1 for it)"
        )
    progress("Warm-up run (not measured): writes the outputs once so every measured run is alike")
    started = time.perf_counter()
    runners["notebook-sequential"]()
    progress(f"Warm-up took {time.perf_counter() - started:.1f}s")

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    total = repeat * len(modes)
    done = 0
    for round_no in range(repeat):
        # Rotate the order each round so no mode always runs right after the same other one.
        order = list(modes[round_no % len(modes) :] + modes[: round_no % len(modes)])
        for mode in order:
            done += 1
            extra = [] if mode == "per-process-spark" or not engine_pid else [engine_pid]
            before = metrics.snapshot() if extra else None
            with MemorySampler(extra) as mem:
                t0 = time.perf_counter()
                run_id = runners[mode]()
                wall = time.perf_counter() - t0
            spark_figures = EngineMetrics.delta(before, metrics.snapshot(), mem.engine_cpu_s)
            peak_mb = mem.peak_bytes / 2**20
            pss_mb = mem.peak_pss_bytes / 2**20
            figures: dict[str, Any] = {
                "wall_s": round(wall, 3),
                "peak_rss_mb": round(peak_mb, 1),
                "peak_pss_mb": round(pss_mb, 1),
                "cpu_s": round(mem.cpu_s, 1),
                # Average busy cores of the engine JVM over the run (2 = both cores saturated).
                "engine_cores_busy": round(mem.engine_cpu_s / wall, 2) if extra else None,
                "cpu_by_role": mem.cpu_by_role,
            }
            if spark_figures:
                figures["engine"] = spark_figures
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

    summary: dict[str, dict[str, Any]] = {
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
        for source_key, median_key in (
            ("breakdown", "breakdown_median"),
            ("cpu_by_role", "cpu_by_role_median"),
            ("engine", "engine_median"),
        ):
            parts = [r[source_key] for r in rs if r.get(source_key)]
            if parts:
                summary[mode][median_key] = {
                    key: round(statistics.median(p[key] for p in parts), 3) for key in parts[0]
                }
    if REFERENCE in summary:
        floor = summary[REFERENCE]["median_s"]
        for figures in summary.values():
            figures["vs_reference"] = round(figures["median_s"] / floor, 3) if floor else None
    ratios = []
    for num, den, op, target in TARGETS:
        if (num, den) == ("dagster-parallel", "dagster-sequential") and (
            rows < PARALLEL_GAIN_MIN_ROWS
        ):
            target = 1.0
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
        f"{result['source_version']}, engine memory {result['engine_memory']}",
        f"{'mode':<20} {'median s':>9} {'min s':>8} {'max s':>8} {'RSS MB':>8} {'PSS MB':>8} "
        f"{'CPU s':>7} {'engine cores':>12} {'x reference':>11}",
    ]
    for mode, m in result["modes"].items():
        busy = m.get("engine_cores_busy")
        ref = m.get("vs_reference")
        lines.append(
            f"{mode:<20} {m['median_s']:>9.2f} {m['min_s']:>8.2f} {m['max_s']:>8.2f} "
            f"{m['peak_rss_mb']:>8.0f} {m['peak_pss_mb']:>8.0f} {m.get('cpu_s', 0):>7.1f} "
            + (f"{busy:>12.2f}" if busy is not None else f"{'-':>12}")
            + (f" {ref:>11.2f}" if ref is not None else f" {'-':>11}")
        )
    roles = {
        m: f["cpu_by_role_median"] for m, f in result["modes"].items() if "cpu_by_role_median" in f
    }
    if roles:
        lines += ["", "CPU seconds by process (medians):"]
        lines.append(f"{'mode':<20} " + " ".join(f"{k:>16}" for k in ROLES))
        for mode, r in roles.items():
            lines.append(f"{mode:<20} " + " ".join(f"{r[k]:>16.1f}" for k in ROLES))
    inside = {m: f["engine_median"] for m, f in result["modes"].items() if "engine_median" in f}
    if inside:
        keys = [*SPARK_METRICS, "engine_cpu_outside_tasks_s"]
        lines += ["", "inside the engine (medians; from its metrics servlet):"]
        lines.append(f"{'figure':<28} " + " ".join(f"{m[:19]:>19}" for m in inside))
        for key in keys:
            lines.append(f"{key:<28} " + " ".join(f"{inside[m][key]:>19.1f}" for m in inside))
    parts = {
        m: f["breakdown_median"] for m, f in result["modes"].items() if "breakdown_median" in f
    }
    if parts:
        keys = ["wall_s", "launch_s", "notebooks_s", "step_overhead_s", "idle_s"]
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
