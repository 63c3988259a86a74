"""Where nbpipeline keeps its data, and where the notebooks live.

All run data (Delta tables, the metastore, engine logs, cached JARs) lives under one home folder:
`$NBPIPELINE_HOME`, or `~/.nbpipeline` per user. Nothing is ever written relative to the current
working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE_TABLE = "nbpipeline.orders"


def positive_int_env(name: str, default: int, *, what: str = "integer") -> int:
    """An environment setting that must be a positive integer; unset or empty: `default`.

    A bad value is a ConfigError naming the variable and the default to fall back to.
    """
    from nbpipeline.errors import ConfigError

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"{name}={raw!r} is not a positive {what}",
            hint=f"unset it for the default ({default:,})",
        )
    return value


def home() -> Path:
    """The nbpipeline home folder (created on first use), always absolute."""
    raw = os.environ.get("NBPIPELINE_HOME")
    path = Path(raw).expanduser() if raw else Path.home() / ".nbpipeline"
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def notebooks_dir() -> Path:
    """The folder holding Notebook1..4 (`NBPIPELINE_NOTEBOOKS_DIR` overrides)."""
    raw = os.environ.get("NBPIPELINE_NOTEBOOKS_DIR")
    return Path(raw).expanduser().resolve() if raw else PROJECT_ROOT / "notebooks"


def cache_dir() -> Path:
    """Per-user cache shared by every NBPIPELINE_HOME (resolved JARs live here)."""
    raw = os.environ.get("NBPIPELINE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    base = Path(raw).expanduser() if raw else Path.home() / ".cache"
    path = (base / "nbpipeline" if not os.environ.get("NBPIPELINE_CACHE_DIR") else base).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
