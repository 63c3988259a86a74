"""The nbpipeline command line: help, seed, notebook run, tables, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nbpipeline.cli import main
from nbpipeline.tables import OUTPUT_TABLES


def test_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nbpipeline.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("engine", "seed", "notebook", "tables"):
        assert f"    {command}" in out


def test_help_imports_no_engine_dagster_or_databricks_sdk() -> None:
    """`--help` (and every command's parser) loads none of the heavy libraries: each takes a
    second or more to import, and every `nbpipeline` call would pay for them."""
    code = (
        "import sys\n"
        "from nbpipeline.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out.replace("'", '"')))
    assert {"nbpipeline", "argparse"} <= loaded
    assert not loaded & {"dagster", "dagster_databricks", "databricks", "pyspark", "pandas"}


def test_bad_param_syntax_is_one_line_error(capsys) -> None:
    assert main(["notebook", "run", "notebooks/Notebook1.py", "--param", "novalue"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid --param 'novalue': expected key=value")


def test_bad_table_name_refused_before_spark(capsys) -> None:
    assert main(["tables", "--source", "x.y; DROP TABLE z", "--json"]) == 2
    assert "invalid --source" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.spark
def test_seed_notebook_run_and_tables(spark, schema: str, capsys) -> None:
    source = f"{schema}.orders"
    assert main(["seed", "--rows", "300", "--seed", "3", "--dirty", "--table", source]) == 0
    seeded = json.loads(capsys.readouterr().out)
    assert seeded["table"] == source and seeded["rows"] >= 300

    for n in (1, 2, 3, 4):
        assert (
            main(
                [
                    "notebook",
                    "run",
                    f"notebooks/Notebook{n}.py",
                    "--param",
                    f"source_table={source}",
                ]
            )
            == 0
        )
        out = json.loads(capsys.readouterr().out)
        assert out["notebook"] == f"Notebook{n}" and out["source_version"] == seeded["version"]

    assert main(["tables", "--source", source, "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert set(infos) == {source} | {f"{schema}.{t}" for t in OUTPUT_TABLES}
    for name, info in infos.items():
        assert info["exists"] and info["rows"] == spark.table(name).count()
        assert info["version"] == spark.sql(f"DESCRIBE HISTORY {name} LIMIT 1").collect()[0][0]
        assert info["location"].endswith(name.split(".")[1])

    assert (
        main(
            [
                "notebook",
                "run",
                "notebooks/Notebook1.py",
                "--param",
                f"source_table={schema}.missing",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"source table {schema}.missing does not exist" in err and len(err.splitlines()) == 1
