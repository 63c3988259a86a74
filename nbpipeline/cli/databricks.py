"""`nbpipeline databricks ...`: deploy, diff, bundle and run the Databricks-native jobs.

The main CLI calls `add_subcommands(subparsers)`; every leaf parser sets `func(args) -> int`.
Errors are raised as `NbPipelineError` subclasses; the main CLI prints them and exits 2.

Credentials come from the environment only (DATABRICKS_HOST plus DATABRICKS_TOKEN or any other
method of the Databricks SDK's unified auth); `deploy --dry-run` needs none.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only the job names here: the Databricks SDK and the job specs are imported by the commands
# that use them, so `nbpipeline --help` and the local commands do not pay seconds for them.
from nbpipeline.databricks.kinds import DEFAULT_NODE_TYPES, JOB_KEYS, JOB_NAMES, LAYOUTS
from nbpipeline.errors import ConfigError

if TYPE_CHECKING:
    from nbpipeline.databricks.jobs import JobOptions

Command = Callable[[argparse.Namespace], int]


def add_subcommands(subparsers: Any) -> None:
    """Add `databricks {deploy,diff,run}` to the main CLI's subparsers action."""
    parser = subparsers.add_parser(
        "databricks",
        help="deploy, diff and run the Databricks-native jobs",
        description=(
            "Manage the Databricks-native jobs: nbpipeline-sequential and nbpipeline-parallel "
            "(the notebooks as job tasks), nbpipeline-orchestration-sequential and "
            "nbpipeline-orchestration-parallel (the orchestration notebooks), and "
            "nbpipeline-comparison (both orchestrations on one source version). "
            "Needs DATABRICKS_HOST and credentials (DATABRICKS_TOKEN or another Databricks SDK "
            "auth method), except for `deploy --dry-run`."
        ),
    )
    commands = parser.add_subparsers(dest="databricks_command", metavar="COMMAND", required=True)

    settings = argparse.ArgumentParser(add_help=False)
    group = settings.add_argument_group("job settings")
    group.add_argument(
        "--workspace-dir",
        metavar="PATH",
        help="workspace folder for the notebooks (default /Users/<you>/nbpipeline, "
        "or $NBPIPELINE_DATABRICKS_WORKSPACE_DIR; /Shared/... only if you ask for it)",
    )
    group.add_argument(
        "--source-table", metavar="TABLE", help="source_table widget (default nbpipeline.orders)"
    )
    group.add_argument(
        "--target-schema",
        metavar="SCHEMA",
        help="target_schema widget (default empty: the source table's schema)",
    )
    group.add_argument(
        "--high-value-threshold",
        metavar="AMOUNT",
        help="Notebook4's high_value_threshold widget (default: the notebook's own default)",
    )
    group.add_argument(
        "--layout",
        choices=(*LAYOUTS, "all"),
        default="all",
        help="which jobs: task-graph (nbpipeline-sequential/-parallel), orchestration (the "
        "orchestration notebooks' jobs and nbpipeline-comparison), or all (default)",
    )
    group.add_argument(
        "--only", choices=JOB_KEYS, help="just this job (by default every job of --layout)"
    )
    group.add_argument(
        "--compute",
        metavar="KIND",
        default="serverless",
        help="serverless (default), job-cluster, or existing:<cluster-id>",
    )
    group.add_argument(
        "--spark-version", metavar="VERSION", help="job cluster runtime (default 17.3.x-scala2.13)"
    )
    group.add_argument(
        "--node-type-id",
        metavar="TYPE",
        help="job cluster node type (default by the workspace's cloud: "
        + ", ".join(f"{c} {t}" for c, t in DEFAULT_NODE_TYPES.items())
        + ")",
    )
    group.add_argument(
        "--num-workers", metavar="N", type=int, help="job cluster workers (default 1)"
    )
    group.add_argument(
        "--cron",
        metavar="EXPR",
        help="schedule the comparison job (sequential, then parallel orchestration, on one "
        "source version) as a standard 5-field cron, e.g. '30 6 * * MON-FRI'",
    )
    for key in ("sequential", "parallel", "orchestration-sequential", "orchestration-parallel"):
        group.add_argument(
            f"--cron-{key}",
            metavar="EXPR",
            dest=f"cron_{key.replace('-', '_')}",
            help=f"schedule {JOB_NAMES[key]} (never at the same minute as another job)",
        )
    group.add_argument(
        "--timezone",
        metavar="TZ",
        default="UTC",
        help="IANA time zone of the schedules (default UTC)",
    )
    pause = group.add_mutually_exclusive_group()
    pause.add_argument(
        "--paused",
        dest="paused",
        action="store_true",
        default=True,
        help="create the schedules paused (default)",
    )
    pause.add_argument(
        "--unpaused", dest="paused", action="store_false", help="create the schedules active"
    )
    group.add_argument(
        "--notify",
        metavar="EMAIL",
        action="append",
        default=[],
        help="e-mail this address when a run fails (repeatable)",
    )
    group.add_argument(
        "--run-as",
        metavar="WHO",
        help="run the jobs as this user (e-mail) or service principal (application id)",
    )
    group.add_argument(
        "--param",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="a job parameter with its default (repeatable); Databricks passes job parameters "
        "to every notebook task as widget values",
    )

    p_deploy = commands.add_parser(
        "deploy",
        parents=[settings],
        help="upload the notebooks and create or update the jobs",
        description="Upload changed notebooks, then create or fully replace the jobs (by name).",
    )
    p_deploy.add_argument(
        "--dry-run",
        action="store_true",
        help="print the job settings; change nothing, no credentials needed",
    )
    p_deploy.add_argument("--json", action="store_true", help="machine-readable output")
    p_deploy.set_defaults(func=cmd_deploy)

    p_diff = commands.add_parser(
        "diff",
        parents=[settings],
        help="show how the deployed jobs differ from what deploy would write",
        description=(
            "Exit status: 0 if every job is up to date and the workspace notebooks are what it "
            "was deployed with, 1 otherwise."
        ),
    )
    p_diff.add_argument("--json", action="store_true", help="machine-readable output")
    p_diff.set_defaults(func=cmd_diff)

    p_bundle = commands.add_parser(
        "bundle",
        parents=[settings],
        help="write a Databricks Asset Bundle (databricks.yml) with the notebooks and the jobs",
        description=(
            "Write a Databricks Asset Bundle to --out: databricks.yml with dev and prod targets, "
            "the notebooks under src/, and the same jobs as deploy under resources/. Deploy it "
            "with the Databricks CLI: databricks bundle deploy -t dev. Needs no credentials."
        ),
    )
    p_bundle.add_argument("--out", metavar="DIR", required=True, help="folder to write into")
    p_bundle.add_argument(
        "--host", metavar="URL", help="workspace URL for the targets (default $DATABRICKS_HOST)"
    )
    p_bundle.set_defaults(func=cmd_bundle)

    p_run = commands.add_parser(
        "run",
        help="trigger a deployed job, wait, and print its task timings",
        description=(
            "Trigger the deployed job (run-now) and wait for it. Runs the notebooks as deployed; "
            "run `deploy` first to publish local changes. Ctrl-C cancels the Databricks run."
        ),
    )
    p_run.add_argument("mode", choices=JOB_KEYS, help="which job: " + ", ".join(JOB_NAMES.values()))
    p_run.add_argument("--json", action="store_true", help="print the run report as JSON")
    p_run.add_argument(
        "--timeout",
        type=float,
        default=4 * 3600,
        metavar="SECONDS",
        help="cancel the run if it has not finished after this long (default 14400)",
    )
    p_run.add_argument(
        "--poll-initial",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="first wait between status checks (default 1)",
    )
    p_run.add_argument(
        "--poll-max",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="longest wait between status checks (default 15)",
    )
    p_run.set_defaults(func=cmd_run)


