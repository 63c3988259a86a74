"""The user's path in a real browser: `nbpipeline ui` (dagster dev) driven by headless Chromium.

One test walks what a user does in the Dagster UI, in order, and asserts on what is on screen:
the asset graph with its six assets; a newcomer's first click, "Materialize all", which writes
the five outputs and leaves the `orders` source (observed, never written) as it was;
launching `parallel_notebooks` from the UI and its run timeline (one bar per notebook step);
switching a schedule on and off; after a sequential run (from the command line, on the same
instance), the `runtime_comparison` asset's speedup, refreshed by the sensor.

Everything is real: `dagster dev` (webserver and daemon) on a free loopback port with a fresh
DAGSTER_HOME, the session's local engine (shared through NBPIPELINE_HOME and its port, so no
second JVM), Debian's Chromium driven by Playwright. Screenshots go to $NBPIPELINE_TEST_ARTIFACTS
(default: the test's tmp folder, printed), also on failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from nbpipeline.defs.schedules import SCHEDULE_NAMES
from nbpipeline.instance import PROJECT_DAGSTER_YAML
from nbpipeline.runs import FIRST_RUN_ROWS_ENV
from nbpipeline.settings import DEFAULT_SOURCE_TABLE, PROJECT_ROOT
from nbpipeline.tables import OUTPUT_TABLES
from nbpipeline_tests.helpers import free_port

pytestmark = [pytest.mark.ui, pytest.mark.spark, pytest.mark.dagster, pytest.mark.slow]

CHROMIUM = os.environ.get("NBPIPELINE_CHROMIUM", "/usr/bin/chromium")
# Headless without a sandbox (CI runs as root); no background networking, so Chromium makes no
# outbound connections (refused in closed networks, and slow to time out).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SOURCE_ROWS = 1000  # small (if `nbpipeline ui` seeds it): the test is about the UI path
ASSETS = ["orders", *OUTPUT_TABLES]  # the six assets of the nbpipeline group
NOTEBOOK_STEP = re.compile(r"^Notebook[1-4]$")
# Generous: a run of four notebooks takes under a minute on an idle laptop, but several
# minutes on a busy 2-core machine.
RUN_TIMEOUT_S = 900
UI_TIMEOUT_MS = 60_000


@dataclass
class DagsterDev:
    url: str
    home: Path
    env: dict[str, str]
    log: Path


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    raw = os.environ.get("NBPIPELINE_TEST_ARTIFACTS")
    folder = Path(raw) if raw else tmp_path / "ui_artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nUI test artifacts (screenshots, dagster dev log): {folder}")
    return folder


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a process started in its own session and everything it started (dagster dev, its
    webserver, daemon, code server and run workers share the group): SIGTERM to the group, so
    dagster dev shuts its children down cleanly, then SIGKILL to whatever is left after a grace
    period (dagster dev takes ~8 s)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(proc.pid):
        proc.poll()  # reap the leader, so it does not count as alive
        time.sleep(0.25)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster dev exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/server_info", timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(
        f"dagster dev did not serve {url} within {timeout_s:.0f}s:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture
def dagster_dev(spark, tmp_path: Path, artifacts: Path) -> Iterator[DagsterDev]:
    """`nbpipeline ui` (dagster dev) on a free port with a fresh DAGSTER_HOME holding the project's
    dagster.yaml, sharing the session's engine (NBPIPELINE_HOME and port come from conftest)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(PROJECT_DAGSTER_YAML, home / "dagster.yaml")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    # `nbpipeline ui` seeds the default source if there is none yet (a newcomer's machine).
    env[FIRST_RUN_ROWS_ENV] = str(SOURCE_ROWS)
    # The step processes import nbpipeline from this checkout, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    log = artifacts / "dagster_dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbpipeline.cli", "ui", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # Generous: on a newcomer's machine `nbpipeline ui` first seeds the default source.
        _wait_until_serving(url, proc, log, timeout_s=600)
        yield DagsterDev(url=url, home=home, env=env, log=log)
    finally:
        _stop_group(proc)


