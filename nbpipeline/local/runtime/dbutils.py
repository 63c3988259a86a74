"""The parts of Databricks' `dbutils` that notebooks here use: widgets and notebook workflows.

Semantics follow Databricks: widget values are strings; a value passed by the caller (job
parameters, `dbutils.notebook.run` arguments) wins over the widget's default; `get` on a widget
that was never declared nor passed is an error; `notebook.exit` ends the notebook with a string
value; `notebook.run` runs another notebook with its own widgets and returns its exit value.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from nbpipeline.errors import NotebookTimeout

T = TypeVar("T")


class NotebookExit(Exception):  # mirrors Databricks' control flow, not an error
    """Raised by `dbutils.notebook.exit` to end the notebook; carries its exit value."""

    def __init__(self, value: str) -> None:
        super().__init__(value)
        self.value = value


class WidgetsUtils:
    """`dbutils.widgets`: declared widgets with defaults, overridden by passed arguments."""

    def __init__(self, arguments: Mapping[str, str]) -> None:
        self._arguments = {str(k): str(v) for k, v in arguments.items()}
        self._widgets: dict[str, dict[str, Any]] = {}

    def _declare(self, kind: str, name: str, default: str, choices: list[str] | None) -> None:
        default = str(default)
        if choices is not None:
            choices = [str(c) for c in choices]
            if default not in choices:
                raise ValueError(f"default {default!r} of widget {name!r} is not in {choices}")
        self._widgets[name] = {"kind": kind, "default": default, "choices": choices}

    def text(self, name: str, defaultValue: str = "", label: str | None = None) -> None:
        self._declare("text", name, defaultValue, None)

    def dropdown(
        self,
        name: str,
        defaultValue: str,
        choices: list[str],
        label: str | None = None,
    ) -> None:
        self._declare("dropdown", name, defaultValue, choices)

    def combobox(
        self,
        name: str,
        defaultValue: str,
        choices: list[str],
        label: str | None = None,
    ) -> None:
        self._declare("combobox", name, defaultValue, None)

    def multiselect(
        self,
        name: str,
        defaultValue: str,
        choices: list[str],
        label: str | None = None,
    ) -> None:
        self._declare("multiselect", name, defaultValue, choices)

    def get(self, name: str) -> str:
        widget = self._widgets.get(name)
        if name in self._arguments:
            value = self._arguments[name]
            if widget and widget["kind"] == "dropdown" and value not in widget["choices"]:
                raise ValueError(
                    f"value {value!r} for widget {name!r} is not one of {widget['choices']}"
                )
            return value
        if widget is not None:
            return widget["default"]
        raise ValueError(f"InputWidgetNotDefined: no input widget named {name!r} is defined")

    def getArgument(self, name: str, optional: str | None = None) -> str | None:
        try:
            return self.get(name)
        except ValueError:
            return optional

    def getAll(self) -> dict[str, str]:
        values = {name: w["default"] for name, w in self._widgets.items()}
        values.update(self._arguments)
        return values

    def remove(self, name: str) -> None:
        self._widgets.pop(name, None)

    def removeAll(self) -> None:
        self._widgets.clear()


#: Runs a child notebook (`dbutils.notebook.run`): (path as written, arguments, timeout seconds
#: or None) -> its exit value. The notebook runner supplies it, so this module needs no import of
#: the runner.
ChildRunner = Callable[[str, dict[str, str], float | None], str | None]


class NotebookUtils:
    """`dbutils.notebook`: exit with a value, or run another notebook and get its value."""

    def __init__(self, run_child: ChildRunner) -> None:
        self._run_child = run_child

    def exit(self, value: Any) -> None:
        raise NotebookExit(str(value))

    def run(
        self,
        path: str,
        timeout_seconds: int = 0,
        arguments: Mapping[str, Any] | None = None,
    ) -> str | None:
        args = {str(k): str(v) for k, v in (arguments or {}).items()}
        return self._run_child(path, args, timeout_seconds or None)


class DBUtils:
    """The `dbutils` object injected into a locally run notebook."""

    def __init__(self, arguments: Mapping[str, str], *, run_child: ChildRunner) -> None:
        self.widgets = WidgetsUtils(arguments)
        self.notebook = NotebookUtils(run_child)


def display(obj: Any, *args: Any, **kwargs: Any) -> None:
    """Show a DataFrame's first rows (as Databricks' display does), or print anything else."""
    if hasattr(obj, "show") and hasattr(obj, "columns"):
        obj.show(20, truncate=False)
    else:
        print(obj)  # noqa: T201 - notebook output goes to stdout, as on Databricks


def displayHTML(html: str) -> None:
    print(html)  # noqa: T201


def run_with_timeout(fn: Callable[[], T], spark: Any, timeout_s: float, notebook: str) -> T:
    """Run `fn` in a thread; on timeout cancel its Spark work (by tag) and raise NotebookTimeout.

    Spark Connect tags are per thread, so tagging inside the worker marks exactly the
    operations of this notebook run, and `interruptTag` stops them on the server.
    """
    tag = f"nbpipeline-{uuid.uuid4().hex[:12]}"
    outcome: dict[str, Any] = {}

    def worker() -> None:
        tagged = hasattr(spark, "addTag")
        if tagged:
            spark.addTag(tag)
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            if tagged:
                spark.removeTag(tag)

    thread = threading.Thread(target=worker, name=tag, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        if hasattr(spark, "interruptTag"):
            # Best effort: the timeout is what we report, whether or not the cancel lands.
            with contextlib.suppress(Exception):
                spark.interruptTag(tag)
        raise NotebookTimeout(f"did not finish within {timeout_s:g}s", notebook=notebook)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
