"""The Dagster instance nbpipeline's commands use: DAGSTER_HOME, or one under NBPIPELINE_HOME.

Runs persist in DAGSTER_HOME so the UI and `nbpipeline run` see the same runs. When DAGSTER_HOME
is not set, the commands use `$NBPIPELINE_HOME/dagster_home` (created on first use, with the
project's dagster.yaml copied in if it has none) and say so, and set DAGSTER_HOME for themselves
and the processes they start.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nbpipeline import settings
from nbpipeline.errors import ConfigError

if TYPE_CHECKING:
    import dagster as dg

DAGSTER_HOME_ENV = "DAGSTER_HOME"
PROJECT_DAGSTER_YAML = settings.PROJECT_ROOT / "dagster.yaml"
WORKSPACE_YAML = settings.PROJECT_ROOT / "workspace.yaml"


def default_dagster_home() -> Path:
    """`$NBPIPELINE_HOME/dagster_home`, the instance used when DAGSTER_HOME is not set."""
    return settings.home() / "dagster_home"


def ensure_dagster_home(progress: Callable[[str], None] | None = None) -> Path:
    """The DAGSTER_HOME to use, made ready; sets os.environ["DAGSTER_HOME"] if it was unset."""
    raw = os.environ.get(DAGSTER_HOME_ENV, "").strip()
    if raw:
        path = Path(raw).expanduser()
        if not path.is_absolute():
            # Dagster itself refuses a relative DAGSTER_HOME; say so in one line.
            raise ConfigError(f"{DAGSTER_HOME_ENV}={raw!r} must be an absolute path")
        path.mkdir(parents=True, exist_ok=True)
        if progress and not (path / "dagster.yaml").exists():
            progress(
                f"Note: {path}/dagster.yaml is missing, so the per-table concurrency pools are "
                f"not configured (copy {PROJECT_DAGSTER_YAML} there)"
            )
        return path
    path = default_dagster_home()
    path.mkdir(parents=True, exist_ok=True)
    target = path / "dagster.yaml"
    if not target.exists() and PROJECT_DAGSTER_YAML.exists():
        shutil.copyfile(PROJECT_DAGSTER_YAML, target)
    os.environ[DAGSTER_HOME_ENV] = str(path)
    if progress:
        progress(f"DAGSTER_HOME is not set; using {path}")
    return path


def pool_names() -> list[str]:
    """Every concurrency pool the definitions use (one per table writer)."""
    from nbpipeline.backend import NOTEBOOK_NAMES
    from nbpipeline.tables import pool_name

    return [pool_name(nb) for nb in NOTEBOOK_NAMES]


def ensure_pools(instance: dg.DagsterInstance) -> None:
    """Create the pools' slots (at the instance's default limit) before any run claims them.

    Dagster creates a pool's slots on the first claim. On SQLite storage, two runs doing that at
    the same moment can each insert a slot (count-then-insert in a deferred transaction), so a
    pool of limit 1 briefly has 2 slots and two runs MERGE the same table at once. Initialising
    here, under a file lock, leaves one slot per pool before anything runs. Idempotent, and it also
    repairs a pool whose slot count drifted from the default limit. (The project's
    PoolSafeInstance already locks these calls; this lock still guards an instance whose
    dagster.yaml predates it.)
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    if instance.global_op_concurrency_default_limit is None:
        return  # no default limit configured: pools are unlimited, nothing to create
    root = instance.root_directory
    lock_path = Path(root) / ".nbpipeline-pools.lock"
    from filelock import FileLock

    with FileLock(str(lock_path)):
        for pool in pool_names():
            storage.initialize_concurrency_limit_to_default(pool)


def get_instance(progress: Callable[[str], None] | None = None) -> dg.DagsterInstance:
    """The persistent Dagster instance in the (ensured) DAGSTER_HOME, its pools created."""
    import dagster as dg
    from dagster._core.storage.event_log import SqliteEventLogStorage

    from nbpipeline.instance_storage import PoolSafeSqliteEventLogStorage

    path = ensure_dagster_home(progress)
    instance = dg.DagsterInstance.get()
    storage = instance.event_log_storage
    if (
        progress
        and isinstance(storage, SqliteEventLogStorage)
        and not isinstance(storage, PoolSafeSqliteEventLogStorage)
        and (path / "dagster.yaml").exists()
    ):
        progress(
            f"Note: {path}/dagster.yaml uses Dagster's plain SQLite storage, whose pool claims can "
            f"let two runs write one table at once; copy {PROJECT_DAGSTER_YAML} there"
        )
    ensure_pools(instance)
    return instance
