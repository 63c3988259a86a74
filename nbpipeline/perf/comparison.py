"""Sequential vs parallel: timings of two runs read from the Dagster event log, side by side.

Definitions (all in seconds):
- wall: the run's start (RUN_START) to its end (RUN_SUCCESS/RUN_FAILURE); queue time, from the
  run's creation to its start, is shown apart and not included.
- step duration: STEP_START to STEP_SUCCESS (or STEP_FAILURE) of each notebook step; start offset
  is measured from the run's start.
- sum of steps: the work, as if done one after another.
- critical path: the longest step, a lower bound for any parallel wall time.
- busy: the union of the step intervals; overhead = wall - busy, the part of the wall time during
  which no notebook was running (process start-up, orchestration, commits of the event log).
- speedup = sequential wall / parallel wall; efficiency = speedup / number of notebook steps
  (the parallelism the job could reach; asset-check steps are timed but not counted there).

What parallel would buy elsewhere (`what_if`), from the sequential run alone: each notebook step
records its wall time w_i, the CPU seconds it cost (the engine's, sampled at the step's start and
end, which in a sequential run is that step's work alone, plus the step process's own) c_i, the
part of the engine's seconds its JIT compilers took j_i, and the cores the engine could use C (its
task slots, at most its CPU affinity). With total work W = sum(c_i) and least work
L = sum(c_i - j_i) (compiled code stays compiled: an engine that ran the job once does not compile
it again), on N cores the parallel job's wall time is
- at least max(L / N, max_i max((c_i - j_i) / N, w_i - c_i / C)): no machine does the work
  faster than N cores can, and a step's part that did not scale with C cores (w_i - c_i / C, the
  least critical path Brent's bound allows for its measured run) does not shrink with more cores;
- at most W / N + max_i w_i: Brent's bound for a greedy scheduler (Spark's, with the steps
  independent), each step's critical path being at most its measured wall time;
both plus the sequential run's time outside its steps (orchestration). Steps that record no CPU
(asset-check steps, which follow their notebook's step) add their wall time to their notebook's
chain in both bounds. `limited_by` says which term sets the lower bound: `cpu` (L / N) or the
longest step. The bounds assume the N cores serve this job alone: on a machine others load,
steps wait for CPU and both bounds can be missed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbpipeline.defs.tags import MODE_TAG, SOURCE_VERSION_TAG  # the tags the jobs' runs carry
from nbpipeline.errors import ConfigError

#: Core counts `what_if` estimates the parallel job's wall time for.
WHAT_IF_CORES = (1, 2, 4, 8, 16, 32)


class NoPairError(ConfigError):
    """The instance holds no sequential and parallel run to compare (yet)."""


@dataclass
class StepTiming:
    step: str
    start_offset_s: float
    duration_s: float
    status: str


@dataclass
class RunTiming:
    run_id: str
    job: str
    mode: str
    source_version: str | None
    status: str
    started_at: float
    queue_s: float
    wall_s: float
    steps: list[StepTiming] = field(default_factory=list)

    @property
    def sum_steps_s(self) -> float:
        return sum(s.duration_s for s in self.steps)

    @property
    def critical_path_s(self) -> float:
        return max((s.duration_s for s in self.steps), default=0.0)

    @property
    def busy_s(self) -> float:
        """Length of the union of the step intervals."""
        spans = sorted((s.start_offset_s, s.start_offset_s + s.duration_s) for s in self.steps)
        total = 0.0
        cur_start: float = 0.0
        cur_end: float | None = None
        for start, end in spans:
            if cur_end is None or start > cur_end:
                if cur_end is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        if cur_end is not None:
            total += cur_end - cur_start
        return total

    @property
    def overhead_s(self) -> float:
        return max(self.wall_s - self.busy_s, 0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            sum_steps_s=round(self.sum_steps_s, 3),
            critical_path_s=round(self.critical_path_s, 3),
            busy_s=round(self.busy_s, 3),
            overhead_s=round(self.overhead_s, 3),
        )
        return data


@dataclass
class StepCost:
    """What one step of a sequential run cost: wall seconds, CPU seconds, engine task slots."""

    step: str
    wall_s: float
    cpu_s: float
    cores: int
    jit_s: float = 0.0  # of cpu_s, the engine's JIT compilers: a warm engine does not repeat it

    @property
    def least_cpu_s(self) -> float:
        return max(self.cpu_s - self.jit_s, 0.0)


def step_costs(instance: Any, timing: RunTiming) -> list[StepCost]:
    """Per notebook step of a finished run, its wall time and the CPU seconds its step recorded
    in its materializations' metadata (empty if the steps recorded none: a remote engine, or
    runs from before nbpipeline recorded them)."""
    import dagster as dg

    from nbpipeline.defs.metadata import metadata_value
    from nbpipeline.local.backend import (
        CLIENT_CPU_KEY,
        ENGINE_CORES_KEY,
        ENGINE_CPU_KEY,
        ENGINE_JIT_CPU_KEY,
    )

    recorded: dict[str, tuple[float, int, float]] = {}
    for entry in instance.all_logs(
        timing.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ):
        mat = entry.asset_materialization
        meta = mat.metadata if mat else {}
        engine_cpu = metadata_value(meta.get(ENGINE_CPU_KEY))
        cores = metadata_value(meta.get(ENGINE_CORES_KEY))
        if engine_cpu is None or not cores or not entry.step_key:
            continue
        client_cpu = metadata_value(meta.get(CLIENT_CPU_KEY)) or 0.0
        jit_cpu = metadata_value(meta.get(ENGINE_JIT_CPU_KEY)) or 0.0
        # A step writing two tables records the same figures twice; one per step.
        recorded[entry.step_key] = (
            float(engine_cpu) + float(client_cpu),
            int(cores),
            float(jit_cpu),
        )
    return [
        StepCost(s.step, s.duration_s, *recorded[s.step])
        for s in timing.steps
        if s.step in recorded and s.status == "success"
    ]


def what_if(
    costs: list[StepCost],
    outside_steps_s: float = 0.0,
    cores: tuple[int, ...] = WHAT_IF_CORES,
    after: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Bounds of the parallel job's wall time on N cores (see the module docstring).

    `after`: seconds of steps that run after a costed step and record no CPU (its asset-check
    step), by costed step; they count as a serial tail of that step, in both bounds."""
    if not costs:
        return []
    tail = after or {}
    work = sum(c.cpu_s for c in costs)
    least = sum(c.least_cpu_s for c in costs)
    longest = max(c.wall_s + tail.get(c.step, 0.0) for c in costs)
    out = []
    for n in cores:
        floors = {
            c.step: max(c.least_cpu_s / n, c.wall_s - c.cpu_s / c.cores, 0.0)
            + tail.get(c.step, 0.0)
            for c in costs
        }
        step, floor = max(floors.items(), key=lambda kv: kv[1])
        cpu_floor = least / n
        out.append(
            {
                "cores": n,
                "low_s": round(max(cpu_floor, floor) + outside_steps_s, 2),
                "high_s": round(work / n + longest + outside_steps_s, 2),
                "limited_by": "cpu" if cpu_floor >= floor else f"longest step ({step})",
            }
        )
    return out


