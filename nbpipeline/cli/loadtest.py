"""`python -m nbpipeline.cli.loadtest`: the load test from the shell (nbpipeline.perf.loadtest)."""

from __future__ import annotations

import argparse
import json
import sys

from nbpipeline.errors import NbPipelineError
from nbpipeline.perf import loadtest as loadtest_module
from nbpipeline.perf.loadtest import format_table, loadtest
from nbpipeline.progress import progress


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m nbpipeline.cli.loadtest`."""
    parser = argparse.ArgumentParser(
        prog="python -m nbpipeline.cli.loadtest", description=loadtest_module.__doc__
    )
    parser.add_argument("--rows", type=int, default=20_000_000, help="volume phase rows (0: skip)")
    parser.add_argument("--runs", type=int, default=20, help="series phase runs (0: skip)")
    parser.add_argument("--series-rows", type=int, default=100_000, help="series source rows")
    parser.add_argument("--changes", type=float, default=0.02, help="change batch fraction")
    parser.add_argument("--schema", default="loadtest", help="schema for the sources and outputs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    try:
        from nbpipeline.instance import get_instance

        get_instance(progress).dispose()  # DAGSTER_HOME and pools ready before any run
        result = loadtest(
            rows=args.rows,
            runs=args.runs,
            series_rows=args.series_rows,
            changes=args.changes,
            schema=args.schema,
        )
    except NbPipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
