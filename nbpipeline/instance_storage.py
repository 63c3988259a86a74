"""Dagster's SQLite storage with concurrency-pool claims that are atomic across processes.

Dagster's SQL storage claims a pool slot in two statements: find a free slot row, then write the
run and step into it. The `SELECT` says `FOR UPDATE`, but SQLite ignores that clause and pysqlite
runs the `SELECT` outside any transaction, so two processes that claim at
the same moment can both read the same free slot and both "claim" it: a pool of limit 1 then runs
two steps at once. nbpipeline's overlap test saw exactly that (a sequential and a parallel run
MERGEd into `daily_sales` together, neither logging a wait). Pending-step assignment has the same
read-then-write shape.

The fix is local and boring: every call that reads and changes pool state runs under one
host-wide lock (a `filelock` lock file beside the event log databases, which are on this host by
definition of SQLite; `filelock` is cross-platform, so this module loads on Windows too). The
databases, their layout and every other behaviour are Dagster's own, so an instance can switch to
or from this class at any time. `dagster.yaml` selects it through
Dagster's `instance_class` hook, whose defaults are computed from the instance's own folder (so
`DagsterInstance.from_config(path)` and `DAGSTER_HOME` both work):

    instance_class:
      module: nbpipeline.instance_storage
      class: PoolSafeInstance
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import yaml
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.event_log import SqliteEventLogStorage
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage, _event_logs_directory
from dagster._serdes import ConfigurableClassData
from filelock import FileLock

F = TypeVar("F", bound=Callable[..., Any])

LOCK_FILE = ".nbpipeline-concurrency.lock"


class HostLock:
    """A lock across the processes of this host (a `filelock` file lock), re-entrant within a
    process.

    Re-entrant because freeing a slot assigns the next pending step, and both are locked. The
    thread lock serialises this process's threads; the file lock (shared by them, not per
    thread) serialises processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.RLock()
        self._file_lock = FileLock(str(path), thread_local=False)

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock, self._file_lock:
            yield


def _locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.pool_lock.held():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


#: The event log storage methods that read and then change pool state (slots, pending steps).
POOL_METHODS = (
    "claim_concurrency_slot",
    "free_concurrency_slot_for_step",
    "free_concurrency_slots_for_run",
    "assign_pending_steps",
    "initialize_concurrency_limit_to_default",
    "set_concurrency_slots",
    "delete_concurrency_limit",
    # Fills the limits table from the slots table when it is empty; unlocked, a read of the pools
    # (the UI, a run's launch) can insert the same limit rows as a locked initialisation.
    "_reconcile_concurrency_limits_from_slots",
)


def lock_pool_methods(cls: type, base: type) -> type:
    """Wrap `base`'s POOL_METHODS on `cls` so each runs under `self.pool_lock.held()`."""
    for name in POOL_METHODS:
        setattr(cls, name, _locked(getattr(base, name)))
    return cls


class PoolSafeSqliteEventLogStorage(SqliteEventLogStorage):
    """`SqliteEventLogStorage` whose pool reads-then-writes hold a host-wide lock."""

    def __init__(self, base_dir: str, inst_data: Any = None) -> None:
        super().__init__(base_dir, inst_data=inst_data)
        self.pool_lock = HostLock(Path(self._base_dir) / LOCK_FILE)


lock_pool_methods(PoolSafeSqliteEventLogStorage, SqliteEventLogStorage)


class PoolSafeSqliteStorage(DagsterSqliteStorage):
    """Dagster's default SQLite storage (same files under `base_dir`), with pool-safe event logs."""

    def __init__(self, base_dir: str, inst_data: Any = None) -> None:
        super().__init__(base_dir, inst_data=inst_data)
        self._event_log_storage = PoolSafeSqliteEventLogStorage(_event_logs_directory(base_dir))

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> PoolSafeSqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)


class PoolSafeInstance(dg.DagsterInstance):
    """A Dagster instance whose default storage is `PoolSafeSqliteStorage` in its own folder.

    Everything else is Dagster's default; storage entries in dagster.yaml still override it
    (e.g. PostgreSQL, see nbpipeline/postgres_storage.py)."""

    @classmethod
    def config_schema(cls) -> dict[str, Any]:
        return {}  # no settings of its own

    @staticmethod
    def config_defaults(base_dir: str) -> dict[str, Any]:
        defaults = dict(InstanceRef.config_defaults(base_dir))
        defaults["storage"] = ConfigurableClassData(
            __name__,
            PoolSafeSqliteStorage.__name__,
            yaml.dump({"base_dir": base_dir}, default_flow_style=False),
        )
        return defaults