def tails(timing: RunTiming, costs: list[StepCost]) -> dict[str, float]:
    """Seconds of the uncosted steps that follow each costed step (`NotebookN_checks` after
    `NotebookN`), summed per costed step."""
    costed = {c.step for c in costs}
    out: dict[str, float] = {}
    for s in timing.steps:
        owner = s.step.split("_", 1)[0]
        if s.step not in costed and owner in costed:
            out[owner] = out.get(owner, 0.0) + s.duration_s
    return out


def what_if_markdown(rows: list[dict[str, Any]]) -> str:
    """The what-if estimates as a Markdown table (a line saying why there are none if empty)."""
    if not rows:
        return (
            "No what-if estimate: the sequential run's steps recorded no CPU seconds "
            "(a remote engine, or a run from before nbpipeline recorded them)."
        )
    lines = [
        "| cores | parallel wall at least (s) | at most (s) | limited by |",
        "|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['cores']} | {r['low_s']:.1f} | {r['high_s']:.1f} | {r['limited_by']} |" for r in rows
    ]
    return "\n".join(lines)


@dataclass
class Comparison:
    sequential: RunTiming
    parallel: RunTiming
    #: Estimated parallel wall time on other core counts (`what_if`); empty if not estimable.
    what_if: list[dict[str, Any]] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.sequential.wall_s / self.parallel.wall_s if self.parallel.wall_s else 0.0

    @property
    def parallelism(self) -> int:
        """How many steps could run at once: the notebook steps (check steps excluded)."""
        from nbpipeline.backend import NOTEBOOK_NAMES

        notebooks = {s.step for s in self.parallel.steps if s.step in NOTEBOOK_NAMES}
        return len(notebooks) or max(len(self.parallel.steps), 1)

    @property
    def efficiency(self) -> float:
        return self.speedup / self.parallelism

    def to_dict(self) -> dict[str, Any]:
        return {
            "sequential": self.sequential.to_dict(),
            "parallel": self.parallel.to_dict(),
            "speedup": round(self.speedup, 4),
            "efficiency": round(self.efficiency, 4),
            "what_if": self.what_if,
        }

    def to_markdown(self) -> str:
        seq, par = self.sequential, self.parallel
        steps = sorted({s.step for s in seq.steps} | {s.step for s in par.steps})
        by = {
            (run.mode, s.step): s for run in (seq, par) for s in run.steps
        }  # (mode, step) -> timing
        lines = [
            f"| step | {seq.mode} start | {seq.mode} duration | {par.mode} start | {par.mode} duration |",
            "|---|---:|---:|---:|---:|",
        ]
        for step in steps:
            cells = []
            for run in (seq, par):
                t = by.get((run.mode, step))
                cells += [f"{t.start_offset_s:.2f}", f"{t.duration_s:.2f}"] if t else ["-", "-"]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"| figure | {seq.mode} ({seq.run_id[:8]}) | {par.mode} ({par.run_id[:8]}) |",
            "|---|---:|---:|",
        ]
        for label, attr in (
            ("wall (s)", "wall_s"),
            ("queue (s, not in wall)", "queue_s"),
            ("sum of steps (s)", "sum_steps_s"),
            ("critical path (s)", "critical_path_s"),
            ("overhead: no notebook running (s)", "overhead_s"),
        ):
            lines.append(f"| {label} | {getattr(seq, attr):.2f} | {getattr(par, attr):.2f} |")
        lines += [
            "",
            f"**speedup** {self.speedup:.2f}x, **parallel efficiency** {self.efficiency:.0%}"
            f" (source version {par.source_version or '?'})",
            "",
            "**What parallel would buy with N cores** (estimated from the sequential run's "
            "per-step wall and CPU seconds):",
            "",
            what_if_markdown(self.what_if),
        ]
        return "\n".join(lines)

    def to_text(self) -> str:
        return self.to_markdown().replace("**", "")


