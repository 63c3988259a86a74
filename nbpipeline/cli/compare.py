"""`nbpipeline compare` and `nbpipeline bench`: what parallel execution buys, and where time goes."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from nbpipeline.errors import ConfigError
from nbpipeline.progress import progress

if TYPE_CHECKING:
    from nbpipeline.perf.comparison import Comparison


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare a sequential and a parallel run: per-step timings, speedup, what-if on N cores",
    )
    p.add_argument("--runs", nargs=2, metavar=("A", "B"), help="two Dagster run ids")
    p.add_argument(
        "--databricks-runs",
        nargs="+",
        type=int,
        metavar="RUN_ID",
        help="Databricks job run ids: one run of nbpipeline-comparison, or a sequential and a "
        "parallel run of any nbpipeline job (`nbpipeline databricks run ...`)",
    )
    p.add_argument("--source-version", help="pair runs on this source version (default: newest)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="FILE", help="draw both timelines to FILE (PNG)")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser(
        "bench",
        help="time the two jobs, the orchestration notebooks, per-process Spark and the reference",
    )
    p.add_argument("--rows", type=int, required=True, help="source rows (seeded once, reused)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; modes are interleaved")
    p.add_argument("--seed", type=int, default=42, help="seed of the source data")
    p.add_argument("--modes", help="comma-separated subset of modes (default: all six)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench)


def _databricks_pair(*run_ids: int) -> Comparison:
    from nbpipeline.databricks.client import command_workspace_client
    from nbpipeline.databricks.runs import compare_job_runs

    if len(run_ids) > 2:
        raise ConfigError("--databricks-runs takes one comparison run id or two run ids")
    _, ws = command_workspace_client()
    return compare_job_runs(ws, run_ids)


def cmd_compare(args: argparse.Namespace) -> int:
    from nbpipeline.perf import comparison

    if args.runs and args.databricks_runs:
        raise ConfigError("give --runs or --databricks-runs, not both")
    if args.databricks_runs:
        result = _databricks_pair(*args.databricks_runs)
    else:
        from nbpipeline.instance import get_instance

        instance = get_instance(progress)
        first, second = args.runs or comparison.latest_pair(instance, args.source_version)
        result = comparison.compare_runs(instance, first, second)
    if args.plot:
        path = comparison.plot(result, args.plot)
        progress(f"Wrote {path}")
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nbpipeline.perf import bench

    modes = tuple(m.strip() for m in args.modes.split(",")) if args.modes else bench.BENCH_MODES
    result = bench.bench(
        rows=args.rows,
        repeat=args.repeat,
        seed=args.seed,
        modes=modes,
        progress=progress,
    )
    print(json.dumps(result, indent=2) if args.json else bench.format_table(result))
    return 0
