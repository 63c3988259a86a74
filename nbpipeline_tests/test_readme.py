"""Every shell command in README.md and docs/*.md is exercised: here, by another test, or by
`.ci/run`.

The fenced shell blocks of README and of every page in docs/ are parsed; each command line must
appear in `EXERCISED_BY`, which names the test (file::function, checked to exist) or CI step that
runs it. A command added to the documentation without a test fails here. The cheap commands are
run right here.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nbpipeline.settings import DEFAULT_SOURCE_TABLE, PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
# Every page whose commands must be tested: README and the reference pages it links to.
DOCUMENTS = [README, *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
CI_RUN = PROJECT_ROOT / ".ci" / "run"
TESTS = Path(__file__).resolve().parent

# Documented command (as written, trailing comment removed) -> what runs it: "file.py::test" or
# ".ci/run". Synopsis lines ([--flag], A | B) map to the tests covering those options.
EXERCISED_BY: dict[str, list[str]] = {
    'pip install -e ".[dev]"': [".ci/run"],
    "pytest": [".ci/run"],
    'pytest -m "not slow and not ui" -n 2': ["test_readme.py::test_fast_tier_selection"],
    "pytest -m databricks": ["test_readme.py::test_databricks_marker_selects_the_live_tests"],
    "nbpipeline run parallel": ["test_readme.py::test_main_command_seeds_a_missing_source"],
    "nbpipeline ui": [
        "test_ui.py::test_user_path_in_the_dagster_ui",
        "test_cli_pipeline.py::test_ui_runs_dagster_dev_on_the_same_instance",
    ],
    "export DAGSTER_HOME=~/.nbpipeline/dagster_home && dagster dev -w workspace.yaml": [
        # `nbpipeline ui` runs exactly `dagster dev -w workspace.yaml` with DAGSTER_HOME set.
        "test_ui.py::test_user_path_in_the_dagster_ui",
        "test_cli_pipeline.py::test_ui_runs_dagster_dev_on_the_same_instance",
    ],
    "nbpipeline seed --rows 100000": ["test_cli.py::test_seed_notebook_run_and_tables"],
    "nbpipeline notebook run notebooks/Notebook1.py": [
        "test_cli.py::test_seed_notebook_run_and_tables"
    ],
    "nbpipeline notebook run notebooks/Notebook4.py --param high_value_threshold=500": [
        "test_cli_commands.py::test_notebook_run_with_a_high_value_threshold_param"
    ],
    "nbpipeline tables --json": ["test_cli.py::test_seed_notebook_run_and_tables"],
    "nbpipeline engine start | stop | status [--json]": [
        "test_readme.py::test_engine_commands",
        "test_remote_engine.py::test_engine_starts_from_an_offline_jar_folder",
        "test_remote_engine.py::test_engine_stop_stops_a_running_engine",
    ],
    "nbpipeline run sequential [--source TABLE] [--param key=value ...] [--max-concurrent N]": [
        "test_ui.py::test_user_path_in_the_dagster_ui",
        "test_cli_pipeline.py::test_failed_run_exits_1_with_the_step_error",
        "test_cli_pipeline.py::test_bad_input_exits_2",
        "test_cli_commands.py::test_run_parallel_max_concurrent_limits_a_real_run",
    ],
    "nbpipeline bench --rows 2000000 --repeat 3": [
        # The same command on a tiny source, every mode, one round (2M rows is a benchmark).
        "test_comparison.py::test_bench_tiny_runs_every_mode"
    ],
    "nbpipeline compare [--json] [--plot timeline.png]": [
        "test_comparison.py::test_compare_matches_the_event_log"
    ],
    "nbpipeline seed --rows N [--seed S] [--dirty] [--table T]": [
        "test_cli.py::test_seed_notebook_run_and_tables"
    ],
    "nbpipeline seed --changes F [--seed S]": ["test_readme.py::test_seed_change_batch_command"],
    "nbpipeline databricks deploy --dry-run --json": [
        "test_databricks_jobs.py::test_dry_run_json_needs_no_credentials_and_validates"
    ],
    'nbpipeline databricks deploy --cron "0 2 * * 1-5" --timezone Europe/Berlin [--unpaused]': [
        "test_databricks_jobs.py::test_dry_run_text_and_options",
        "test_databricks_jobs.py::test_diff_shows_hand_edits_and_deploy_reverts_them",
        "test_cli_commands.py::test_deploy_with_cron_timezone_and_unpaused",
    ],
    "nbpipeline databricks diff": [
        "test_databricks_jobs.py::test_diff_shows_hand_edits_and_deploy_reverts_them"
    ],
    "nbpipeline databricks run comparison": [
        "test_databricks_jobs.py::test_comparison_job_runs_both_orchestrations_one_after_another",
        "test_databricks_jobs.py::test_run_orchestration_jobs_reports_the_child_runs",
    ],
    "nbpipeline compare --databricks-runs COMPARISON_RUN_ID": [
        "test_databricks_jobs.py::test_comparison_job_runs_both_orchestrations_one_after_another",
        "test_databricks_jobs.py::test_run_orchestration_jobs_reports_the_child_runs",
        "test_comparison.py::test_databricks_run_records_feed_the_same_comparison",
        "test_cli_commands.py::test_compare_databricks_runs_command",
    ],
    "nbpipeline databricks bundle --out nbpipeline-bundle": [
        "test_databricks_jobs.py::test_bundle_jobs_are_job_settings_and_match_deploy"
    ],
    "export NBPIPELINE_DELTA_JARS=$HOME/delta-jars": [
        "test_remote_engine.py::test_engine_starts_from_an_offline_jar_folder"
    ],
}
# Commands of other tools that the docs show for offline set-up; nothing here can run them (no
# Maven, no Maven Central). Listed so that adding one is a conscious choice.
NOT_RUN: dict[str, str] = {
    "mvn dependency:copy -Dartifact=io.delta:delta-spark_4.2_2.13:4.4.0 "
    "-DoutputDirectory=$HOME/delta-jars": "Maven, for offline JARs",
    "mvn dependency:copy -Dartifact=io.delta:delta-storage:4.4.0 "
    "-DoutputDirectory=$HOME/delta-jars": "Maven, for offline JARs",
    "cd DIR && databricks bundle validate -t dev": "the Databricks CLI, for the bundle",
    "databricks bundle deploy -t dev": "the Databricks CLI, for the bundle",
    "databricks bundle run -t dev comparison": "the Databricks CLI, for the bundle",
    "databricks bundle deploy -t prod": "the Databricks CLI, for the bundle",
}


def readme_commands(text: str) -> list[str]:
    """The command lines of README's fenced shell blocks, trailing comments removed."""
    commands = []
    for block in re.finditer(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, re.S | re.M):
        for line in block.group(1).splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command:
                commands.append(command)
    return commands


