"""Secret redaction: the one place that knows which settings are secret and masks them in text.

Secrets reach nbpipeline only through the environment (or a Spark Connect URL's `token=`
parameter). Every message nbpipeline shows or stores passes through `redact()`: the error
family's messages and hints (`nbpipeline.errors`), everything the CLI prints (its stdout and
stderr are wrapped in `RedactingStream`), the engine address shown in logs and metadata, and the
step failures and log lines a notebook step records in Dagster. What is masked:

- the value of every environment variable whose name is a known secret (`DATABRICKS_TOKEN`,
  `DATABRICKS_CLIENT_SECRET`, `DATABRICKS_PASSWORD`, ...) or ends in TOKEN, SECRET or PASSWORD;
- the `token=` parameter of any `sc://` URL, wherever the URL came from;
- a password in a URL's user-info part (`https://user:pw@host`) and a `Bearer` credential.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import TextIO
from urllib.parse import unquote

MASK = "***"
#: Settings that hold a secret, besides any variable whose name ends in one of SECRET_SUFFIXES.
SECRET_SETTINGS = (
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
    "DATABRICKS_PASSWORD",
    "SPARK_CONNECT_AUTHENTICATE_TOKEN",
    "ARM_CLIENT_SECRET",
)
SECRET_SUFFIXES = ("TOKEN", "SECRET", "PASSWORD")
# Shorter values are not masked as plain text: "1" or "true" would blank out unrelated text.
# The URL and header patterns below still mask them where they appear as a credential.
_MIN_VALUE_LENGTH = 6

_URL_TOKEN = re.compile(r"(?i)(;\s*token\s*=\s*)([^;\s'\"<>,)]+)")
_USERINFO_PASSWORD = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)([^@/\s]+)(@)")
_BEARER = re.compile(r"(?i)(\bBearer\s+)([A-Za-z0-9._~+/=-]+)")

_registered: set[str] = set()
_lock = threading.Lock()


def is_secret_setting(name: str) -> bool:
    """Whether the environment variable `name` holds a secret."""
    upper = name.upper()
    return upper in SECRET_SETTINGS or upper.endswith(SECRET_SUFFIXES)


def register(value: str | None) -> None:
    """Mask `value` from now on too (a secret that did not come from the environment)."""
    if value and len(value) >= _MIN_VALUE_LENGTH:
        with _lock:
            _registered.add(value)


def secret_values() -> set[str]:
    """Every secret value currently known: secret settings and tokens inside sc:// settings."""
    values: set[str] = set()
    for name, value in os.environ.items():
        if not value:
            continue
        if is_secret_setting(name):
            values.add(value)
        elif "sc://" in value:
            values.update(m.group(2) for m in _URL_TOKEN.finditer(value))
    with _lock:
        values |= _registered
    values |= {unquote(v) for v in values}
    return {v.strip() for v in values if len(v.strip()) >= _MIN_VALUE_LENGTH}


def redact(text: str | None) -> str:
    """`text` with every secret replaced by `***` (None becomes "")."""
    if not text:
        return text or ""
    text = _URL_TOKEN.sub(rf"\g<1>{MASK}", text)
    text = _USERINFO_PASSWORD.sub(rf"\g<1>{MASK}\g<3>", text)
    text = _BEARER.sub(rf"\g<1>{MASK}", text)
    for value in sorted(secret_values(), key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text


class RedactedError(Exception):
    """Stands in for an exception whose text contained a secret: same type name, masked text."""


def scrub(exc: BaseException) -> BaseException:
    """`exc` itself if its text holds no secret, else a `RedactedError` with the masked text.

    Dagster stores a failed step's exception text in the event log; this keeps secrets out.
    """
    text = str(exc)
    clean = redact(text)
    if clean == text:
        return exc
    return RedactedError(f"{type(exc).__name__}: {clean}")


class RedactingStream(io.TextIOBase):
    """A text stream that masks secrets in everything written to it (the CLI's stdout/stderr)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def write(self, text: str | bytes) -> int:
        # click.echo (Dagster's telemetry notice, for one) may hand a text stream bytes.
        if isinstance(text, bytes | bytearray):
            self._stream.write(redact(bytes(text).decode(self.encoding, errors="replace")))
        else:
            self._stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> object:
        # Anything else (e.g. `buffer`) is the wrapped stream's, so callers that expect a real
        # console stream keep working.
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacting_std_streams() -> Iterator[None]:
    """Route this process's stdout and stderr through `redact` while the block runs."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