@pytest.fixture
def page(artifacts: Path):
    from playwright.sync_api import expect, sync_playwright

    # Pages of a busy machine's webserver can take many seconds; assertions wait as long as
    # actions do.
    expect.set_options(timeout=UI_TIMEOUT_MS)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (or set NBPIPELINE_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(UI_TIMEOUT_MS)
            page = context.new_page()
            # A first visit shows a "Join the Dagster community" dialog over whatever page is
            # open; dismiss it whenever it appears.
            skip = page.get_by_role("button", name="Skip", exact=True)
            page.add_locator_handler(skip, lambda: skip.click())
            yield page
        finally:
            browser.close()


def _shot(page, artifacts: Path, name: str) -> Path:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def _wait_for_run(home: Path, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dg.DagsterRun:
    """The run once it finished (read from the instance, as the UI does)."""
    deadline = time.monotonic() + timeout_s
    with dg.DagsterInstance.from_config(str(home)) as instance:
        while time.monotonic() < deadline:
            run = instance.get_run_by_id(run_id)
            if run is not None and run.is_finished:
                return run
            time.sleep(1)
    pytest.fail(f"run {run_id} did not finish within {timeout_s:.0f}s")


def _version_and_rows(spark, table: str) -> tuple[int, int]:
    version = spark.sql(f"DESCRIBE HISTORY {table} LIMIT 1").collect()[0]["version"]
    return int(version), spark.table(table).count()


def _new_run_id(home: Path, known: set[str], timeout_s: float = 120) -> str:
    """The id of the run a click launched (one not in `known`)."""
    deadline = time.monotonic() + timeout_s
    with dg.DagsterInstance.from_config(str(home)) as instance:
        while time.monotonic() < deadline:
            new = [r.run_id for r in instance.get_runs() if r.run_id not in known]
            if new:
                return new[0]
            time.sleep(0.5)
    pytest.fail(f"no run was launched within {timeout_s:.0f}s")


def _run_id_from_url(url: str) -> str:
    match = re.search(r"/runs/([0-9a-f-]{36})", url)
    assert match, f"not a run page: {url}"
    return match.group(1)


def test_user_path_in_the_dagster_ui(spark, dagster_dev: DagsterDev, page, artifacts: Path) -> None:
    try:
        _walk_the_user_path(spark, dagster_dev, page, artifacts)
    except BaseException:
        # What the browser showed when the test failed.
        with contextlib.suppress(Exception):
            _shot(page, artifacts, "failure")
        raise


def _walk_the_user_path(spark, dagster_dev: DagsterDev, page, artifacts: Path) -> None:
    from playwright.sync_api import expect

    ui = dagster_dev.url

    # 1. The asset graph shows the six assets of the nbpipeline group.
    _asset_graph(page, ui, artifacts, "1_asset_graph")

    # 2. A newcomer's first click: "Materialize all" on the group. It writes the five outputs
    # and leaves the source (the user's table; observed, never written) as it was.
    source = DEFAULT_SOURCE_TABLE
    before = _version_and_rows(spark, source)
    with dg.DagsterInstance.from_config(str(dagster_dev.home)) as instance:
        known = {r.run_id for r in instance.get_runs()}
    page.goto(f"{ui}/locations/nbpipeline/asset-groups/nbpipeline/lineage")
    # The graph's six assets, five of them materializable: the button says "Materialize all (5)".
    page.get_by_role("button", name=re.compile(r"Materialize all \(5\)$")).click()
    all_run = _wait_for_run(dagster_dev.home, _new_run_id(dagster_dev.home, known))
    assert all_run.status == dg.DagsterRunStatus.SUCCESS, all_run.status
    assert {k.to_user_string() for k in all_run.asset_selection or ()} == set(OUTPUT_TABLES)
    assert _version_and_rows(spark, source) == before

    # 3. A sequential run on the same instance, from the command line as a user might, while
    # the browser switches a schedule on and off. It comes first: the comparison sensor reacts
    # to runs launched through the UI or daemon (a run executed in-process by `nbpipeline run`
    # has no code location origin), so the UI's parallel run is what completes the pair.
    sequential = subprocess.Popen(
        [sys.executable, "-m", "nbpipeline.cli", "run", "sequential"],
        cwd=PROJECT_ROOT,
        env=dagster_dev.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _toggle_schedule(page, ui, dagster_dev.home, artifacts)
        out, err = sequential.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if sequential.poll() is None:
            sequential.kill()
    assert sequential.returncode == 0, err[-3000:]
    seq_id = out.strip().splitlines()[-1]

    # 4. Launch parallel_notebooks from its launchpad and wait for it to finish.
    page.goto(f"{ui}/locations/nbpipeline/jobs/parallel_notebooks/playground")
    page.get_by_role("button", name=re.compile(r"Launch Run$")).click()
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}"))
    par_id = _run_id_from_url(page.url)
    par_run = _wait_for_run(dagster_dev.home, par_id)
    assert par_run.status == dg.DagsterRunStatus.SUCCESS, par_run.status
    assert par_run.job_name == "parallel_notebooks"

    # 5. The run page says Success, and its timeline has one bar per notebook step.
    page.goto(f"{ui}/runs/{par_id}")
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    bars = page.locator("div.chart-element.box")
    expect(bars.filter(has_text=re.compile(r"^Notebook4$"))).to_have_count(1)
    names = bars.evaluate_all("els => els.map(e => e.getAttribute('data-tooltip'))")
    assert sorted(n for n in names if NOTEBOOK_STEP.match(n or "")) == [
        "Notebook1",
        "Notebook2",
        "Notebook3",
        "Notebook4",
    ], names
    _shot(page, artifacts, "2_parallel_run_timeline")

    # 6. runtime_comparison, refreshed by the sensor after the parallel run, shows the speedup.
    comparison_run = _wait_for_comparison(dagster_dev.home, after=par_id)
    assert comparison_run.status == dg.DagsterRunStatus.SUCCESS, comparison_run.status
    page.goto(f"{ui}/assets/runtime_comparison")

    def metadata_row(key: str):
        """The metadata table's row for `key` (its first cell is exactly the key)."""
        cell = page.locator("td").filter(has_text=re.compile(rf"^\s*{key}\s*$"))
        return page.locator("tr").filter(has=cell).last

    number = re.compile(r"^\s*\d+(\.\d+)?\s*$")
    speedup = metadata_row("speedup")
    expect(speedup.locator("td").last).to_have_text(number)  # key, timestamp, value
    expect(metadata_row("parallel_efficiency").locator("td").last).to_have_text(number)
    # The pair it compares: the two runs of this test.
    expect(metadata_row("sequential_run_id")).to_contain_text(seq_id[:8])
    expect(metadata_row("parallel_run_id")).to_contain_text(par_id[:8])
    speedup.scroll_into_view_if_needed()
    _shot(page, artifacts, "3_runtime_comparison")

    # 7. The graph again, every asset materialized.
    _asset_graph(page, ui, artifacts, "5_asset_graph_materialized")


def _asset_graph(page, ui: str, artifacts: Path, name: str) -> None:
    """Open the nbpipeline group's graph, check its six assets are drawn, screenshot it."""
    from playwright.sync_api import expect

    # Tall enough for the whole graph at the default zoom (five outputs stacked).
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": 1400})
    try:
        page.goto(f"{ui}/locations/nbpipeline/asset-groups/nbpipeline/lineage")
        for asset in ASSETS:
            expect(page.locator(f'[data-tooltip="{asset}"]').first).to_be_in_viewport()
        # The nodes' status rows load after the nodes; only the screenshot waits for them.
        with contextlib.suppress(AssertionError):
            expect(page.get_by_text(re.compile(r"^Loading"))).to_have_count(0, timeout=20_000)
        _shot(page, artifacts, name)
    finally:
        page.set_viewport_size(size)


def _toggle_schedule(page, ui: str, home: Path, artifacts: Path) -> None:
    """Switch parallel_notebooks_schedule on, then off, checking the instance follows."""
    from playwright.sync_api import expect

    name = SCHEDULE_NAMES["parallel"]
    page.goto(f"{ui}/locations/nbpipeline/schedules/{name}")
    state = page.locator("input[type=checkbox]").first
    # The input itself is hidden; what a user clicks is the switch drawn in its label.
    switch = page.locator("label").filter(has=state).first
    expect(state).not_to_be_checked()  # stopped by default
    switch.click()
    expect(state).to_be_checked()
    _wait_schedule_state(home, name, running=True)
    _shot(page, artifacts, "4_schedule_on")
    switch.click()
    expect(state).not_to_be_checked()
    _wait_schedule_state(home, name, running=False)


def _wait_schedule_state(home: Path, name: str, running: bool, timeout_s: float = 30) -> None:
    """Wait until the instance stores the schedule as running (or stopped), as the UI said."""
    # Not exported at the top level of dagster; the instance API that reads them is public.
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.scheduler.instigation import InstigatorStatus

    deadline = time.monotonic() + timeout_s
    status = None
    with dg.DagsterInstance.from_config(str(home)) as instance:
        while time.monotonic() < deadline:
            states = [
                s
                for s in instance.all_instigator_state(instigator_type=InstigatorType.SCHEDULE)
                if s.name == name
            ]
            status = states[0].status if states else None
            if (status == InstigatorStatus.RUNNING) == running:
                return
            time.sleep(0.5)
    pytest.fail(f"schedule {name} is {status} in the instance, expected running={running}")


def _wait_for_comparison(home: Path, after: str, timeout_s: float = 180) -> dg.DagsterRun:
    """The finished runtime_comparison_job run the sensor requested for run `after`.

    The sensor is evaluated by the daemon every 30 s, so this can take a while.
    """
    from nbpipeline.defs.tags import COMPARISON_JOB

    deadline = time.monotonic() + timeout_s
    with dg.DagsterInstance.from_config(str(home)) as instance:
        while time.monotonic() < deadline:
            for run in instance.get_runs(filters=dg.RunsFilter(job_name=COMPARISON_JOB)):
                if after in run.tags.values() and run.is_finished:
                    return run
            time.sleep(1)
    pytest.fail(f"the sensor did not materialize runtime_comparison within {timeout_s:.0f}s")
