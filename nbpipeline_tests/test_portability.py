"""Loads anywhere Dagster runs: no POSIX-only module on the load path, and a start method for the
parallel job on platforms without forkserver (Windows)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from nbpipeline.defs import jobs
from nbpipeline.instance import PROJECT_DAGSTER_YAML

# Modules that exist on POSIX only. psutil's Linux part imports `resource` and `pwd`, but psutil
# itself is cross-platform, so those two are left out.
POSIX_ONLY = ("fcntl", "termios", "grp", "pty", "tty")


def test_definitions_and_instance_load_without_posix_only_modules(tmp_path: Path) -> None:
    """What `dagster dev` loads (dagster.yaml's instance class, the code location) imports no
    POSIX-only module: each is made unimportable in a fresh interpreter."""
    (tmp_path / "dagster.yaml").write_text(PROJECT_DAGSTER_YAML.read_text())
    code = f"""
import sys
for name in {POSIX_ONLY!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as on Windows
import dagster as dg
import nbpipeline.definitions
from nbpipeline.instance import ensure_pools
with dg.DagsterInstance.from_config({str(tmp_path)!r}) as instance:
    ensure_pools(instance)
    storage = instance.event_log_storage
    print(type(instance).__name__, storage.get_concurrency_info("nbpipeline/Notebook1").slot_count)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["PoolSafeInstance", "1"]


def test_parallel_job_uses_forkserver_where_it_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        multiprocessing, "get_all_start_methods", lambda: ["fork", "spawn", "forkserver"]
    )
    method = jobs.parallel_execution_config()["config"]["start_method"]
    assert method == {"forkserver": {"preload_modules": jobs.FORKSERVER_PRELOAD}}


def test_parallel_job_uses_spawn_without_forkserver(monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows offers spawn only.
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    config = jobs.parallel_execution_config(3)["config"]
    assert config == {"max_concurrent": 3, "start_method": {"spawn": {}}}
    # ... and the parallel job's executor accepts it.
    import dagster as dg

    from nbpipeline import definitions

    job = definitions.defs.resolve_job_def(jobs.PARALLEL_JOB)
    validated = dg.validate_run_config(job, {"execution": {"config": config}})
    assert validated["execution"]["multiprocess"]["start_method"] == {"spawn": {}}