def run_timing(instance: Any, run_id: str) -> RunTiming:
    """Timings of one run from the instance's run record and event log."""
    import dagster as dg

    record = instance.get_run_record_by_id(run_id)
    if record is None:
        raise ConfigError(f"no run {run_id!r} in the Dagster instance at {instance.root_directory}")
    run = record.dagster_run
    types = {
        dg.DagsterEventType.RUN_START,
        dg.DagsterEventType.RUN_SUCCESS,
        dg.DagsterEventType.RUN_FAILURE,
        dg.DagsterEventType.STEP_START,
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.STEP_FAILURE,
    }
    run_start = run_end = None
    starts: dict[str, float] = {}
    steps: list[StepTiming] = []
    for entry in instance.all_logs(run_id, of_type=types):
        kind = entry.dagster_event.event_type
        if kind == dg.DagsterEventType.RUN_START:
            run_start = entry.timestamp
        elif kind in (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE):
            run_end = entry.timestamp
        elif kind == dg.DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif entry.step_key in starts:
            status = "success" if kind == dg.DagsterEventType.STEP_SUCCESS else "failure"
            steps.append(
                StepTiming(
                    entry.step_key,
                    starts[entry.step_key],
                    entry.timestamp - starts[entry.step_key],
                    status,
                )
            )
    if run_start is None or run_end is None:
        raise ConfigError(f"run {run_id} has not finished (status {run.status.value})")
    for s in steps:
        s.start_offset_s = round(s.start_offset_s - run_start, 3)
        s.duration_s = round(s.duration_s, 3)
    steps.sort(key=lambda s: (s.start_offset_s, s.step))
    created = record.create_timestamp.timestamp()
    return RunTiming(
        run_id=run_id,
        job=run.job_name,
        mode=run.tags.get(MODE_TAG, run.job_name),
        source_version=run.tags.get(SOURCE_VERSION_TAG),
        status=run.status.value,
        started_at=run_start,
        queue_s=round(max(run_start - created, 0.0), 3),
        wall_s=round(run_end - run_start, 3),
        steps=steps,
    )