def _cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "nbpipeline.cli", *argv],
        cwd=PROJECT_ROOT,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def command_words(command: str) -> list[str]:
    """The words of a README command that the test exercising it must pass: subcommands, options
    and key=value arguments (`export VAR=...` -> VAR). Placeholders (TABLE, N, key=value), option
    values, numbers and paths are left out: a test may use its own table, sizes and files."""
    words: list[str] = []
    for part in command.split("&&"):
        tokens = shlex.split(part.replace("[", " ").replace("]", " ").replace("|", " "))
        if tokens[:1] == ["export"]:
            words += [t.split("=", 1)[0] for t in tokens[1:]]
            continue
        value_next = False
        for token in tokens[1:]:  # the program name is implied
            if token.startswith("-"):
                words.append(token)
                value_next = True  # the next word may be the option's value
            elif (
                "=" in token
                and token != "key=value"
                or re.fullmatch(r"[a-z][a-z-]*", token)
                and not value_next
            ):
                words.append(token)
            else:
                value_next = False
    return words


def find_test_module(name: str) -> Path:
    """The test module `name` (e.g. test_ui.py) wherever it is below the tests folder (e2e/...)."""
    found = sorted(TESTS.rglob(name))
    assert len(found) == 1, f"{name}: {len(found)} test modules of that name: {found}"
    return found[0]


