"""The local notebook runtime: cells, magics, widgets, exit values, notebook.run, errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from nbpipeline.errors import ConfigError, NotebookError, NotebookTimeout
from nbpipeline.local.runtime import declared_widgets, parse_notebook, run_notebook

SEP = "\n# COMMAND ----------\n"


def write_nb(folder: Path, name: str, *cells: str) -> Path:
    """Write a Databricks source notebook made of `cells`."""
    path = folder / f"{name}.py"
    body = SEP.join(textwrap.dedent(c).strip("\n") for c in cells)
    path.write_text("# Databricks notebook source\n" + body + "\n")
    return path


WIDGETS_NB = (
    "# MAGIC %md\n# MAGIC # Title",
    """
    dbutils.widgets.text("name", "world", "Name")
    dbutils.widgets.dropdown("colour", "red", ["red", "blue"])
    """,
    """
    import json
    dbutils.notebook.exit(json.dumps({"name": dbutils.widgets.get("name"),
                                      "colour": dbutils.widgets.get("colour"),
                                      "missing": dbutils.widgets.getArgument("nope", "dflt")}))
    """,
    "raise AssertionError('cells after exit must not run')",
)


def test_widget_defaults_and_overrides(tmp_path: Path) -> None:
    nb = write_nb(tmp_path, "w", *WIDGETS_NB)
    assert json.loads(run_notebook(nb, spark=None)) == {
        "name": "world",
        "colour": "red",
        "missing": "dflt",
    }
    out = json.loads(run_notebook(nb, {"name": "Ada", "colour": "blue"}, spark=None))
    assert out["name"] == "Ada" and out["colour"] == "blue"


def test_dropdown_value_outside_choices_is_an_error(tmp_path: Path) -> None:
    nb = write_nb(tmp_path, "w", *WIDGETS_NB)
    with pytest.raises(NotebookError, match=r"green.*not one of") as err:
        run_notebook(nb, {"colour": "green"}, spark=None)
    assert err.value.cell == 3


def test_unknown_parameter_refused_before_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    nb = write_nb(
        tmp_path, "u", f"open({str(marker)!r}, 'w').write('x')", 'dbutils.widgets.text("a", "1")'
    )
    with pytest.raises(ConfigError, match="unknown parameter.*bogus.*declares: a"):
        run_notebook(nb, {"bogus": "1"}, spark=None)
    assert not marker.exists()
    assert declared_widgets(nb) == {"a": "1"}


def test_get_of_undeclared_widget_fails(tmp_path: Path) -> None:
    nb = write_nb(tmp_path, "g", "dbutils.widgets.get('x')")
    with pytest.raises(NotebookError, match="InputWidgetNotDefined"):
        run_notebook(nb, spark=None)


def test_percent_run_inlines_in_the_same_namespace(tmp_path: Path) -> None:
    write_nb(
        tmp_path, "_lib", "# MAGIC %md\n# MAGIC lib", "def twice(x):\n    return 2 * x\nLIB = 'yes'"
    )
    nb = write_nb(
        tmp_path,
        "main",
        'dbutils.widgets.text("n", "4")',
        "# MAGIC %run ./_lib",
        "dbutils.notebook.exit(f\"{twice(int(dbutils.widgets.get('n')))}-{LIB}\")",
    )
    assert run_notebook(nb, spark=None) == "8-yes"
    assert declared_widgets(nb) == {"n": "4"}


def test_missing_run_target_is_reported_with_cell(tmp_path: Path) -> None:
    nb = write_nb(tmp_path, "main", "x = 1", "# MAGIC %run ./nowhere")
    with pytest.raises(NotebookError, match=r"cell 2: %run ./nowhere: no notebook") as err:
        run_notebook(nb, spark=None)
    assert err.value.notebook == str(nb)


@pytest.mark.parametrize("magic", ["%pip install x", "%sh ls", "%scala 1", "%fs ls /"])
def test_unsupported_magics_refused_before_anything_runs(tmp_path: Path, magic: str) -> None:
    marker = tmp_path / "ran"
    nb = write_nb(tmp_path, "m", f"open({str(marker)!r}, 'w').write('x')", f"# MAGIC {magic}")
    with pytest.raises(NotebookError, match=rf"cell 2: magic {magic.split()[0]} is not supported"):
        run_notebook(nb, spark=None)
    assert not marker.exists()


def test_failing_cell_names_path_cell_and_original_traceback(tmp_path: Path) -> None:
    nb = write_nb(
        tmp_path,
        "boom",
        "# MAGIC %md\n# MAGIC # Boom",
        "x = 1",
        "def inner():\n    return 1 / 0\n\ny = inner()",
    )
    with pytest.raises(NotebookError) as err:
        run_notebook(nb, spark=None)
    exc = err.value
    assert exc.notebook == str(nb) and exc.cell == 3
    assert "ZeroDivisionError: division by zero" in str(exc)
    # The traceback points at the notebook file's own lines.
    assert f'File "{nb}", line 8, in inner' in exc.traceback_text
    assert "return 1 / 0" in exc.traceback_text


def test_not_a_databricks_notebook(tmp_path: Path) -> None:
    path = tmp_path / "plain.py"
    path.write_text("print('hi')\n")
    with pytest.raises(NotebookError, match="not a Databricks source notebook"):
        run_notebook(path, spark=None)


def test_notebook_run_passes_arguments_and_returns_exit_value(tmp_path: Path) -> None:
    write_nb(
        tmp_path,
        "child",
        'dbutils.widgets.text("x", "0")',
        "dbutils.notebook.exit(str(int(dbutils.widgets.get('x')) + 1))",
    )
    nb = write_nb(
        tmp_path,
        "parent",
        "r = dbutils.notebook.run('./child', 30, {'x': 41, 'ignored': 'yes'})",
        "dbutils.notebook.exit(r)",
    )
    assert run_notebook(nb, spark=None) == "42"


def test_notebook_run_timeout_and_child_failure(tmp_path: Path) -> None:
    write_nb(tmp_path, "slow", "import time\ntime.sleep(5)")
    write_nb(tmp_path, "bad", "x = 1", "raise ValueError('child broke')")
    slow = write_nb(tmp_path, "p1", "dbutils.notebook.run('./slow', 1)")
    with pytest.raises(NotebookTimeout, match=r"slow.py: did not finish within 1s"):
        run_notebook(slow, spark=None)
    bad = write_nb(tmp_path, "p2", "dbutils.notebook.run('./bad', 10)")
    with pytest.raises(NotebookError, match=r"bad.py, cell 2: ValueError: child broke"):
        run_notebook(bad, spark=None)


def test_parse_cells(tmp_path: Path) -> None:
    nb = write_nb(
        tmp_path, "p", "# MAGIC %md\n# MAGIC hi", "# MAGIC %sql\n# MAGIC SELECT 1", "a = 1"
    )
    assert [(c.index, c.kind) for c in parse_notebook(nb)] == [(1, "md"), (2, "sql"), (3, "python")]


@pytest.mark.spark
def test_sql_cells_run_through_spark(spark, schema: str, tmp_path: Path) -> None:
    nb = write_nb(
        tmp_path,
        "sql",
        f"""
        # MAGIC %sql
        # MAGIC CREATE TABLE {schema}.t (id INT, s STRING) USING DELTA;
        # MAGIC -- a comment; with a semicolon
        # MAGIC INSERT INTO {schema}.t VALUES (1, 'a;b'), (2, 'c')
        """,
        f"dbutils.notebook.exit(str(spark.table('{schema}.t').count()))",
    )
    assert run_notebook(nb, spark=spark) == "2"
    assert spark.sql(f"SELECT s FROM {schema}.t WHERE id = 1").collect()[0]["s"] == "a;b"


@pytest.mark.spark
def test_spark_errors_surface_without_jvm_frames(spark, tmp_path: Path) -> None:
    nb = write_nb(tmp_path, "err", "x = 1", "spark.sql('SELECT * FROM no_such_schema.t').collect()")
    with pytest.raises(NotebookError) as err:
        run_notebook(nb, spark=spark)
    text = str(err.value) + err.value.traceback_text
    assert err.value.cell == 2 and "TABLE_OR_VIEW_NOT_FOUND" in text
    assert "at org.apache.spark" not in text and "JVM stacktrace" not in text


def test_titled_cells(tmp_path: Path) -> None:
    """`# DBTITLE 1,Title` lines (the Databricks UI's cell titles) are titles, not code: a titled
    %run or %md cell stays a magic cell, and line numbers still match the file."""
    write_nb(tmp_path, "lib", "# DBTITLE 1,Shared\nshared = 41")
    path = write_nb(
        tmp_path,
        "main",
        "# DBTITLE 1,About\n# MAGIC %md\n# MAGIC # Title",
        "# DBTITLE 1,Include\n# MAGIC %run ./lib",
        "# DBTITLE 1,Answer, with a comma\nimport json\n\n\nx = shared + 1",
        "dbutils.notebook.exit(json.dumps(x))",
    )
    cells = parse_notebook(path)
    assert [(c.kind, c.title) for c in cells] == [
        ("md", "About"),
        ("run", "Include"),
        ("python", "Answer, with a comma"),
        ("python", None),
    ]
    assert run_notebook(path, spark=None) == "42"
    failing = write_nb(tmp_path, "failing", "# DBTITLE 1,Boom\n\n\nraise ValueError('boom')")
    with pytest.raises(NotebookError) as err:
        run_notebook(failing, spark=None)
    assert f'{failing}", line 5' in (err.value.traceback_text or "")


def test_project_notebooks_are_titled_databricks_source() -> None:
    """Every cell of the project's notebooks has a title, lines stay within 100 characters, and
    the widgets cell comes first after the description."""
    from nbpipeline.settings import notebooks_dir

    for path in sorted(notebooks_dir().glob("*.py")):
        text = path.read_text()
        assert text.startswith("# Databricks notebook source\n"), path
        assert max(len(line) for line in text.splitlines()) <= 100, path
        cells = parse_notebook(path)
        assert all(c.title for c in cells), [(path.name, c.index) for c in cells if not c.title]
        if path.stem != "_common":
            assert cells[1].title == "Parameters", path
            assert "dbutils.widgets.text" in cells[1].source
