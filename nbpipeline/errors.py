"""One family of errors, so callers (CLI, Dagster assets) can show a one-line message.

Every error raised on purpose by nbpipeline derives from `NbPipelineError`. Its `str()` is the
message a user sees; `hint` (optional) says which command or setting fixes it. Message and hint
are passed through `nbpipeline.redact` here, so no error of the family can carry a secret to the
CLI, a log line or the Dagster event log.
"""

from __future__ import annotations

from nbpipeline.redact import redact


class NbPipelineError(Exception):
    """Base class: a problem nbpipeline understood and can describe in one line."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        message = redact(message)
        hint = redact(hint) if hint else hint
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ConfigError(NbPipelineError):
    """Invalid settings or parameters, detected before anything is written."""


class UnreachableError(ConfigError):
    """The engine or workspace a setting names cannot be reached or refuses the credentials.

    A ConfigError: a wrong address or credential is not transient, so it is reported at once
    and never retried. `setting` names what to check (e.g. NBPIPELINE_SPARK_REMOTE).
    """

    def __init__(self, message: str, *, setting: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.setting = setting


class EngineError(NbPipelineError):
    """The Spark engine cannot be started, reached, or has gone away."""


class EngineGoneError(EngineError):
    """The local engine process died while a notebook was using it (killed, OOM, stopped).

    Not retried within the run: whoever stopped the engine should see it, and the next run
    starts it again.
    """


class JarsError(EngineError):
    """The Delta Lake JARs are missing and cannot be resolved."""


class NotebookError(NbPipelineError):
    """A notebook failed. Carries the notebook path and, when known, the failing cell."""

    def __init__(
        self,
        message: str,
        *,
        notebook: str,
        cell: int | None = None,
        traceback_text: str | None = None,
        hint: str | None = None,
        run_url: str | None = None,
        run_id: int | str | None = None,
    ) -> None:
        where = notebook if cell is None else f"{notebook}, cell {cell}"
        super().__init__(f"{where}: {message}", hint=hint)
        self.notebook = notebook
        self.cell = cell
        self.reason = redact(message)
        self.traceback_text = redact(traceback_text) if traceback_text else traceback_text
        self.run_url = run_url
        self.run_id = run_id


class NotebookTimeout(NotebookError):
    """A notebook did not finish within its timeout."""
