"""The project's Dagster storage: Dagster's SQLite files, with pool claims atomic across processes.

Processes claim one pool slot at the same moment (a barrier releases them together), as the steps
of two runs launched together do. With Dagster's plain SQLite storage several of them can get the
single slot (seen: 3 and 5 of 8); with the project's storage exactly one does.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest

from nbpipeline.instance import PROJECT_DAGSTER_YAML
from nbpipeline.instance_storage import (
    PoolSafeInstance,
    PoolSafeSqliteEventLogStorage,
    PoolSafeSqliteStorage,
)
from nbpipeline_tests.helpers import (
    CLAIMERS,
    PLAIN_YAML,
    POOL,
    claimed_together,
    release_hands_the_slot_to_one,
)


def _home(tmp_path: Path, project: bool) -> Path:
    home = tmp_path / ("project" if project else "plain")
    home.mkdir()
    if project:
        shutil.copyfile(PROJECT_DAGSTER_YAML, home / "dagster.yaml")
    else:
        (home / "dagster.yaml").write_text(PLAIN_YAML)
    return home


def test_project_storage_is_dagster_sqlite_in_the_same_files(tmp_path, monkeypatch) -> None:
    home = _home(tmp_path, project=True)
    # Opened by path while DAGSTER_HOME points elsewhere: the storage follows the path.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance, PoolSafeInstance)
        assert isinstance(instance.get_ref().storage, PoolSafeSqliteStorage)
        assert isinstance(instance.event_log_storage, PoolSafeSqliteEventLogStorage)
        assert instance.event_log_storage.supports_global_concurrency_limits
        assert instance.global_op_concurrency_default_limit == 1
        run = instance.create_run_for_job(
            dg.GraphDefinition("g").to_job(), run_id=str(uuid.uuid4())
        )
        assert instance.get_run_by_id(run.run_id) is not None
    # Dagster's default layout, so an instance can switch to or from this storage.
    assert (home / "history" / "runs.db").exists()
    assert (home / "history" / "runs" / "index.db").exists()
    assert not (tmp_path / "history").exists()


def test_one_claim_wins_a_single_slot_and_its_release_hands_it_on(tmp_path, monkeypatch) -> None:
    # Three fresh instances, so a lucky interleaving cannot hide a race (the plain storage
    # over-claims in most such rounds, see below).
    for attempt in range(3):
        sub = tmp_path / f"attempt{attempt}"
        sub.mkdir()
        home = _home(sub, project=True)
        assert claimed_together(home, monkeypatch) == 1, f"round {attempt}"
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        waiting = release_hands_the_slot_to_one(storage)
        others = [p for p in waiting if p.assigned_timestamp is None]
        assert not storage.claim_concurrency_slot(POOL, others[0].run_id, "Notebook1").is_claimed


def test_plain_dagster_sqlite_storage_lets_several_claims_win(tmp_path, monkeypatch) -> None:
    """Why the project's storage exists: if Dagster's own SQLite claim becomes atomic, this fails
    and instance_storage.py can go."""
    for attempt in range(10):
        sub = tmp_path / f"attempt{attempt}"
        sub.mkdir()
        home = _home(sub, project=False)
        if claimed_together(home, monkeypatch) > 1:
            return
    pytest.fail(f"10 rounds of {CLAIMERS} simultaneous claims never over-claimed the plain storage")
