"""A private PostgreSQL server for tests: Debian's `postgresql` binaries, a fresh data folder, a
free port, its socket in the same temporary folder, stopped (and deleted) at the end.

initdb and postgres refuse to run as root (as CI does), so as root they run as the unprivileged
`postgres` user the Debian package creates, through `runuser`. Local connections are trusted
(nothing listens beyond 127.0.0.1), so no password is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nbpipeline_tests.helpers import free_port


def _pg_bin() -> Path:
    """NBPIPELINE_PG_BIN, else the newest Debian PostgreSQL (15 on bookworm)."""
    raw = os.environ.get("NBPIPELINE_PG_BIN")
    if raw:
        return Path(raw)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PG_OS_USER = "postgres"  # the unprivileged account Debian's package creates
SUPERUSER = "nbpipeline"
DATABASE = "dagster"


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    database: str

    def env(self) -> dict[str, str]:
        """The variables docs/dagster-postgres.yaml reads."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_DB": self.database,
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": "",
        }


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", PG_OS_USER, "--", *cmd]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def missing() -> str | None:
    """Why a server cannot be started here, or None."""
    if not (PG_BIN / "initdb").exists():
        return f"{PG_BIN}/initdb is missing: apt-get install postgresql (as .ci/run does)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start postgres as an unprivileged user"
    return None


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """Start a throwaway server with an empty `dagster` database; stop and delete it after."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    # Not under pytest's tmp folder: its parents are private to the test user (root), and the
    # server runs as another user.
    folder = Path(tempfile.mkdtemp(prefix="nbpipeline-pg-"))
    data, sockets, log = folder / "data", folder / "sockets", folder / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, PG_OS_USER)
        shutil.chown(sockets, PG_OS_USER)
    port = free_port()
    started = False
    try:
        _run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            "initdb",
        )
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run(
            [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"],
            "pg_ctl start",
        )
        started = True
        _run(
            [
                str(PG_BIN / "createdb"),
                "-h",
                str(sockets),
                "-p",
                str(port),
                "-U",
                SUPERUSER,
                DATABASE,
            ],
            "createdb",
        )
        yield Postgres(host="127.0.0.1", port=port, user=SUPERUSER, database=DATABASE)
    finally:
        if started:
            with contextlib.suppress(Exception):
                _run(
                    [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                    "pg_ctl stop",
                )
        # Give a slow stop a moment before the folder goes.
        time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)
