"""The one progress printer: lines to stderr, so stdout carries only a command's result."""

from __future__ import annotations

import sys


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # noqa: T201 - progress is the output