def _test_strings(where: str) -> set[str]:
    """Every string literal in test function `file.py::test` and each of its space-separated
    words (f-strings contribute their literal parts)."""
    file, _, name = where.partition("::")
    tree = ast.parse(find_test_module(file).read_text())
    func = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    assert func is not None, f"{where} is gone"
    strings: set[str] = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
            strings.update(node.value.split())
    return strings


def documented_commands() -> dict[str, list[str]]:
    """Each documented command -> the pages (relative to the project) that show it."""
    pages: dict[str, list[str]] = {}
    for document in DOCUMENTS:
        for command in readme_commands(document.read_text()):
            pages.setdefault(command, []).append(str(document.relative_to(PROJECT_ROOT)))
    return pages


def test_every_readme_command_is_exercised() -> None:
    """Each command of README and docs/ maps to tests that exist and whose own code passes the
    command's subcommands, options and key=value arguments (a test name alone proves nothing)."""
    pages = documented_commands()
    assert "nbpipeline run parallel" in readme_commands(README.read_text())  # the parser works
    missing = [
        f"{c} ({', '.join(p)})" for c, p in pages.items() if c not in {**EXERCISED_BY, **NOT_RUN}
    ]
    assert not missing, f"documented commands with no test: add them to EXERCISED_BY: {missing}"
    stale = sorted((set(EXERCISED_BY) | set(NOT_RUN)) - set(pages))
    assert not stale, f"EXERCISED_BY/NOT_RUN name commands no page shows any more: {stale}"
    ci = CI_RUN.read_text()
    unexercised = []
    for command in set(pages) & set(EXERCISED_BY):
        tests = [w for w in EXERCISED_BY[command] if w != ".ci/run"]
        if ".ci/run" in EXERCISED_BY[command]:
            assert re.search(rf"^\s*{re.escape(command)}(\s|$)", ci, re.M), command
        if not tests:
            continue
        strings = set().union(*(_test_strings(w) for w in tests))
        absent = [w for w in command_words(command) if w not in strings]
        if absent:
            unexercised.append(f"{command!r}: {absent} in none of {tests}")
    assert not unexercised, "tests named for documented commands do not run them:\n" + "\n".join(
        unexercised
    )


def test_command_words() -> None:
    words = command_words(
        "nbpipeline run sequential [--source TABLE] [--param key=value ...] [--max-concurrent N]"
    )
    assert words == ["run", "sequential", "--source", "--param", "--max-concurrent"]
    assert command_words("nbpipeline engine start | stop | status [--json]") == [
        "engine",
        "start",
        "stop",
        "status",
        "--json",
    ]
    assert command_words(
        "nbpipeline notebook run notebooks/Notebook4.py --param high_value_threshold=500"
    ) == ["notebook", "run", "--param", "high_value_threshold=500"]
    assert command_words("export NBPIPELINE_DELTA_JARS=$HOME/delta-jars") == [
        "NBPIPELINE_DELTA_JARS"
    ]


