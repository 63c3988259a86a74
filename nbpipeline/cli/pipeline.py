"""`nbpipeline run sequential|parallel` and `nbpipeline ui`: the Dagster jobs from the shell.

`run` executes a job against the same Dagster instance the UI reads (DAGSTER_HOME, or
`$NBPIPELINE_HOME/dagster_home`), prints each step's progress to stderr, then the run id on
stdout. It exits 1 with the failing step's error when the run fails, 2 on bad input (before
anything is launched). `ui` runs `dagster dev` in the project root on that same instance.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from nbpipeline.cli.params import parse_params
from nbpipeline.progress import progress
from nbpipeline.runs import build_run_config, run_pipeline_job, seed_default_source_if_missing


def add_subcommands(subparsers: Any) -> None:
    """Add `run` and `ui` to the main CLI's subparsers action."""
    from nbpipeline.settings import DEFAULT_SOURCE_TABLE

    p = subparsers.add_parser(
        "run",
        help="run the four notebooks as a Dagster job (sequential or parallel)",
        description=(
            "Run the sequential_notebooks or parallel_notebooks job on the Dagster instance the "
            "UI reads (DAGSTER_HOME, else $NBPIPELINE_HOME/dagster_home). Prints step progress "
            "to stderr and the run id to stdout; exits 1 if the run fails."
        ),
    )
    p.add_argument("mode", choices=["sequential", "parallel"], help="which job to run")
    p.add_argument(
        "--source",
        metavar="TABLE",
        help=f"source table for every notebook (default {DEFAULT_SOURCE_TABLE})",
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="notebook widget value, given to every notebook that declares it (repeatable)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="parallel: steps at once (default $NBPIPELINE_MAX_CONCURRENT or 4)",
    )
    p.add_argument(
        "--timeout", type=int, metavar="SECONDS", help="per-notebook timeout (default 3600)"
    )
    p.add_argument(
        "--dagster-log",
        action="store_true",
        help="also print Dagster's own event log lines (DEBUG level) to stderr",
    )
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "ui",
        help="start the Dagster UI (dagster dev) on the same instance as `nbpipeline run`",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    p.set_defaults(func=cmd_ui)


# --------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    run_config = build_run_config(
        args.mode,
        source=args.source,
        params=parse_params(args.param),
        max_concurrent=args.max_concurrent,
        timeout_seconds=args.timeout,
    )
    # Load (and so validate) the definitions first: bad settings (schedule, backend) are refused
    # before anything is written, the first-run seeding included.
    from nbpipeline import definitions, reachability
    from nbpipeline.defs.resources import NOTEBOOK_BACKEND_KEY

    # One reachability check per run, before a run is created or a source seeded: a wrong
    # address or credential is reported in seconds, and the steps do not each wait it out.
    reachability.check_backend((definitions.defs.resources or {})[NOTEBOOK_BACKEND_KEY])
    seed_default_source_if_missing(run_config)
    if not args.dagster_log:
        # The progress lines below say what happened; Dagster's console logger would repeat
        # every event. The event log (what the UI shows) keeps everything either way.
        run_config["loggers"] = {"console": {"config": {"log_level": "CRITICAL"}}}
    result = run_pipeline_job(args.mode, run_config)
    print(result["run_id"])
    if not result["success"]:
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    failed = result["failed_checks"]
    if result["unevaluated_checks"]:
        unevaluated = result["unevaluated_checks"]
        progress(f"note: {len(unevaluated)} asset check(s) not evaluated: {', '.join(unevaluated)}")
    if failed:
        progress(f"warning: {len(failed)} asset check(s) failed: {', '.join(failed)}")
    return 0


# --------------------------------------------------------------------------- ui


def cmd_ui(args: argparse.Namespace) -> int:
    # Load (and so validate) the definitions before anything is written or started.
    from nbpipeline import definitions  # noqa: F401
    from nbpipeline.instance import WORKSPACE_YAML, get_instance
    from nbpipeline.settings import PROJECT_ROOT

    # Creates DAGSTER_HOME if needed and the pools' slots before the UI launches any run.
    with get_instance(progress) as instance:
        home = Path(instance.root_directory)
    # A newcomer's first click, "Materialize all", then has a source to read.
    seed_default_source_if_missing(None)
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(WORKSPACE_YAML),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    progress(f"Starting the Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home})")
    # `dagster dev` warns about the dagster.yaml in the project root: that file is the template
    # copied into DAGSTER_HOME, so the warning is expected.
    # The project root holds workspace.yaml and is the code location's working directory.
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env={**os.environ, "DAGSTER_HOME": str(home)})
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached `dagster dev` too (same process group); let it shut down cleanly.
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            return proc.wait()