def latest_pair(instance: Any, source_version: str | None = None) -> tuple[str, str]:
    """Run ids of the latest successful sequential and parallel runs on the same source version
    (the newest version both modes have run on, unless one is given)."""
    import dagster as dg

    def runs(mode: str) -> list[Any]:
        return list(
            instance.get_runs(
                filters=dg.RunsFilter(
                    tags={MODE_TAG: mode}, statuses=[dg.DagsterRunStatus.SUCCESS]
                ),
                limit=200,
            )
        )

    seq, par = runs("sequential"), runs("parallel")
    if not seq or not par:
        missing = " and ".join(m for m, r in (("sequential", seq), ("parallel", par)) if not r)
        raise NoPairError(
            f"no successful {missing} run in the Dagster instance at {instance.root_directory}",
            hint="run `nbpipeline run sequential` and `nbpipeline run parallel` first",
        )
    for p in par:  # newest first
        version = p.tags.get(SOURCE_VERSION_TAG)
        if source_version is not None and version != str(source_version):
            continue
        for s in seq:
            if s.tags.get(SOURCE_VERSION_TAG) == version:
                return s.run_id, p.run_id
    wanted = f" on source version {source_version}" if source_version is not None else ""
    raise NoPairError(
        f"no sequential and parallel run on the same source version{wanted}",
        hint="run both jobs without changing the source in between",
    )


def compare_runs(instance: Any, first: str, second: str) -> Comparison:
    """Compare two runs; the one tagged sequential (else the first) is the baseline."""
    a, b = run_timing(instance, first), run_timing(instance, second)
    if a.mode == "parallel" and b.mode != "parallel":
        a, b = b, a
    estimate: list[dict[str, Any]] = []
    if a.mode != "parallel":
        costs = step_costs(instance, a)
        outside = max(a.wall_s - a.sum_steps_s, 0.0)
        estimate = what_if(costs, outside, after=tails(a, costs))
    return Comparison(sequential=a, parallel=b, what_if=estimate)


def plot(comparison: Comparison, path: str | Path) -> Path:
    """Both runs' timelines one above the other on one time axis, as a PNG."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = (comparison.sequential, comparison.parallel)
    steps = sorted({s.step for r in runs for s in r.steps})
    colours = {s: plt.cm.tab10(i % 10) for i, s in enumerate(steps)}
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    horizon = max(r.wall_s for r in runs) * 1.02 or 1
    for ax, run in zip(axes, runs, strict=True):
        rows = sorted({s.step for s in run.steps})
        for s in run.steps:
            y = rows.index(s.step)
            ax.barh(y, s.duration_s, left=s.start_offset_s, color=colours[s.step], height=0.6)
            ax.text(
                s.start_offset_s + s.duration_s, y, f" {s.duration_s:.1f}s", va="center", fontsize=8
            )
        ax.axvline(run.wall_s, color="black", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(rows)), rows)
        ax.invert_yaxis()
        ax.set_xlim(0, horizon * 1.08)
        ax.set_title(
            f"{run.mode} ({run.job}, run {run.run_id[:8]}): wall {run.wall_s:.1f}s, "
            f"overhead {run.overhead_s:.1f}s",
            fontsize=10,
        )
    axes[-1].set_xlabel("seconds since run start")
    fig.suptitle(
        f"speedup {comparison.speedup:.2f}x, parallel efficiency {comparison.efficiency:.0%}",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