def test_fast_tier_selection() -> None:
    """README's fast tier selects the quick tests and none of the long runs it names."""
    proc = subprocess.run(
        # pytest-xdist collects in this process when only collecting: the output is the same.
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow and not ui"]
        + ["-n", "2"],
        cwd=PROJECT_ROOT,
        # Options of the calling run (PYTEST_ADDOPTS=-v, say) would change the listing's form.
        env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    # By file name: the e2e tests live in a subfolder.
    selected = {Path(line.split("::")[0]).name for line in proc.stdout.splitlines() if "::" in line}
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    for slow in (
        "test_overlap.py",
        "test_remote_engine.py",
        "test_ui.py",
        "test_loadtest.py",
        "test_secrets.py",
    ):
        assert find_test_module(slow) and slow not in selected, slow
    for slow in (
        "test_sigkill_mid_merge",
        "test_engine_killed_under_a_run",
        "test_bench_tiny_runs_every_mode",
        "test_main_command_seeds_a_missing_source",
        "test_run_parallel_max_concurrent_limits_a_real_run",
    ):
        assert not any(slow in i for i in ids), slow
    assert {"test_contract.py", "test_readme.py"} <= selected


def test_links_and_images_resolve() -> None:
    """Every relative link and image of README and docs/ names a file inside the repository
    (and a `#fragment` into a Markdown page names one of its headings)."""
    broken = []
    for document in DOCUMENTS:
        text = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL
            path, _, fragment = target.partition("#")
            file = (document.parent / path).resolve() if path else document
            if not file.is_relative_to(PROJECT_ROOT) or not file.is_file():
                broken.append(f"{document.name}: {target}")
            elif fragment and file.suffix == ".md" and fragment not in heading_anchors(file):
                broken.append(f"{document.name}: {target} (no such heading)")
    assert not broken, broken


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+)$", page.read_text(), re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_databricks_marker_selects_the_live_tests() -> None:
    """`pytest -m databricks` selects exactly the live-workspace tests, which skip themselves
    without DATABRICKS_HOST and a token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABRICKS_")}
    # Only the files using the marker are collected: collecting the whole suite costs half a minute.
    files = [str(f) for f in TESTS.rglob("test_*.py") if "mark.databricks" in f.read_text()]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "-m",
            "databricks",
            *files,
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    outcomes = dict(re.findall(r"^\S+::(test_\w+)\S* (\w+)", proc.stdout, re.M))
    assert outcomes and all(name.startswith("test_live_") for name in outcomes), outcomes
    assert set(outcomes.values()) == {"SKIPPED"}, outcomes


def test_help_lists_every_command_on_one_line() -> None:
    from nbpipeline.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    out = _cli("--help").stdout
    for name in commands:
        assert re.search(rf"^    {name}\s{{2,}}\S", out, re.M), f"{name} not on one line:\n{out}"


def test_bad_first_run_rows_is_one_line_with_a_hint() -> None:
    env = {**os.environ, "NBPIPELINE_FIRST_RUN_ROWS": "lots"}
    proc = _cli("run", "parallel", env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: NBPIPELINE_FIRST_RUN_ROWS='lots'")
    assert "hint: unset it" in proc.stderr


@pytest.mark.slow
@pytest.mark.spark
def test_engine_commands(spark, tmp_path: Path) -> None:
    """`engine status --json` and `engine start` on the session's engine; `engine stop` on a
    home whose engine is not running (stopping the session's engine would end other tests)."""
    import json

    status = json.loads(_cli("engine", "status", "--json").stdout)
    assert status["running"]
    started = _cli("engine", "start")
    assert started.returncode == 0 and started.stdout.strip() == status["url"]
    env = {**os.environ, "NBPIPELINE_HOME": str(tmp_path / "other")}
    stopped = _cli("engine", "stop", env=env)
    assert stopped.returncode == 0 and "was not running" in stopped.stderr


def test_engine_start_says_so_and_a_failure_names_the_next_step(tmp_path: Path) -> None:
    """The first command needing the engine starts it and says so; if the JVM cannot start,
    the error names the log and the hint the command to retry (a heap of 999999g passes the
    setting's check, but the JVM cannot reserve it and exits at once, so no engine is left
    behind)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "NBPIPELINE_HOME": str(tmp_path / "home"),
        "NBPIPELINE_ENGINE_PORT": str(port),
        "NBPIPELINE_ENGINE_MEMORY": "999999g",
    }
    proc = _cli("tables", env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Starting the local Spark engine on sc://127.0.0.1:" in proc.stderr
    assert "error: the local engine exited during start-up" in proc.stderr
    assert "hint: " in proc.stderr and "nbpipeline engine start" in proc.stderr


@pytest.mark.slow
@pytest.mark.spark
def test_seed_change_batch_command(spark, schema: str) -> None:
    table = f"{schema}.orders"
    assert _cli("seed", "--rows", "300", "--table", table).returncode == 0
    proc = _cli("seed", "--changes", "0.1", "--seed", "7", "--table", table)
    assert proc.returncode == 0, proc.stderr
    assert "Applied a change batch" in proc.stderr
    assert spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").collect()[0]["version"] >= 1


@pytest.mark.spark
@pytest.mark.dagster
@pytest.mark.slow
def test_main_command_seeds_a_missing_source(spark, tmp_path: Path) -> None:
    """README's main command as a newcomer runs it: no source yet and no DAGSTER_HOME. It seeds
    (a small size here, through NBPIPELINE_FIRST_RUN_ROWS), says so, and runs the parallel job."""
    spark.sql(f"DROP TABLE IF EXISTS {DEFAULT_SOURCE_TABLE}")
    env = {**os.environ, "NBPIPELINE_FIRST_RUN_ROWS": "500"}
    env.pop("DAGSTER_HOME", None)
    proc = _cli("run", "parallel", env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "DAGSTER_HOME is not set; using" in err
    assert f"No source table {DEFAULT_SOURCE_TABLE} yet: seeding 500 rows" in err
    for n in (1, 2, 3, 4):
        assert f"Notebook{n}: succeeded" in err
    run_id = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", run_id), proc.stdout
    assert spark.table(DEFAULT_SOURCE_TABLE).count() == 500
    # The next run finds the source and leaves it alone.
    from nbpipeline.runs import ensure_source

    said: list[str] = []
    assert ensure_source(spark, DEFAULT_SOURCE_TABLE, rows=10, out=said.append) is False
    assert said == [] and spark.table(DEFAULT_SOURCE_TABLE).count() == 500


WORKER_PLUGIN = """
import os

def pytest_runtest_logstart(nodeid, location):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        with open(os.environ["NBPIPELINE_TEST_ORDER"], "a") as out:
            out.write(os.environ["PYTEST_XDIST_WORKER"] + " " + nodeid + "\\n")
"""


def test_the_two_workers_keep_each_group_of_files_together(tmp_path: Path) -> None:
    """README's `pytest` in two workers (planned only, nothing runs): each group of conftest's
    `worker_group` runs on one worker, file after file, and every other file whole on one."""
    from nbpipeline_tests.conftest import worker_group

    (tmp_path / "worker_order.py").write_text(WORKER_PLUGIN)
    order = tmp_path / "order.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "worker_order", "-p", "no:cacheprovider"]
        + ["--setup-plan", "-q"],
        cwd=PROJECT_ROOT,
        env={
            # Not this run's worker variables: the plugin tells the workers by them.
            **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
            "PYTHONPATH": str(tmp_path),
            "NBPIPELINE_TEST_ORDER": str(order),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = [line.split(" ", 1) for line in order.read_text().splitlines()]
    workers: dict[str, set[str]] = {}
    files: dict[str, list[str]] = {}  # group -> its files in the order they ran
    for worker, nodeid in ran:
        file = nodeid.split("::", 1)[0]
        workers.setdefault(worker_group(file), set()).add(worker)
        seen = files.setdefault(worker_group(file), [])
        if not seen or seen[-1] != file:
            seen.append(file)
    assert set().union(*workers.values()) == {"gw0", "gw1"}, workers
    assert all(len(ws) == 1 for ws in workers.values()), workers
    assert all(len(f) == len(set(f)) for f in files.values()), files  # no file split up
    assert len(files["heavy"]) == 6 and len(files["job_pair"]) == 2, files
    # The heavy group, the longest work, is the first thing its worker runs.
    (heavy_worker,) = workers["heavy"]
    first = next(nodeid for worker, nodeid in ran if worker == heavy_worker)
    assert worker_group(first.split("::", 1)[0]) == "heavy", first
