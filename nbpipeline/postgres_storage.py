"""Dagster's PostgreSQL event log storage with concurrency-pool claims atomic across hosts.

dagster-postgres 0.29.27 runs every statement in autocommit, so the row lock of its claim's
`SELECT ... FOR UPDATE` ends before the `UPDATE` that takes the slot, and the `UPDATE` does not
check that the slot is still free: two runs claiming at the same moment can both get a pool of
limit 1 (2 to 4 of 8 simultaneous claims won in a reproduction; the test
`test_plain_dagster_postgres_storage_lets_several_claims_win` keeps checking). The same pool
methods as on SQLite therefore run under one lock, here a PostgreSQL session advisory lock, which
every machine sharing the database sees. Tables and every other behaviour are dagster-postgres's
own. Selected by docs/dagster-postgres.yaml:

    event_log_storage:
      module: nbpipeline.postgres_storage
      class: PoolSafePostgresEventLogStorage
      config: {postgres_db: ...}
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy as db
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

from nbpipeline.instance_storage import lock_pool_methods

#: The advisory lock's key (64-bit, any constant the database's other users do not take):
#: the bytes of "nbpools".
ADVISORY_KEY = int.from_bytes(b"nbpools", "big")


class AdvisoryLock:
    """A PostgreSQL session advisory lock on a connection of its own, re-entrant in a process.

    Re-entrant because freeing a slot assigns the next pending step, and both are locked. The
    pool work itself runs on the storage's usual connections while this one holds the lock."""

    def __init__(self, engine: Callable[[], db.Engine]) -> None:
        self._engine = engine
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._conn: db.Connection | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                conn = self._engine().connect()
                try:
                    conn.execute(db.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_KEY})
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._conn is not None:
                    conn, self._conn = self._conn, None
                    try:
                        conn.execute(
                            db.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY}
                        )
                    finally:
                        conn.close()  # a closed session releases its advisory locks anyway


class PoolSafePostgresEventLogStorage(PostgresEventLogStorage):
    """`PostgresEventLogStorage` whose pool reads-then-writes hold a database-wide lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The engine is looked up at each use: the webserver replaces it with a pooled one.
        self.pool_lock = AdvisoryLock(lambda: self._engine)

    @classmethod
    def from_config_value(
        cls, inst_data: Any, config_value: Mapping[str, Any]
    ) -> PoolSafePostgresEventLogStorage:
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )


lock_pool_methods(PoolSafePostgresEventLogStorage, PostgresEventLogStorage)
_locked_initialize = PoolSafePostgresEventLogStorage.initialize_concurrency_limit_to_default


def _initialize_once(self: PoolSafePostgresEventLogStorage, concurrency_key: str) -> bool:
    """Two processes that both saw no limit for a pool initialise it one after the other; for
    the second, dagster-postgres's insert fails on the existing row and its fallback update runs
    in the transaction PostgreSQL has already aborted. A pool already at the default limit needs
    nothing more."""
    with self.pool_lock.held():
        default = self._instance.global_op_concurrency_default_limit if self.has_instance else None
        current = next((p for p in self.get_pool_limits() if p.name == concurrency_key), None)
        if current is not None and current.from_default and current.limit == default:
            return True
        return _locked_initialize(self, concurrency_key)


PoolSafePostgresEventLogStorage.initialize_concurrency_limit_to_default = _initialize_once  # type: ignore[method-assign,assignment]