def _pairs(values: list[str], what: str) -> tuple[tuple[str, str], ...]:
    out = []
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"invalid {what} {item!r}: expected NAME=VALUE")
        out.append((name.strip(), value))
    return tuple(out)


def _options(args: argparse.Namespace) -> JobOptions:
    from nbpipeline.databricks.jobs import JobOptions

    crons = tuple(
        (key, value)
        for key in ("sequential", "parallel", "orchestration-sequential", "orchestration-parallel")
        if (value := getattr(args, f"cron_{key.replace('-', '_')}", None)) is not None
    )
    return JobOptions.from_env(
        workspace_dir=args.workspace_dir,
        source_table=args.source_table,
        target_schema=args.target_schema,
        high_value_threshold=args.high_value_threshold,
        layouts=LAYOUTS if args.layout == "all" else (args.layout,),
        compute=args.compute,
        spark_version=args.spark_version,
        node_type_id=args.node_type_id,
        num_workers=args.num_workers,
        cron=args.cron,
        crons=crons,
        timezone=args.timezone,
        paused=args.paused,
        notify=tuple(args.notify),
        run_as=args.run_as,
        parameters=_pairs(args.param, "--param"),
    )


def _modes(args: argparse.Namespace, options: JobOptions) -> tuple[str, ...]:
    return (args.only,) if args.only else options.modes()


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _write_json(value: Any) -> None:
    _write(json.dumps(value, indent=2, sort_keys=True))


