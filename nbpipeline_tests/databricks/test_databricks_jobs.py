"""Databricks-native jobs: cron -> Quartz, job settings, deploy / diff / run, and the CLI."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import pytest
from databricks.sdk.service.jobs import JobSettings

from nbpipeline.backend import NOTEBOOK_NAMES
from nbpipeline.cli.databricks import add_subcommands
from nbpipeline.cron import check_timezone
from nbpipeline.databricks.client import make_workspace_client
from nbpipeline.databricks.deploy import deploy, diff_settings, prepared
from nbpipeline.databricks.jobs import JOB_CLUSTER_KEY, JobOptions, build_job_settings
from nbpipeline.databricks.kinds import JOB_KINDS, JOB_NAMES
from nbpipeline.databricks.polling import PollPolicy
from nbpipeline.databricks.quartz import cron_to_quartz
from nbpipeline.databricks.runs import job_run_report, run_deployed_job
from nbpipeline.errors import ConfigError, NbPipelineError, NotebookError
from nbpipeline_tests.fakes.databricks_http import LoopbackDatabricks
from nbpipeline_tests.fakes.databricks_workspace import TOKEN

# ----------------------------------------------------------------------------------------------
# Cron -> Quartz
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "quartz"),
    [
        ("0 6 * * *", "0 0 6 * * ?"),
        ("30 6 * * 1-5", "0 30 6 ? * MON-FRI"),
        ("30 6 * * mon-fri", "0 30 6 ? * MON-FRI"),
        ("0 0 * * 0", "0 0 0 ? * SUN"),
        ("0 0 * * 7", "0 0 0 ? * SUN"),  # 7 is Sunday too
        ("0 0 * * 6", "0 0 0 ? * SAT"),  # cron SAT=6 is Quartz 7
        ("0 0 * * 5-7", "0 0 0 ? * SUN,FRI,SAT"),  # range ending on Sunday
        ("0 0 * * 1,3,5", "0 0 0 ? * MON,WED,FRI"),
        ("0 0 * * */2", "0 0 0 ? * SUN,TUE,THU,SAT"),  # cron days 0,2,4,6
        ("0 0 * * 1-5/2", "0 0 0 ? * MON,WED,FRI"),
        ("0 0 * * 0-6", "0 0 0 ? * *"),
        ("0 0 * * SUN,SAT", "0 0 0 ? * SUN,SAT"),
        ("*/15 * * * *", "0 0/15 * * * ?"),
        ("5/20 * * * *", "0 5/20 * * * ?"),
        ("0 9-17 * * *", "0 0 9-17 * * ?"),
        ("0 9-17/2 * * *", "0 0 9,11,13,15,17 * * ?"),
        ("0 0,12 1,15 * *", "0 0 0,12 1,15 * ?"),
        ("0 0 */2 * *", "0 0 0 1/2 * ?"),
        ("15 3 1 JAN,jul *", "0 15 3 1 1,7 ?"),
        ("0 12 * 1-3 SAT", "0 0 12 ? 1-3 SAT"),
        ("00 05 * * *", "0 0 5 * * ?"),
        ("  0   6 * * *  ", "0 0 6 * * ?"),
        ("@daily", "0 0 0 * * ?"),
        ("@hourly", "0 0 * * * ?"),
        ("@weekly", "0 0 0 ? * SUN"),
        ("@monthly", "0 0 0 1 * ?"),
        ("@yearly", "0 0 0 1 1 ?"),
    ],
)
def test_cron_to_quartz(cron: str, quartz: str) -> None:
    assert cron_to_quartz(cron) == quartz


@pytest.mark.parametrize(
    ("cron", "reason"),
    [
        ("", "empty expression"),
        ("* * * *", "expected 5 fields, got 4"),
        ("0 0 0 * * ?", "expected 5 fields, got 6"),
        ("60 * * * *", "minute value 60 is outside 0-59"),
        ("0 24 * * *", "hour value 24 is outside 0-23"),
        ("0 0 0 * *", "day-of-month value 0 is outside 1-31"),
        ("0 0 * 13 *", "month value 13 is outside 1-12"),
        ("0 0 * * 8", "day-of-week value 8 is outside 0-7"),
        ("0 0 * * MON-FOO", "day-of-week value 'FOO' is not a number"),
        ("0 0 1 * 1", "both day-of-month and day-of-week are set"),
        ("0 0 ? * 1", "Quartz syntax"),
        ("0 0 L * *", "Quartz syntax"),
        ("0 0 * * 1#2", "Quartz syntax"),
        ("5-1 * * * *", "runs backwards"),
        ("*/0 * * * *", "step '0' must be a positive number"),
        ("0 0 * * *,1", "cannot be part of a list"),
        ("1,,2 * * * *", "empty item"),
        ("@reboot", "unknown macro"),
    ],
)
def test_invalid_cron_is_rejected_clearly(cron: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        cron_to_quartz(cron)
    assert reason in str(info.value)
    assert "minute hour day-of-month month day-of-week" in str(info.value)  # the hint


def test_timezones() -> None:
    assert check_timezone("Europe/Amsterdam") == "Europe/Amsterdam"
    assert check_timezone("UTC") == "UTC"
    for bad in ("Mars/Olympus", "", "../etc/passwd", "CEST+1"):
        with pytest.raises(ConfigError, match="timezone"):
            check_timezone(bad)


# ----------------------------------------------------------------------------------------------
# Job settings
# ----------------------------------------------------------------------------------------------


def _settings(mode: str, **options: Any) -> dict[str, Any]:
    return build_job_settings(mode, JobOptions(**options).validated())


def test_sequential_job_chains_the_notebooks_on_one_job_cluster() -> None:
    settings = _settings("sequential", compute="job-cluster", node_type_id="i3.xlarge")
    assert settings["name"] == "nbpipeline-sequential"
    tasks = settings["tasks"]
    assert [t["task_key"] for t in tasks] == list(NOTEBOOK_NAMES)
    assert "depends_on" not in tasks[0]
    for prev, task in zip(tasks, tasks[1:], strict=False):
        assert task["depends_on"] == [{"task_key": prev["task_key"]}]
    assert {t["job_cluster_key"] for t in tasks} == {JOB_CLUSTER_KEY}
    (cluster,) = settings["job_clusters"]
    assert cluster["job_cluster_key"] == JOB_CLUSTER_KEY
    assert {"spark_version", "node_type_id", "num_workers"} <= cluster["new_cluster"].keys()
    assert "schedule" not in settings


def test_parallel_job_has_independent_tasks_and_widget_parameters() -> None:
    settings = _settings("parallel", target_schema="analytics", high_value_threshold="250.50")
    assert settings["name"] == "nbpipeline-parallel"
    assert all("depends_on" not in t for t in settings["tasks"])
    params = {t["task_key"]: t["notebook_task"]["base_parameters"] for t in settings["tasks"]}
    # One source version per job run: every task reads the source as of the run's start.
    common = {
        "source_table": "nbpipeline.orders",
        "target_schema": "analytics",
        "source_version": "{{job.start_time.iso_datetime}}",
    }
    for name in ("Notebook1", "Notebook2", "Notebook3"):
        assert params[name] == common
    assert params["Notebook4"] == {**common, "high_value_threshold": "250.50"}
    paths = [t["notebook_task"]["notebook_path"] for t in settings["tasks"]]
    # One copy per user by default; {user} is resolved at deploy.
    assert paths == [f"/Users/{{user}}/nbpipeline/{n}" for n in NOTEBOOK_NAMES]


def test_schedule_is_quartz_with_timezone_and_paused_by_default() -> None:
    settings = _settings(
        "sequential", crons=(("sequential", "30 6 * * 1-5"),), timezone="Europe/Amsterdam"
    )
    assert settings["schedule"] == {
        "quartz_cron_expression": "0 30 6 ? * MON-FRI",
        "timezone_id": "Europe/Amsterdam",
        "pause_status": "PAUSED",
    }
    assert (
        _settings("comparison", cron="@daily", paused=False)["schedule"]["pause_status"]
        == "UNPAUSED"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"source_table": "orders; DROP TABLE x"}, "invalid source_table"),
        ({"target_schema": "a.b.c"}, "invalid target_schema"),
        ({"high_value_threshold": "lots"}, "invalid high_value_threshold 'lots'"),
        ({"high_value_threshold": "-1"}, "invalid high_value_threshold '-1'"),
        # The notebook's own rule: at most 6 decimals (deploy used to accept this).
        ({"high_value_threshold": "1000.1234567"}, "invalid high_value_threshold"),
        ({"paused": False}, "--unpaused needs a schedule"),
        ({"cron": "0 0 1 * 1"}, "both day-of-month and day-of-week"),
        ({"cron": "@daily", "timezone": "Nowhere/City"}, "unknown timezone"),
        ({"workspace_dir": "relative/dir"}, "absolute workspace folder"),
        ({"workspace_dir": "/Shared/../etc"}, "'..'"),
        ({"node_type_id": "i3.xlarge; rm"}, "node_type_id"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_job_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        JobOptions(**options).validated()


def test_diff_ignores_server_defaults_but_reports_edits() -> None:
    desired = _settings("sequential", compute="job-cluster", node_type_id="i3.xlarge")
    deployed = json.loads(json.dumps(desired))
    deployed["format"] = "MULTI_TASK"
    deployed["run_as"] = {"user_name": "someone@example.com"}
    deployed["email_notifications"] = {}
    deployed["job_clusters"][0]["new_cluster"]["enable_elastic_disk"] = True
    for task in deployed["tasks"]:
        task["run_if"] = "ALL_SUCCESS"
    assert diff_settings(desired, deployed) == []

    deployed["tasks"][1]["depends_on"] = []
    deployed["tasks"].pop()  # Notebook4 deleted by hand
    deployed["tags"]["owner"] = "me"
    deployed["schedule"] = {"quartz_cron_expression": "0 0 0 * * ?", "timezone_id": "UTC"}
    changes = [str(c) for c in diff_settings(desired, deployed)]
    assert '+ tasks[Notebook2].depends_on[Notebook1]: {"task_key": "Notebook1"}' in changes
    assert any(c.startswith("+ tasks[Notebook4]:") for c in changes)
    assert '- tags.owner: "me"' in changes
    assert any(c.startswith("- schedule:") for c in changes)


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    """Parse like the main CLI would (it calls add_subcommands), then run the leaf's func."""
    parser = argparse.ArgumentParser(prog="nbpipeline")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_dry_run_json_needs_no_credentials_and_validates(databricks_env, capsys) -> None:
    assert (
        _cli(
            "databricks",
            "deploy",
            "--dry-run",
            "--json",
            "--cron",
            "0 6 * * MON-FRI",
            "--timezone",
            "America/New_York",
            "--unpaused",
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(JOB_KINDS)
    for settings in out.values():
        # Exactly what databricks-sdk would send, and nothing it does not know.
        assert JobSettings.from_dict(settings).as_dict() == settings
    # One --cron schedules the comparison job only.
    assert [k for k, s in out.items() if "schedule" in s] == ["comparison"]
    assert out["comparison"]["schedule"] == {
        "quartz_cron_expression": "0 0 6 ? * MON-FRI",
        "timezone_id": "America/New_York",
        "pause_status": "UNPAUSED",
    }
    options, _ = prepared(
        None,
        JobOptions(cron="0 6 * * MON-FRI", timezone="America/New_York", paused=False).validated(),
    )
    assert out["sequential"] == build_job_settings("sequential", options)


def test_dry_run_text_and_options(databricks_env, capsys, monkeypatch) -> None:
    monkeypatch.setenv("NBPIPELINE_DATABRICKS_NODE_TYPE_ID", "Standard_D4ds_v5")
    assert (
        _cli(
            "databricks",
            "deploy",
            "--dry-run",
            "--workspace-dir",
            "/Shared/x",
            "--num-workers",
            "2",
            "--source-table",
            "main.sales.orders",
            "--compute",
            "job-cluster",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"Notebook2 +after Notebook1", out) and "/Shared/x/Notebook4" in out
    assert "Standard_D4ds_v5 x 2 workers" in out
    assert "schedule: none" in out and "dry run: nothing was uploaded" in out


def test_cli_errors_are_nbpipeline_errors(databricks_env) -> None:
    with pytest.raises(ConfigError, match="invalid cron"):
        _cli("databricks", "deploy", "--dry-run", "--cron", "61 * * * *")
    with pytest.raises(ConfigError, match="DATABRICKS_HOST is not set"):
        _cli("databricks", "deploy")
    with pytest.raises(SystemExit):  # argparse: --paused and --unpaused together
        _cli("databricks", "deploy", "--paused", "--unpaused")


def test_deploy_pages_through_the_job_list_and_updates_in_place(
    loopback: LoopbackDatabricks, capsys
) -> None:
    # An old copy of the sequential job, then 30 unrelated jobs: with 25 jobs a page, newest
    # first, the existing job is only on the second page.
    existing = loopback.add_job({"name": "nbpipeline-sequential", "tasks": []})
    for i in range(30):
        loopback.add_job({"name": f"unrelated-{i}"})
    assert _cli("databricks", "deploy", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    actions = {j["name"]: (j["action"], j["job_id"]) for j in out["jobs"]}
    assert actions["nbpipeline-sequential"] == ("updated", existing)
    assert actions["nbpipeline-parallel"][0] == "created"
    assert set(out["notebooks"].values()) == {"uploaded"}
    assert len(loopback.jobs) == 35  # five jobs, no duplicate

    lists = loopback.requests_to("/jobs/list")
    assert len(lists) == 2  # 31 jobs at 25 a page
    assert "page_token" not in lists[0].query and lists[1].query["page_token"]
    (reset,) = loopback.requests_to("/jobs/reset")
    assert reset.body["job_id"] == existing
    options = JobOptions(workspace_dir=f"/Users/{loopback.user}/nbpipeline").validated()
    options, _ = prepared(None, options)
    assert reset.body["new_settings"] == build_job_settings("sequential", options)
    creates = loopback.requests_to("/jobs/create")
    assert [c.body["name"] for c in creates] == [
        JOB_NAMES[k] for k in JOB_KINDS if k != "sequential"
    ]
    assert creates[0].body == build_job_settings("parallel", options)

    # Deploying again changes nothing and creates nothing.
    assert _cli("databricks", "deploy") == 0
    text = capsys.readouterr().out
    assert "notebooks: 0 uploaded, 8 unchanged" in text
    assert f"unchanged nbpipeline-sequential (job {existing})" in text
    assert len(loopback.requests_to("/jobs/create")) == 4 and len(loopback.jobs) == 35


def test_duplicate_jobs_stop_deploy_before_any_write(loopback: LoopbackDatabricks) -> None:
    first = loopback.add_job({"name": "nbpipeline-parallel"})
    second = loopback.add_job({"name": "nbpipeline-parallel"})
    with pytest.raises(
        ConfigError, match=f"2 jobs are named 'nbpipeline-parallel' \\(ids {first}, {second}\\)"
    ):
        _cli("databricks", "deploy")
    assert not loopback.requests_to("/jobs/create") and not loopback.requests_to("/jobs/reset")


def test_diff_shows_hand_edits_and_deploy_reverts_them(
    loopback: LoopbackDatabricks, capsys
) -> None:
    assert _cli("databricks", "diff") == 1
    assert "nbpipeline-sequential: not deployed; deploy would create it" in capsys.readouterr().out

    _cli("databricks", "deploy", "--cron", "0 6 * * *")
    capsys.readouterr()
    assert _cli("databricks", "diff", "--cron", "0 6 * * *") == 0
    assert "up to date" in capsys.readouterr().out

    # Edit the deployed job by hand: a notification, a changed parameter, a removed dependency.
    job_id = next(
        i for i, j in loopback.jobs.items() if j["settings"]["name"] == "nbpipeline-sequential"
    )
    settings = loopback.jobs[job_id]["settings"]
    settings["email_notifications"] = {"on_failure": ["ops@example.com"]}
    settings["tasks"][3]["notebook_task"]["base_parameters"]["high_value_threshold"] = "5"
    del settings["tasks"][2]["depends_on"]

    assert _cli("databricks", "diff", "--cron", "0 6 * * *") == 1
    out = capsys.readouterr().out
    assert "nbpipeline-sequential (job" in out and "3 difference(s)" in out
    assert (
        '~ tasks[Notebook4].notebook_task.base_parameters.high_value_threshold: "5" -> "1000.00"'
        in out
    )
    assert '+ tasks[Notebook3].depends_on: [{"task_key": "Notebook2"}]' in out
    assert '- email_notifications: {"on_failure": ["ops@example.com"]}' in out
    assert "nbpipeline-parallel (job" in out and "up to date" in out

    # Without --cron, deploy would drop the schedule: diff says so.
    assert _cli("databricks", "diff", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    seq = next(d for d in report if d["mode"] == "comparison")
    assert {"op": "-", "path": "schedule"} in [
        {"op": c["op"], "path": c["path"]} for c in seq["changes"]
    ]

    # A full reset removes everything edited by hand.
    _cli("databricks", "deploy", "--cron", "0 6 * * *")
    capsys.readouterr()
    assert "email_notifications" not in loopback.jobs[job_id]["settings"]
    assert _cli("databricks", "diff", "--cron", "0 6 * * *") == 0


def _fast(loopback: LoopbackDatabricks) -> None:
    for name in NOTEBOOK_NAMES:
        loopback.behave(name, setup_s=0.1, execution_s=0.3, cleanup_s=0.05)


def test_run_sequential_prints_task_timings_from_the_run_record(
    loopback: LoopbackDatabricks, capsys
) -> None:
    _fast(loopback)
    _cli("databricks", "deploy")
    capsys.readouterr()
    assert (
        _cli("databricks", "run", "sequential", "--poll-initial", "0.05", "--poll-max", "0.2") == 0
    )
    out = capsys.readouterr().out
    assert "nbpipeline-sequential run" in out and "SUCCESS" in out
    (run_now,) = loopback.requests_to("/jobs/run-now")
    assert run_now.body["idempotency_token"].startswith("nbpipeline-")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("Notebook")}
    offsets = [float(lines[n].split()[2].rstrip("s")) for n in NOTEBOOK_NAMES]
    assert offsets[0] == 0.0
    # Each task starts when the one before ends: 0.1 s setup + 0.3 s + 0.05 s cleanup.
    assert offsets == pytest.approx([0.0, 0.45, 0.9, 1.35], abs=0.06)

    assert (
        _cli(
            "databricks", "run", "parallel", "--json", "--poll-initial", "0.05", "--poll-max", "0.2"
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["result"] == "SUCCESS" and report["name"] == "nbpipeline-parallel"
    run = loopback.runs[report["run_id"]]
    truth = {t["task_key"]: t for t in loopback.timeline(run.run_id)["tasks"]}
    for task in report["tasks"]:
        assert task["start_offset_s"] == pytest.approx(0.0, abs=0.01)  # all at once
        assert task["setup_s"] == pytest.approx(truth[task["task_key"]]["setup_s"], abs=0.002)
        assert task["execution_s"] == pytest.approx(
            truth[task["task_key"]]["execution_s"], abs=0.002
        )
    assert report["duration_s"] == pytest.approx(0.45, abs=0.01)


def test_run_failure_reports_timings_then_raises(loopback: LoopbackDatabricks, capsys) -> None:
    _fast(loopback)
    loopback.behave("Notebook2", result="FAILED", error="ValueError: bad threshold")
    _cli("databricks", "deploy")
    capsys.readouterr()
    with pytest.raises(NotebookError) as info:
        _cli("databricks", "run", "sequential", "--poll-initial", "0.05", "--poll-max", "0.2")
    assert str(info.value).startswith(
        "Notebook2: FAILED in job nbpipeline-sequential: ValueError: bad threshold"
    )
    assert info.value.run_url and info.value.run_id
    out = capsys.readouterr().out
    assert "UPSTREAM_FAILED" in out and "error: ValueError: bad threshold" in out


def test_run_needs_a_deployed_job(loopback: LoopbackDatabricks) -> None:
    with pytest.raises(ConfigError, match="job nbpipeline-parallel is not deployed"):
        _cli("databricks", "run", "parallel")


def test_run_timeout_cancels(loopback: LoopbackDatabricks) -> None:
    loopback.behave("Notebook1", execution_s=30)
    _cli("databricks", "deploy")
    with pytest.raises(NbPipelineError, match="no result after 1s"):
        _cli(
            "databricks",
            "run",
            "sequential",
            "--timeout",
            "1",
            "--poll-initial",
            "0.05",
            "--poll-max",
            "0.2",
        )
    (run,) = loopback.runs.values()
    assert run.cancel_at is not None


def test_api_errors_become_one_line_errors(loopback: LoopbackDatabricks, monkeypatch) -> None:
    loopback.inject_error(
        "GET", "/api/2.2/jobs/list", status=400, code="INVALID_STATE", message="nope"
    )
    with pytest.raises(NbPipelineError, match="Databricks API error: nope"):
        _cli("databricks", "diff")


def test_canary_token_never_appears_in_cli_output(
    loopback: LoopbackDatabricks, loopback_canary: str, monkeypatch, capsys, caplog
) -> None:
    canary = loopback_canary
    caplog.set_level("DEBUG")
    _fast(loopback)
    texts = []
    _cli("databricks", "deploy")
    _cli("databricks", "deploy", "--json")
    _cli("databricks", "diff")
    _cli("databricks", "run", "parallel", "--poll-initial", "0.05", "--poll-max", "0.2")
    _cli("databricks", "run", "parallel", "--json", "--poll-initial", "0.05", "--poll-max", "0.2")
    monkeypatch.setenv("DATABRICKS_TOKEN", canary + "-wrong")
    with pytest.raises(NbPipelineError) as info:
        _cli("databricks", "diff")
    texts.append(str(info.value))
    out, err = capsys.readouterr()
    texts += [out, err, caplog.text]
    assert "nbpipeline-parallel" in out
    assert not [t[:200] for t in texts if canary in t]


def test_deploy_function_reports_notebooks_and_jobs(loopback: LoopbackDatabricks) -> None:
    ws = make_workspace_client(loopback.host, TOKEN)
    result = deploy(ws, JobOptions(workspace_dir="/Shared/elsewhere").validated())
    assert [j["action"] for j in result.jobs] == ["created"] * 5
    assert "/Shared/elsewhere/_common" in loopback.objects
    text = result.format_text()
    assert "notebooks: 8 uploaded, 0 unchanged" in text and "created nbpipeline-parallel" in text


def test_only_one_job_can_be_deployed_and_scheduled(loopback: LoopbackDatabricks, capsys) -> None:
    assert _cli("databricks", "deploy", "--dry-run", "--json", "--only", "sequential") == 0
    assert set(json.loads(capsys.readouterr().out)) == {"sequential"}
    assert _cli("databricks", "deploy", "--only", "sequential", "--cron-sequential", "@daily") == 0
    names = sorted(j["settings"]["name"] for j in loopback.jobs.values())
    assert names == ["nbpipeline-sequential"]
    (job,) = loopback.jobs.values()
    assert job["settings"]["schedule"]["quartz_cron_expression"] == "0 0 0 * * ?"
    capsys.readouterr()
    assert _cli("databricks", "diff", "--only", "sequential", "--cron-sequential", "@daily") == 0
    assert "nbpipeline-parallel" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The seed's orchestration jobs, the comparison job, schedules, compute, bundle, drift
# ----------------------------------------------------------------------------------------------


def _dry_run(capsys, *argv: str) -> dict[str, Any]:
    capsys.readouterr()
    assert _cli("databricks", "deploy", "--dry-run", "--json", *argv) == 0
    return json.loads(capsys.readouterr().out)


def test_deploy_writes_the_orchestration_jobs_beside_the_task_graphs(
    databricks_env, capsys
) -> None:
    out = _dry_run(capsys)
    assert [out[k]["name"] for k in JOB_KINDS] == [
        "nbpipeline-sequential",
        "nbpipeline-parallel",
        "nbpipeline-orchestration-sequential",
        "nbpipeline-orchestration-parallel",
        "nbpipeline-comparison",
    ]
    for key, notebook in (
        ("orchestration-sequential", "SequentialOrchestration"),
        ("orchestration-parallel", "ParallelOrchestration"),
    ):
        (task,) = out[key]["tasks"]
        assert task["task_key"] == notebook
        assert task["notebook_task"]["notebook_path"].endswith(f"/nbpipeline/{notebook}")
        assert task["notebook_task"]["base_parameters"] == {
            "source_table": "nbpipeline.orders",
            "target_schema": "",
            "high_value_threshold": "1000.00",
            "timeout_seconds": "3600",
        }
    assert set(_dry_run(capsys, "--layout", "task-graph")) == {"sequential", "parallel"}
    assert set(_dry_run(capsys, "--layout", "orchestration")) == {
        "orchestration-sequential",
        "orchestration-parallel",
        "comparison",
    }


def test_one_cron_schedules_one_comparison_on_one_source_version(databricks_env, capsys) -> None:
    out = _dry_run(capsys, "--cron", "0 2 * * *")
    comparison = out["comparison"]
    assert [t["task_key"] for t in comparison["tasks"]] == [
        "PinSourceVersion",
        "SequentialOrchestration",
        "ParallelOrchestration",
    ]
    pin, seq, par = comparison["tasks"]
    assert seq["depends_on"] == [{"task_key": "PinSourceVersion"}]
    assert par["depends_on"] == [{"task_key": "SequentialOrchestration"}]
    # Both orchestrations read the version the pin task resolved once.
    for task in (seq, par):
        assert task["notebook_task"]["base_parameters"]["source_version"] == (
            "{{tasks.PinSourceVersion.values.source_version}}"
        )
    assert pin["notebook_task"]["base_parameters"]["source_version"] == ""
    assert [k for k, s in out.items() if "schedule" in s] == ["comparison"]
    # Every notebook task retries once (Delta concurrent-modification conflicts).
    for settings in out.values():
        for task in settings["tasks"]:
            if task["task_key"] != "PinSourceVersion":
                assert task["max_retries"] == 1 and task["min_retry_interval_millis"] == 60000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--cron", "0 2 * * *", "--cron-sequential", "0 2 * * 1-5"],
            "schedules of nbpipeline-sequential ('0 2 * * 1-5') and nbpipeline-comparison "
            "('0 2 * * *') both start at 02:00 UTC",
        ),
        (
            ["--cron-parallel", "*/15 * * * *", "--cron-orchestration-parallel", "0 3 * * *"],
            "both start at 03:00",
        ),
        (["--cron-sequential", "0 4 1 * *", "--cron-parallel", "0 4 * * MON"], "at 04:00"),
    ],
)
def test_schedules_that_start_two_jobs_together_are_refused(
    databricks_env, argv: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _cli("databricks", "deploy", "--dry-run", *argv)
    assert message in str(info.value) and "write the same tables" in str(info.value)


def test_schedules_at_different_times_are_accepted(databricks_env, capsys) -> None:
    out = _dry_run(
        capsys,
        "--cron",
        "0 2 * * *",
        "--cron-sequential",
        "30 2 * * *",
        "--cron-parallel",
        "0 4 1 * *",
        "--cron-orchestration-parallel",
        "0 4 15 * *",  # same hour, other days of the month
    )
    assert out["sequential"]["schedule"]["quartz_cron_expression"] == "0 30 2 * * ?"
    assert "schedule" not in out["orchestration-sequential"]


@pytest.mark.parametrize(
    ("host", "node_type"),
    [
        ("https://dbc-1234abcd-5678.cloud.databricks.com", "i3.xlarge"),
        ("https://adb-1234567890123456.7.azuredatabricks.net", "Standard_D4ds_v5"),
        ("https://1234567890123456.7.gcp.databricks.com", "n2-standard-4"),
    ],
)
def test_job_cluster_node_type_fits_the_cloud(
    databricks_env, capsys, monkeypatch, host: str, node_type: str
) -> None:
    monkeypatch.setenv("DATABRICKS_HOST", host)
    out = _dry_run(capsys, "--compute", "job-cluster")
    for settings in out.values():
        (cluster,) = settings["job_clusters"]
        assert cluster["new_cluster"]["node_type_id"] == node_type
        assert {t["job_cluster_key"] for t in settings["tasks"]} == {JOB_CLUSTER_KEY}
    out = _dry_run(capsys, "--compute", "job-cluster", "--node-type-id", "m6gd.large")
    assert out["parallel"]["job_clusters"][0]["new_cluster"]["node_type_id"] == "m6gd.large"


def test_compute_serverless_by_default_or_an_existing_cluster(databricks_env, capsys) -> None:
    cluster_fields = {"job_cluster_key", "existing_cluster_id", "new_cluster", "environment_key"}
    for settings in _dry_run(capsys).values():
        assert "job_clusters" not in settings
        assert all(not cluster_fields & t.keys() for t in settings["tasks"])
    for settings in _dry_run(capsys, "--compute", "existing:0101-123456-abcdef").values():
        assert {t["existing_cluster_id"] for t in settings["tasks"]} == {"0101-123456-abcdef"}
    with pytest.raises(ConfigError, match="needs a node type"):
        _cli("databricks", "deploy", "--dry-run", "--compute", "job-cluster")
    with pytest.raises(ConfigError, match="invalid compute 'gpu'"):
        _cli("databricks", "deploy", "--dry-run", "--compute", "gpu")


def test_notifications_run_as_and_job_parameters_pass_through(
    loopback: LoopbackDatabricks, capsys
) -> None:
    argv = [
        "--notify",
        "ops@example.com",
        "--notify",
        "lead@example.com",
        "--run-as",
        "6f1e1f55-1111-2222-3333-444455556666",
        "--param",
        "source_version=12",
    ]
    assert _cli("databricks", "deploy", *argv) == 0
    for job in loopback.jobs.values():
        s = job["settings"]
        assert s["email_notifications"] == {"on_failure": ["ops@example.com", "lead@example.com"]}
        assert s["run_as"] == {"service_principal_name": "6f1e1f55-1111-2222-3333-444455556666"}
        assert s["parameters"] == [{"name": "source_version", "default": "12"}]
    capsys.readouterr()
    assert _cli("databricks", "diff", *argv) == 0
    with pytest.raises(ConfigError, match="--notify 'nobody' is not an e-mail address"):
        _cli("databricks", "deploy", "--dry-run", "--notify", "nobody")
    with pytest.raises(ConfigError, match="expected NAME=VALUE"):
        _cli("databricks", "deploy", "--dry-run", "--param", "novalue")


def test_deploy_uses_a_folder_per_user_and_diff_reports_drift(
    loopback: LoopbackDatabricks, capsys, databricks_env
) -> None:
    assert _cli("databricks", "deploy", "--layout", "task-graph") == 0
    folder = f"/Users/{loopback.user}/nbpipeline"
    assert f"{folder}/Notebook1" in loopback.objects
    assert not any(p.startswith("/Shared/nbpipeline") for p in loopback.objects)
    job = next(j for j in loopback.jobs.values() if j["settings"]["name"] == "nbpipeline-parallel")
    assert len(job["settings"]["tags"]["nbpipeline_notebooks_sha256"]) == 64
    capsys.readouterr()
    assert _cli("databricks", "diff", "--layout", "task-graph") == 0

    # Someone edits Notebook2 in the workspace: the deployed job now runs other code.
    obj = loopback.objects[f"{folder}/Notebook2"]
    obj["content"] = obj["content"] + b"\nprint('hand edit')\n"
    capsys.readouterr()
    assert _cli("databricks", "diff", "--layout", "task-graph", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert all("differ from local: Notebook2" in d["drift"] for d in report)
    assert all(d["changes"] == [] for d in report)

    # Redeploying restores the workspace copy; a local edit shows as a changed hash.
    assert _cli("databricks", "deploy", "--layout", "task-graph") == 0
    assert _cli("databricks", "diff", "--layout", "task-graph") == 0
    (databricks_env / "Notebook3.py").write_text("# Databricks notebook source\nprint(3)\n")
    capsys.readouterr()
    assert _cli("databricks", "diff", "--layout", "task-graph") == 1
    assert "~ tags.nbpipeline_notebooks_sha256" in capsys.readouterr().out


def test_bundle_jobs_are_job_settings_and_match_deploy(databricks_env, capsys, tmp_path) -> None:
    import yaml

    out = tmp_path / "bundle"
    argv = ["--cron", "0 2 * * *", "--notify", "ops@example.com"]
    assert _cli("databricks", "bundle", "--out", str(out), *argv) == 0
    root = yaml.safe_load((out / "databricks.yml").read_text())
    assert root["bundle"]["name"] == "nbpipeline"
    assert root["targets"]["dev"]["mode"] == "development"
    assert root["targets"]["prod"]["mode"] == "production"
    assert root["include"] == ["resources/*.yml"]
    resources = yaml.safe_load((out / "resources" / "nbpipeline.jobs.yml").read_text())
    bundle_jobs = resources["resources"]["jobs"]
    for settings in bundle_jobs.values():
        assert JobSettings.from_dict(settings).as_dict() == settings
        for task in settings["tasks"]:
            path = task["notebook_task"]["notebook_path"]
            assert (out / "resources" / path).resolve().is_file(), path
    deployed = _dry_run(capsys, *argv)
    assert sorted(s["name"] for s in bundle_jobs.values()) == sorted(
        s["name"] for s in deployed.values()
    )
    # Same settings apart from where the notebooks live.
    for key, settings in deployed.items():
        mine = bundle_jobs[key.replace("-", "_")]
        for task in settings["tasks"]:
            task["notebook_task"].pop("notebook_path")
        for task in mine["tasks"]:
            task["notebook_task"].pop("notebook_path")
        assert mine == settings
    assert sorted(p.name for p in (out / "src").iterdir()) == sorted(
        p.name for p in databricks_env.glob("*.py")
    )


def _short(loopback: LoopbackDatabricks, seconds: float = 0.3) -> None:
    for name in NOTEBOOK_NAMES:
        loopback.behave(name, setup_s=0.05, execution_s=seconds, cleanup_s=0.05)


def _check_children(loopback: LoopbackDatabricks, report: dict[str, Any], task_key: str) -> None:
    """The report's child timings against the server's own timeline of those child runs."""
    (task,) = [t for t in report["tasks"] if t["task_key"] == task_key]
    assert [c["task_key"] for c in sorted(task["children"], key=lambda c: c["task_key"])] == list(
        NOTEBOOK_NAMES
    )
    origin = loopback.runs[report["run_id"]].created
    for child in task["children"]:
        (truth,) = loopback.timeline(child["run_id"])["tasks"]
        assert child["start_offset_s"] == pytest.approx(truth["start"] - origin, abs=0.002)
        assert child["end_offset_s"] == pytest.approx(truth["end"] - origin, abs=0.002)
        assert child["execution_s"] == pytest.approx(truth["execution_s"], abs=0.002)


def test_run_orchestration_jobs_reports_the_child_runs(
    loopback: LoopbackDatabricks, capsys
) -> None:
    _short(loopback)
    _cli("databricks", "deploy", "--layout", "orchestration")
    fast = ("--poll-initial", "0.05", "--poll-max", "0.2", "--json")
    reports = {}
    for key in ("orchestration-sequential", "orchestration-parallel"):
        capsys.readouterr()
        assert _cli("databricks", "run", key, *fast) == 0
        reports[key] = json.loads(capsys.readouterr().out)
    seq, par = reports["orchestration-sequential"], reports["orchestration-parallel"]
    _check_children(loopback, seq, "SequentialOrchestration")
    _check_children(loopback, par, "ParallelOrchestration")
    seq_starts = sorted(c["start_offset_s"] for c in seq["tasks"][0]["children"])
    # One after another: each child starts after the one before ended.
    assert all(b - a >= 0.3 for a, b in zip(seq_starts, seq_starts[1:], strict=False))
    par_starts = [c["start_offset_s"] for c in par["tasks"][0]["children"]]
    assert max(par_starts) - min(par_starts) < 0.01  # all at once

    # compare: the per-notebook steps are the child runs.
    capsys.readouterr()
    from nbpipeline.cli.compare import add_subcommands as add_compare

    parser = argparse.ArgumentParser(prog="nbpipeline")
    add_compare(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["compare", "--json", "--databricks-runs", str(seq["run_id"]), str(par["run_id"])]
    )
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    text = json.dumps(result)
    assert all(n in text for n in NOTEBOOK_NAMES)


def simulate_comparison(loopback: LoopbackDatabricks, seconds: float) -> dict[str, Any]:
    """Deploy and run the comparison job with notebooks of `seconds` each; figures vs truth."""
    _short(loopback, seconds)
    _cli("databricks", "deploy", "--layout", "orchestration", "--cron", "0 2 * * *")
    report = run_deployed_job(
        make_workspace_client(loopback.host, TOKEN),
        "comparison",
        policy=PollPolicy(initial=0.05, maximum=0.5),
    )
    assert report.succeeded
    data = json.loads(json.dumps(report.as_dict()))
    _check_children(loopback, data, "SequentialOrchestration")
    _check_children(loopback, data, "ParallelOrchestration")
    seq, par = report.orchestration_parts()
    origin = loopback.runs[report.run_id].created
    deviation = 0.0
    for part in (seq, par):
        for child in part.notebook_timings():
            (truth,) = loopback.timeline(int(child.run_id))["tasks"]
            start = part.start_time + (child.start_offset_s or 0)
            deviation = max(deviation, abs(start - truth["start"]))
    return {
        "notebook_s": seconds,
        "sequential_wall_s": seq.duration_s,
        "parallel_wall_s": par.duration_s,
        "speedup": round(seq.duration_s / par.duration_s, 2),
        "comparison_run_s": report.duration_s,
        "server_run_s": round(
            max(loopback.timeline(report.run_id)["tasks"][-1]["end"], 0) - origin, 3
        ),
        "max_deviation_from_server_s": round(deviation, 4),
    }


def test_comparison_job_runs_both_orchestrations_one_after_another(
    loopback: LoopbackDatabricks, capsys
) -> None:
    figures = simulate_comparison(loopback, 0.4)
    print(json.dumps(figures))
    # `databricks run comparison` and `compare --databricks-runs RUN_ID` on the CLI.
    assert (
        _cli("databricks", "run", "comparison", "--poll-initial", "0.05", "--poll-max", "0.2") == 0
    )
    (latest,) = [
        r for r in loopback.runs.values() if r.run_type == "JOB_RUN" and r.number_in_job == 2
    ]
    capsys.readouterr()
    parser = argparse.ArgumentParser(prog="nbpipeline")
    from nbpipeline.cli.compare import add_subcommands as add_compare

    add_compare(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", "--json", "--databricks-runs", str(latest.run_id)])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sequential"]["mode"] == "sequential" and result["parallel"]["mode"] == "parallel"
    assert [s["step"] for s in result["parallel"]["steps"]] == list(NOTEBOOK_NAMES)
    assert figures["sequential_wall_s"] >= 4 * 0.4
    assert figures["max_deviation_from_server_s"] <= 0.005
    # The parallel orchestration started only after the sequential one had finished.
    run = min(
        (r for r in loopback.runs.values() if r.run_type == "JOB_RUN"), key=lambda r: r.created
    )
    tl = {t["task_key"]: t for t in loopback.timeline(run.run_id)["tasks"]}
    assert tl["ParallelOrchestration"]["start"] >= tl["SequentialOrchestration"]["end"]


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("NBPIPELINE_LONG_SIMULATION"),
    reason="the figures of README's 20 s simulation: NBPIPELINE_LONG_SIMULATION=1 (the 0.4 s "
    "variant above checks the same)",
)
def test_comparison_job_with_20s_notebooks(loopback: LoopbackDatabricks) -> None:
    figures = simulate_comparison(loopback, 20.0)
    print(json.dumps(figures))
    assert figures["sequential_wall_s"] >= 80 and figures["parallel_wall_s"] < 40


# ----------------------------------------------------------------------------------------------
# Live workspace (skipped unless DATABRICKS_HOST and a token are set)
# ----------------------------------------------------------------------------------------------

_LIVE = bool(os.environ.get("DATABRICKS_HOST") and os.environ.get("DATABRICKS_TOKEN"))
live = pytest.mark.skipif(not _LIVE, reason="needs DATABRICKS_HOST and DATABRICKS_TOKEN")


@pytest.mark.databricks
@live
def test_live_diff_reads_every_job_and_the_workspace_copy(capsys) -> None:
    # Read-only: deploy would replace the workspace's nbpipeline jobs, so it is not run here.
    code = _cli("databricks", "diff", "--json")
    report = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and [d["name"] for d in report] == [JOB_NAMES[k] for k in JOB_KINDS]


@pytest.mark.databricks
@live
@pytest.mark.skipif(
    not os.environ.get("NBPIPELINE_LIVE_RUN_JOBS"),
    reason="set NBPIPELINE_LIVE_RUN_JOBS=1 to run the deployed comparison job",
)
def test_live_comparison_job_reports_child_runs() -> None:
    host = os.environ["DATABRICKS_HOST"]
    report = run_deployed_job(
        make_workspace_client(host, os.environ["DATABRICKS_TOKEN"]), "comparison"
    )
    assert report.succeeded
    seq, par = report.orchestration_parts()
    assert sorted(t.task_key for t in seq.notebook_timings()) == list(NOTEBOOK_NAMES)
    assert sorted(t.task_key for t in par.notebook_timings()) == list(NOTEBOOK_NAMES)


def test_widget_values_follow_the_one_rule_and_the_notebooks_default(
    databricks_env, capsys
) -> None:
    # No default of its own: Notebook4's widget default is what deploy writes.
    nb4 = databricks_env / "Notebook4.py"
    nb4.write_text(nb4.read_text().replace('"1000.00"', '"250.50"'))
    out = _dry_run(capsys)
    params = out["parallel"]["tasks"][3]["notebook_task"]["base_parameters"]
    assert params["high_value_threshold"] == "250.50"
    # The same rule as run config and the notebook (at most 6 decimals), for deploy and bundle.
    for command in ("deploy", "bundle"):
        extra = ["--out", str(databricks_env.parent / "b")] if command == "bundle" else []
        with pytest.raises(ConfigError, match="invalid high_value_threshold '1000.1234567'"):
            _cli("databricks", command, *extra, "--high-value-threshold", "1000.1234567")
        with pytest.raises(ConfigError, match="invalid target_schema"):
            _cli("databricks", command, *extra, "--target-schema", "a b")


def test_a_retried_task_is_one_timing_with_its_last_outcome(databricks_env) -> None:
    """A task retried after a Delta conflict is listed once per attempt in the run record."""
    from databricks.sdk.service import jobs

    def task(attempt: int, start: int, end: int, result: str) -> dict[str, Any]:
        return {
            "task_key": "Notebook2",
            "run_id": 20 + attempt,
            "attempt_number": attempt,
            "start_time": start,
            "end_time": end,
            "execution_duration": end - start,
            "state": {"life_cycle_state": "TERMINATED", "result_state": result},
        }

    run = jobs.Run.from_dict(
        {
            "run_id": 10,
            "start_time": 1_000_000,
            "end_time": 1_090_000,
            "run_duration": 90_000,
            "state": {"life_cycle_state": "TERMINATED", "result_state": "SUCCESS"},
            "tasks": [
                task(0, 1_000_000, 1_010_000, "FAILED"),
                task(1, 1_070_000, 1_090_000, "SUCCESS"),
            ],
        }
    )

    class _NoOutput:
        class jobs:
            @staticmethod
            def get_run_output(_run_id: int) -> Any:
                raise AssertionError("a succeeded task needs no error lookup")

    report = job_run_report(_NoOutput(), "parallel", 1, run)  # type: ignore[arg-type]
    (timing,) = report.tasks
    assert timing.result == "SUCCESS" and timing.attempts == 2
    assert timing.start_offset_s == 0.0 and timing.end_offset_s == 90.0
    assert "2 attempts (retried)" in report.format_text()
