"""Execute a Databricks source-format notebook locally, as Databricks would.

A notebook file starts with `# Databricks notebook source`; cells are separated by
`# COMMAND ----------`; a cell may start with a title line (`# DBTITLE 1,Title`); magic cells
are written as `# MAGIC %md`, `# MAGIC %sql`, `# MAGIC %run`.
The runtime injects `spark`, `dbutils` and `display`, skips `%md`, runs `%sql` through Spark,
inlines `%run ./Other` (same namespace, as on Databricks) and refuses every other magic before
anything runs. A failing cell raises `NotebookError` naming the notebook path and cell number,
with the notebook-level traceback and without JVM frames.
"""

from __future__ import annotations

import ast
import contextlib
import linecache
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nbpipeline.errors import ConfigError, NotebookError
from nbpipeline.local.runtime.dbutils import DBUtils, NotebookExit, display, displayHTML

HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"
MAGIC = "# MAGIC"
TITLE = "# DBTITLE"
ALLOWED_MAGICS = {"%md", "%sql", "%run", "%python"}
WIDGET_KINDS = {"text", "dropdown", "combobox", "multiselect"}


@dataclass(frozen=True)
class Cell:
    """One cell of a notebook. `index` is 1-based; `line` is the file line of its first line."""

    path: Path
    index: int
    line: int
    kind: str  # python | md | sql | run
    source: str
    target: Path | None = None  # the notebook a %run cell includes
    title: str | None = None  # from a `# DBTITLE 1,Title` first line


def _resolve_notebook(base: Path, ref: str) -> Path:
    """`./Other` relative to the including notebook; `.py` is implied as on Databricks."""
    path = (base.parent / ref).resolve() if not Path(ref).is_absolute() else Path(ref)
    if path.suffix != ".py":
        path = path.with_name(path.name + ".py")
    return path


def parse_notebook(path: str | Path) -> list[Cell]:
    """Split a notebook into cells; refuse files that are not Databricks source notebooks and
    magics the local runtime cannot run (naming the cell)."""
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as exc:
        raise NotebookError(f"cannot read notebook: {exc.strerror}", notebook=str(path)) from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise NotebookError(
            f"not a Databricks source notebook (first line must be '{HEADER}')", notebook=str(path)
        )
    cells: list[Cell] = []
    start, chunk = 2, list[str]()
    for number, line in enumerate(lines[1:], start=2):
        if line.strip() == SEPARATOR:
            cells.append(_make_cell(path, len(cells) + 1, start, chunk))
            start, chunk = number + 1, []
        else:
            chunk.append(line)
    cells.append(_make_cell(path, len(cells) + 1, start, chunk))
    return [c for c in cells if c.source.strip() or c.kind != "python"]


def _make_cell(path: Path, index: int, line: int, chunk: list[str]) -> Cell:
    # A cell's title (`# DBTITLE 1,Title`, the UI's title line) is not code: blanked, so that
    # line numbers still match the file and a titled magic cell is still a magic cell.
    title = None
    first = next((i for i, ln in enumerate(chunk) if ln.strip()), None)
    if first is not None and chunk[first].lstrip().startswith(TITLE):
        title = chunk[first].lstrip()[len(TITLE) :].split(",", 1)[-1].strip()
        chunk = [*chunk[:first], "", *chunk[first + 1 :]]
    cell = _make_untitled_cell(path, index, line, chunk)
    return replace(cell, title=title) if title is not None else cell


def _make_untitled_cell(path: Path, index: int, line: int, chunk: list[str]) -> Cell:
    body = [ln for ln in chunk if ln.strip()]
    if body and all(ln.lstrip().startswith(MAGIC) for ln in body):
        stripped = []
        for ln in chunk:
            ln = ln.lstrip()
            if ln.startswith(MAGIC):
                ln = ln[len(MAGIC) :]
                ln = ln[1:] if ln.startswith(" ") else ln
            stripped.append(ln)
        # Leading blank lines are kept so that line numbers still match the file.
        first = next(ln for ln in stripped if ln.strip())
        magic = first.split()[0]
        rest = "\n".join(stripped).split(magic, 1)[1]
        if magic not in ALLOWED_MAGICS:
            raise NotebookError(
                f"magic {magic} is not supported by the local runtime "
                f"(supported: {', '.join(sorted(ALLOWED_MAGICS))})",
                notebook=str(path),
                cell=index,
            )
        if magic == "%md":
            return Cell(path, index, line, "md", rest)
        if magic == "%sql":
            return Cell(path, index, line, "sql", rest)
        if magic == "%python":
            return Cell(path, index, line, "python", "\n".join(stripped).replace(magic, " ", 1))
        ref = rest.strip().split()
        if len(ref) != 1:
            raise NotebookError(
                "%run takes exactly one notebook path (arguments are not supported)",
                notebook=str(path),
                cell=index,
            )
        target = _resolve_notebook(path, ref[0])
        if not target.exists():
            raise NotebookError(
                f"%run {ref[0]}: no notebook at {target}", notebook=str(path), cell=index
            )
        return Cell(path, index, line, "run", rest, target)
    return Cell(path, index, line, "python", "\n".join(chunk))


def _expand(path: Path, seen: tuple[Path, ...] = ()) -> list[Cell]:
    """All cells to execute, with %run targets inlined (and checked) before anything runs."""
    if path in seen:
        raise NotebookError(
            "%run cycle: " + " -> ".join(str(p) for p in (*seen, path)), notebook=str(path)
        )
    out: list[Cell] = []
    for cell in parse_notebook(path):
        out.append(cell)
        if cell.kind == "run":
            assert cell.target is not None
            out.extend(_expand(cell.target, (*seen, path)))
    return out


