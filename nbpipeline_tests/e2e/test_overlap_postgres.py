"""The overlap scenario (both jobs at once, plus a real schedule tick) on a team's instance:
Dagster on PostgreSQL through docs/dagster-postgres.yaml, against a real server the test starts.

Nothing here relies on the project's SQLite file lock: the instance is a plain `DagsterInstance`
whose event log is dagster-postgres's with pool claims under a PostgreSQL advisory lock. The scenario's assertions
are the SQLite test's: every run succeeds, no two runs MERGE one table at once, the outputs meet
the contract with no duplicate key.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml

from nbpipeline.instance import PROJECT_DAGSTER_YAML
from nbpipeline.instance_storage import PoolSafeInstance
from nbpipeline.postgres_storage import PoolSafePostgresEventLogStorage
from nbpipeline.settings import PROJECT_ROOT
from nbpipeline_tests.helpers import overlapping_runs_scenario
from nbpipeline_tests.postgres import postgres_server

pytestmark = [pytest.mark.spark, pytest.mark.dagster, pytest.mark.slow]

TEAM_YAML = PROJECT_ROOT / "docs" / "dagster-postgres.yaml"


@pytest.fixture
def postgres_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dg.DagsterInstance]:
    """A DAGSTER_HOME holding the team dagster.yaml, on a private PostgreSQL server."""
    with postgres_server() as pg:
        for key, value in pg.env().items():
            monkeypatch.setenv(key, value)  # the runs and the daemon inherit them
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copyfile(TEAM_YAML, home / "dagster.yaml")
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            storage = instance.event_log_storage
            assert isinstance(storage, PoolSafePostgresEventLogStorage)
            assert not isinstance(instance, PoolSafeInstance)
            assert instance.global_op_concurrency_default_limit == 1
            try:
                yield instance
            finally:
                # What the pools held at the end: tells a stuck claim from a slow machine.
                from nbpipeline.instance import pool_names

                for pool in pool_names():
                    info = storage.get_concurrency_info(pool)
                    print(
                        f"{pool}: slots {info.slot_count}, claimed "
                        f"{[(s.run_id[:8], s.step_key) for s in info.claimed_slots]}, pending "
                        f"{[(p.run_id[:8], p.step_key, p.assigned_timestamp) for p in info.pending_steps]}"
                    )


def test_team_yaml_matches_the_project_settings() -> None:
    """Beyond storage, the team file says what the project's dagster.yaml says."""
    team = yaml.safe_load(TEAM_YAML.read_text())
    project = yaml.safe_load(PROJECT_DAGSTER_YAML.read_text())
    for storage in ("run_storage", "event_log_storage", "schedule_storage"):
        assert "postgres_db" in team.pop(storage)["config"]
    project.pop("instance_class")  # the SQLite-only pool lock
    assert team == project


def test_overlapping_runs_and_a_tick_on_postgres(
    spark, schema, postgres_instance, tmp_path: Path
) -> None:
    figures = overlapping_runs_scenario(spark, schema, postgres_instance, tmp_path)
    print(
        f"\nPostgreSQL: both jobs + 1 scheduled tick: manual runs "
        f"{figures['manual_wall_s']}s wall, {figures['pool_waits']} pool waits"
    )
