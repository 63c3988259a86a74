"""Pool claims on a team's PostgreSQL instance: of CLAIMERS processes claiming a limit-1 pool at
the same moment, exactly one gets it with the project's storage (docs/dagster-postgres.yaml), and
freeing it hands it to exactly one waiting step. dagster-postgres's own storage lets several win
(its claim's row lock ends before the write, in autocommit), which is why the project's exists.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from nbpipeline.settings import PROJECT_ROOT
from nbpipeline_tests.helpers import (
    PLAIN_YAML,
    POOL,
    claimed_in_lockstep,
    claimed_together,
    release_hands_the_slot_to_one,
)
from nbpipeline_tests.postgres import Postgres, postgres_server

pytestmark = pytest.mark.dagster

TEAM_YAML = PROJECT_ROOT / "docs" / "dagster-postgres.yaml"
PLAIN_POSTGRES = """storage:
  postgres:
    postgres_db:
      hostname: {env: DAGSTER_PG_HOST}
      port: {env: DAGSTER_PG_PORT}
      db_name: {env: DAGSTER_PG_DB}
      username: {env: DAGSTER_PG_USERNAME}
      scheme: postgresql+psycopg2
"""


@pytest.fixture(scope="module")
def server() -> Iterator[Postgres]:
    with postgres_server() as pg:
        yield pg


def _home(tmp_path: Path, pg: Postgres, monkeypatch: pytest.MonkeyPatch, project: bool) -> Path:
    """A DAGSTER_HOME on a fresh database of the server (so every round starts empty)."""
    import psycopg2

    name = f"d_{tmp_path.name.lower()}"[:60]
    conn = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, dbname=pg.database)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    for key, value in {**pg.env(), "DAGSTER_PG_DB": name}.items():
        monkeypatch.setenv(key, value)  # forked claimers inherit them
    home = tmp_path / "home"
    home.mkdir()
    if project:
        shutil.copyfile(TEAM_YAML, home / "dagster.yaml")
    else:
        (home / "dagster.yaml").write_text(PLAIN_POSTGRES + PLAIN_YAML)
    return home


def test_one_claim_wins_and_its_release_hands_it_to_one(
    server, tmp_path_factory, monkeypatch
) -> None:
    for attempt in range(3):
        home = _home(tmp_path_factory.mktemp(f"p{attempt}"), server, monkeypatch, project=True)
        assert claimed_together(home, monkeypatch) == 1, f"round {attempt}"
    with dg.DagsterInstance.get() as instance:
        release_hands_the_slot_to_one(instance.event_log_storage)


def test_plain_dagster_postgres_storage_lets_several_claims_win(
    server, tmp_path_factory, monkeypatch
) -> None:
    """If dagster-postgres's claim becomes atomic, this fails and postgres_storage.py can go.
    The two claims are interleaved statement by statement, so the race is certain, not hoped
    for (released together and left to timing, 10 rounds of 8 claimers sometimes all missed it)."""
    home = _home(tmp_path_factory.mktemp("q"), server, monkeypatch, project=False)
    assert claimed_in_lockstep(home, monkeypatch) == 2


def test_a_pool_initialised_twice_stays_usable(server, tmp_path_factory, monkeypatch) -> None:
    """Two processes that both found a pool missing initialise it in turn: on dagster-postgres
    the second one's fallback update ran in an aborted transaction and failed its run."""
    home = _home(tmp_path_factory.mktemp("init"), server, monkeypatch, project=True)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        assert storage.initialize_concurrency_limit_to_default(POOL)
        assert storage.initialize_concurrency_limit_to_default(POOL)
        info = storage.get_concurrency_info(POOL)
        assert info.slot_count == 1
        assert storage.claim_concurrency_slot(POOL, "run-a", "Notebook1").is_claimed
