"""The `nbpipeline` command line.

Every command prints progress to stderr and results to stdout; an error is one line,
`error: ...`, plus a hint naming the next command to try, and exit code 2 (1 for a failed run).
Heavy imports (Spark, Dagster) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from nbpipeline.errors import NbPipelineError


class _OneLineHelpFormatter(argparse.HelpFormatter):
    """Lists each command with its help on one line (argparse wraps at the terminal width and
    moves the help of a long command name to its own line, which splits the list)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=24, width=110)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures command names without their indent, so the longest one
        # ("databricks") would not fit its column: reserve room for it.
        self._action_max_length = max(self._action_max_length, 16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbpipeline",
        description="Run the nbpipeline notebooks on local Spark + Delta or Databricks.",
        epilog=(
            "First time? `nbpipeline run parallel` starts the local engine and seeds a small "
            "source if there is none. Every command has --help."
        ),
        formatter_class=_OneLineHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_commands(sub)
    return parser


def _add_commands(sub: Any) -> None:
    """Each command group lives in its own module; the order here is the order `--help` lists."""
    from nbpipeline.cli import compare, databricks, local, pipeline

    for module in (local, pipeline, compare, databricks):
        module.add_subcommands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from nbpipeline.redact import redacting_std_streams

    # Everything the CLI prints (progress, errors, a traceback) passes through the redaction.
    with redacting_std_streams():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NbPipelineError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
