"""The one redaction module: which settings are secret, and that every path masks them."""

from __future__ import annotations

import io
import os

import click
import pytest

from nbpipeline import redact
from nbpipeline.errors import ConfigError, NotebookError


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "DATABRICKS_TOKEN": "dapi-" + os.urandom(8).hex(),
        "DATABRICKS_CLIENT_SECRET": "dose-" + os.urandom(8).hex(),
        "DATABRICKS_PASSWORD": "pw-" + os.urandom(8).hex(),
        "MY_SERVICE_TOKEN": "tok-" + os.urandom(8).hex(),
        "WAREHOUSE_PASSWORD": "wpw-" + os.urandom(8).hex(),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(
        "NBPIPELINE_SPARK_REMOTE", "sc://engine.example:443/;use_ssl=true;token=sc-url-secret-1"
    )
    values["sc token"] = "sc-url-secret-1"
    return values


def test_secret_settings_are_known_by_name() -> None:
    for name in ("DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_PASSWORD"):
        assert redact.is_secret_setting(name)
    assert redact.is_secret_setting("ANY_API_TOKEN") and redact.is_secret_setting("x_secret")
    assert not redact.is_secret_setting("DATABRICKS_HOST")
    assert not redact.is_secret_setting("NBPIPELINE_SPARK_REMOTE")  # only its token= is


def test_every_secret_value_is_masked_in_any_text(secrets: dict[str, str]) -> None:
    text = " | ".join(f"{k}={v}" for k, v in secrets.items())
    masked = redact.redact(text)
    assert not [v for v in secrets.values() if v in masked]
    assert masked.count("***") == len(secrets)
    assert "DATABRICKS_TOKEN=***" in masked  # names stay, so the message still says what


def test_url_token_password_and_bearer_are_masked_wherever_they_come_from() -> None:
    text = (
        "at sc://h:1/;token=abc;user_id=u and sc://h:2/;use_ssl=true;token=x%2Fy; "
        "https://me:hunter2@example.com/x Authorization: Bearer abc.def-ghi"
    )
    assert redact.redact(text) == (
        "at sc://h:1/;token=***;user_id=u and sc://h:2/;use_ssl=true;token=***; "
        "https://me:***@example.com/x Authorization: Bearer ***"
    )


def test_errors_and_their_hints_are_redacted_at_construction(secrets: dict[str, str]) -> None:
    token = secrets["DATABRICKS_TOKEN"]
    err = ConfigError(f"bad {token}", hint=f"not {token}")
    assert token not in str(err) and token not in repr(err) and token not in err.hint
    nb = NotebookError(f"failed {token}", notebook="n", traceback_text=f"trace {token}")
    assert token not in str(nb) + nb.reason + (nb.traceback_text or "")


def test_scrub_replaces_only_an_exception_that_holds_a_secret(secrets: dict[str, str]) -> None:
    clean = RuntimeError("no secret here")
    assert redact.scrub(clean) is clean
    dirty = redact.scrub(RuntimeError(f"got {secrets['MY_SERVICE_TOKEN']}"))
    assert str(dirty) == "RuntimeError: got ***"


def test_the_cli_streams_mask_whatever_is_printed(secrets: dict[str, str]) -> None:
    sink = io.StringIO()
    stream = redact.RedactingStream(sink)
    print("x", secrets["WAREHOUSE_PASSWORD"], file=stream)
    assert sink.getvalue() == "x ***\n"


def test_click_output_on_the_cli_streams_is_masked(
    secrets: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Dagster prints its first-run telemetry notice with click, which hands the stream bytes.
    with redact.redacting_std_streams():
        click.secho(f"notice {secrets['WAREHOUSE_PASSWORD']}", err=True)
    assert capsys.readouterr().err == "notice ***\n"


def test_short_values_are_not_masked_as_plain_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATURE_TOKEN", "1")
    assert redact.redact("run 1 of 1") == "run 1 of 1"
