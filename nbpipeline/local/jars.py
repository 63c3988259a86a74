"""The Delta Lake JARs the local engine loads: from NBPIPELINE_DELTA_JARS, the per-user cache,
or resolved once from Maven through Spark's own Ivy."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyspark
from filelock import FileLock

from nbpipeline import settings
from nbpipeline.errors import JarsError

log = logging.getLogger(__name__)


def delta_coordinate() -> str:
    """Maven coordinate of the Delta JAR matching the installed pyspark and delta-spark."""
    delta_version = importlib.metadata.version("delta-spark")
    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{delta_version}"


def spark_home() -> Path:
    """The pyspark package folder, which is a complete Spark distribution."""
    return Path(pyspark.__file__).resolve().parent


def artifact_name(jar: Path) -> str:
    """`org.apache.parquet_parquet-column-1.16.0.jar` -> `parquet-column` (group and version cut)."""
    stem = jar.name.removesuffix(".jar")
    stem = stem.split("_", 1)[1] if "_" in stem and "." in stem.split("_", 1)[0] else stem
    parts = stem.split("-")
    while parts and parts[-1][:1].isdigit():
        parts.pop()
    return "-".join(parts)


def _offline_hint(coordinate: str) -> str:
    group, artifact, version = coordinate.split(":")
    storage = f"{group}:delta-storage:{version}"
    return (
        "download them once, e.g. `mvn dependency:copy -Dartifact="
        f"{coordinate} -DoutputDirectory=DIR` and the same for {storage}, "
        "then set NBPIPELINE_DELTA_JARS=DIR"
    )


def _jars_from_dir(folder: Path, coordinate: str) -> list[Path]:
    artifact = coordinate.split(":")[1]
    if not folder.is_dir():
        raise JarsError(
            f"NBPIPELINE_DELTA_JARS={folder} is not a folder", hint=_offline_hint(coordinate)
        )
    jars = sorted(folder.glob("*.jar"))
    missing = [
        name
        for name in (artifact, "delta-storage")
        if not any(artifact_name(j) == name for j in jars)
    ]
    if missing:
        raise JarsError(
            f"NBPIPELINE_DELTA_JARS={folder} lacks the Delta Lake JAR(s) {', '.join(missing)} "
            f"(need {coordinate} and its delta-storage)",
            hint=_offline_hint(coordinate),
        )
    return jars


def resolve_jars(progress: Callable[[str], None] | None = None) -> list[Path]:
    """The Delta Lake JARs to put on the engine's class path, resolving them once if needed.

    Order: `NBPIPELINE_DELTA_JARS` (a folder of pre-downloaded JARs, for offline use); else the
    per-user cache; else resolve from Maven Central with Spark's own resolver (Ivy), then keep only
    the JARs Spark does not already ship and copy them into the cache for next time.
    """
    progress = progress or log.info
    coordinate = delta_coordinate()
    override = os.environ.get("NBPIPELINE_DELTA_JARS")
    if override:
        return _jars_from_dir(Path(override).expanduser().resolve(), coordinate)

    cached = settings.cache_dir() / "jars" / coordinate.replace(":", "_")
    manifest = cached / "jars.json"
    jars = _cached_jars(manifest)
    if jars:
        return jars
    # Engines of several NBPIPELINE_HOMEs share the cache: one resolves, the others wait for it.
    cached.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cached) + ".lock"):
        return _cached_jars(manifest) or _resolve(coordinate, cached, manifest, progress)


def _cached_jars(manifest: Path) -> list[Path] | None:
    if not manifest.exists():
        return None
    jars = [manifest.parent / n for n in json.loads(manifest.read_text())]
    return jars if all(j.exists() for j in jars) else None


def _resolve(
    coordinate: str, cached: Path, manifest: Path, progress: Callable[[str], None]
) -> list[Path]:
    progress(f"Resolving Delta Lake JARs {coordinate} (once; cached in {cached}) ...")
    # One Ivy folder per coordinate: its jars/ folder then holds exactly Delta's closure.
    ivy = settings.cache_dir() / "ivy" / coordinate.replace(":", "_")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        noop = Path(tmp) / "noop.py"
        noop.write_text("")
        env = {**os.environ, "SPARK_HOME": str(spark_home()), "PYSPARK_PYTHON": sys.executable}
        try:
            proc = subprocess.run(
                [
                    str(spark_home() / "bin" / "spark-submit"),
                    "--packages",
                    coordinate,
                    "--conf",
                    f"spark.jars.ivy={ivy}",
                    str(noop),
                ],
                env=env,
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=900,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise JarsError(
                f"could not run Spark's resolver for {coordinate}: {exc}",
                hint=_offline_hint(coordinate),
            ) from exc
    if proc.returncode != 0:
        unresolved = [
            line.strip()
            for line in (proc.stdout + proc.stderr).splitlines()
            if "unresolved dependency" in line or "not found" in line or "Host" in line
        ]
        detail = unresolved[-1] if unresolved else f"spark-submit exited {proc.returncode}"
        raise JarsError(
            f"could not download the Delta Lake JARs {coordinate} from Maven Central ({detail})",
            hint=_offline_hint(coordinate),
        )
    bundled = {artifact_name(j) for j in (spark_home() / "jars").glob("*.jar")}
    # Spark ships newer Hadoop/Parquet/Jackson than Delta's POM asks for; keep Spark's copies.
    wanted = [j for j in sorted((ivy / "jars").glob("*.jar")) if artifact_name(j) not in bundled]
    if not any(artifact_name(j) == coordinate.split(":")[1] for j in wanted):
        raise JarsError(
            f"Spark's resolver finished but {coordinate} is not in {ivy / 'jars'}",
            hint=_offline_hint(coordinate),
        )
    cached.mkdir(parents=True, exist_ok=True)
    for jar in wanted:
        shutil.copy2(jar, cached / jar.name)
    manifest.write_text(json.dumps([j.name for j in wanted], indent=1))
    progress(f"Resolved {len(wanted)} JARs in {time.monotonic() - started:.1f}s")
    return [cached / j.name for j in wanted]