def _api_errors_reported(command: Command) -> Command:
    """The command with a Databricks API failure reported as one line (see
    `client.api_errors_reported`)."""

    @functools.wraps(command)
    def reported(args: argparse.Namespace) -> int:
        from nbpipeline.databricks.client import api_errors_reported

        with api_errors_reported():
            return command(args)

    return reported


@contextlib.contextmanager
def _progress_logger(enabled: bool = True) -> Iterator[logging.Logger]:
    """A logger that shows progress on stderr for this command only.

    Own handler, no propagation: the command's progress is visible whatever logging the main CLI
    configured, and stdout stays clean for --json.
    """
    logger = logging.getLogger("nbpipeline.cli.databricks")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if enabled:
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)


@_api_errors_reported
def cmd_deploy(args: argparse.Namespace) -> int:
    """`databricks deploy`: returns 0, or raises NbPipelineError."""
    from nbpipeline.databricks.client import command_workspace_client
    from nbpipeline.databricks.deploy import deploy, prepared
    from nbpipeline.databricks.jobs import all_job_settings, describe_job_settings

    options = _options(args)
    if args.dry_run:
        options, _ = prepared(None, options)
        settings = all_job_settings(options, _modes(args, options))
        if args.json:
            _write_json(settings)
        else:
            _write("\n".join(describe_job_settings(s) for s in settings.values()))
            _write("dry run: nothing was uploaded or changed (use --json for the exact settings)")
        if "{user}" in options.workspace_dir:
            sys.stderr.write("note: {user} becomes your workspace user name at deploy\n")
        return 0
    _, ws = command_workspace_client()
    with _progress_logger(not args.json) as log:
        result = deploy(ws, options, modes=_modes(args, options), log=log)
    if args.json:
        _write_json(result.as_dict())
    else:
        _write(result.format_text())
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """`databricks bundle --out DIR`: writes the bundle; 0, or raises NbPipelineError."""
    from nbpipeline.databricks.bundle import write_bundle

    options = _options(args)
    if args.host:
        options = replace(options, host=args.host).validated()
    written = write_bundle(Path(args.out), options, modes=_modes(args, options))
    _write(f"wrote a Databricks Asset Bundle to {args.out} ({len(written)} files)")
    _write(f"deploy it: cd {args.out} && databricks bundle deploy -t dev")
    return 0


@_api_errors_reported
def cmd_diff(args: argparse.Namespace) -> int:
    """`databricks diff`: 0 when every job matches what deploy would write, 1 otherwise."""
    from nbpipeline.databricks.client import command_workspace_client
    from nbpipeline.databricks.deploy import diff_jobs

    options = _options(args)
    _, ws = command_workspace_client()
    diffs = diff_jobs(ws, options, _modes(args, options))
    if args.json:
        _write_json([d.as_dict() for d in diffs])
    else:
        _write("\n".join(d.format_text() for d in diffs))
    return 0 if all(d.in_sync for d in diffs) else 1


@_api_errors_reported
def cmd_run(args: argparse.Namespace) -> int:
    """`databricks run MODE`: 0 on success; a failed run raises NotebookError after the report."""
    from nbpipeline.databricks.client import command_workspace_client
    from nbpipeline.databricks.polling import PollPolicy
    from nbpipeline.databricks.runs import failure_error, run_deployed_job

    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0 (got {args.timeout})")
    if not 0 < args.poll_initial <= args.poll_max:
        raise ConfigError("--poll-initial must be > 0 and <= --poll-max")
    _, ws = command_workspace_client()
    with _progress_logger(not args.json) as log:
        report = run_deployed_job(
            ws,
            args.mode,
            timeout_seconds=args.timeout,
            policy=PollPolicy(initial=args.poll_initial, maximum=args.poll_max),
            log=log,
        )
    if args.json:
        _write_json(report.as_dict())
    else:
        _write(report.format_text())
    if not report.succeeded:
        raise failure_error(report)
    return 0