def declared_widgets(path: str | Path) -> dict[str, str]:
    """Widget names and defaults a notebook declares (including notebooks it `%run`s).

    Read statically, so parameters can be checked (and shown in the Dagster launchpad) without
    running the notebook.
    """
    widgets: dict[str, str] = {}
    for cell in _expand(Path(path).resolve()):
        if cell.kind != "python":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value
            if (
                node.func.attr in WIDGET_KINDS
                and isinstance(owner, ast.Attribute)
                and owner.attr == "widgets"
                and len(node.args) >= 2
                and isinstance(name := node.args[0], ast.Constant)
                and isinstance(default := node.args[1], ast.Constant)
            ):
                widgets[str(name.value)] = str(default.value)
    return widgets


def _short_message(exc: BaseException) -> str:
    """The exception's message without the JVM stack trace Spark appends."""
    text = str(exc).strip()
    for marker in ("\n\nJVM stacktrace:", "JVM stacktrace:", "\n\tat "):
        text = text.split(marker, 1)[0]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    text = "\n".join(lines[:12])
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _notebook_traceback(exc: BaseException, files: set[str]) -> str:
    """The traceback restricted to frames inside notebook files (what a user wrote)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in files]
    return "".join(traceback.format_list(frames)) + _short_message(exc) + "\n"


def _run_sql(spark: Any, source: str) -> None:
    statements = [s.strip() for s in _split_sql(source) if s.strip()]
    for number, statement in enumerate(statements, start=1):
        df = spark.sql(statement)
        if number == len(statements) and df.columns:
            display(df)


def _split_sql(source: str) -> list[str]:
    """Split on `;` outside quotes and `--` comments."""
    parts, buf, quote, i = [], [], None, 0
    while i < len(source):
        ch = source[i]
        if quote:
            buf.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
            buf.append(ch)
        elif source.startswith("--", i):
            end = source.find("\n", i)
            i = len(source) if end == -1 else end
            continue
        elif ch == ";":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def run_notebook(
    path: str | Path,
    parameters: Mapping[str, str] | None = None,
    *,
    spark: Any,
    timeout_seconds: float | None = None,
    strict: bool = True,
) -> str | None:
    """Run a notebook and return the value it passed to `dbutils.notebook.exit` (or None).

    `parameters` are widget values, as a job's `base_parameters` on Databricks. With `strict`
    (the default for top-level runs) a parameter the notebook declares no widget for is refused
    before anything runs; `dbutils.notebook.run` is lenient, as Databricks is.
    `timeout_seconds` bounds the whole run (0 or None: no limit).
    """
    path = Path(path).resolve()
    cells = _expand(path)
    params = {str(k): str(v) for k, v in (parameters or {}).items()}
    if strict:
        known = declared_widgets(path)
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) {', '.join(unknown)} for {path.name}; "
                f"it declares: {', '.join(sorted(known)) or 'none'}"
            )
    if timeout_seconds:
        from nbpipeline.local.runtime.dbutils import run_with_timeout

        return run_with_timeout(
            lambda: _execute(path, cells, params, spark), spark, timeout_seconds, str(path)
        )
    return _execute(path, cells, params, spark)


def _execute(path: Path, cells: list[Cell], params: dict[str, str], spark: Any) -> str | None:
    with _active_session(spark):
        return _execute_cells(path, cells, params, spark)


@contextlib.contextmanager
def _active_session(spark: Any) -> Iterator[None]:
    """`spark` is this thread's active session while the notebook runs, as on Databricks.

    Spark Connect builds some results on the active session (a checkpoint's DataFrame), which in
    a process holding several sessions (a run's shared session beside another) would otherwise be
    the first session the thread created, and the notebook's next query would not find them.
    """
    holder = getattr(type(spark), "_active_session", None)  # Spark Connect's thread-local
    if holder is None:
        yield
        return
    previous = getattr(holder, "session", None)
    holder.session = spark
    try:
        yield
    finally:
        holder.session = previous


def _execute_cells(path: Path, cells: list[Cell], params: dict[str, str], spark: Any) -> str | None:
    def run_child(ref: str, args: dict[str, str], timeout: float | None) -> str | None:
        # Databricks ignores arguments a child does not declare; so do we.
        target = _resolve_notebook(path, ref)
        return run_notebook(target, args, spark=spark, timeout_seconds=timeout, strict=False)

    dbutils = DBUtils(params, run_child=run_child)
    namespace: dict[str, Any] = {
        "__name__": "__main__",
        "spark": spark,
        "dbutils": dbutils,
        "display": display,
        "displayHTML": displayHTML,
    }
    files = {str(c.path) for c in cells}
    for cell in cells:
        if cell.kind in ("md", "run"):
            continue
        try:
            if cell.kind == "sql":
                _run_sql(spark, cell.source)
            else:
                # Pad so tracebacks carry the notebook file's own line numbers.
                code = compile("\n" * (cell.line - 1) + cell.source, str(cell.path), "exec")
                linecache.checkcache(str(cell.path))
                exec(code, namespace)
        except NotebookExit as done:
            return done.value
        except NotebookError:
            raise
        except Exception as exc:
            raise NotebookError(
                _short_message(exc),
                notebook=str(cell.path),
                cell=cell.index,
                traceback_text=_notebook_traceback(exc, files),
            ) from None
    return None
