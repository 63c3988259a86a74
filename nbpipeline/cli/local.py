"""Commands on the local engine: `engine`, `seed`, `notebook run` and `tables`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from nbpipeline.cli.params import parse_params
from nbpipeline.errors import ConfigError
from nbpipeline.progress import progress


def add_subcommands(sub: Any) -> None:
    """Add the local engine's commands to the main CLI's subparsers action."""
    from nbpipeline.settings import DEFAULT_SOURCE_TABLE

    p = sub.add_parser("engine", help="start, stop or inspect the local Spark + Delta engine")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser(
        "seed",
        help="demo data: a synthetic orders table or a change batch (only tables it created)",
        description=(
            "Create or change a synthetic demo orders table. Tables it creates carry the Delta "
            "table property nbpipeline.demo=true; any other existing table is refused unless "
            "--replace is given."
        ),
    )
    p.add_argument("--rows", type=int, help="number of orders to generate")
    p.add_argument("--seed", type=int, default=42, help="random seed (same seed, same data)")
    p.add_argument("--dirty", action="store_true", help="add rejected rows and duplicates")
    p.add_argument(
        "--changes", type=float, metavar="F", help="apply a change batch to a fraction F of orders"
    )
    p.add_argument(
        "--table", default=DEFAULT_SOURCE_TABLE, help="source table name or delta.`/path`"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="also overwrite (or change) an existing table nbpipeline seed did not create",
    )
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("notebook", help="run one notebook on the local engine")
    nsub = p.add_subparsers(dest="notebook_command", required=True, metavar="ACTION")
    r = nsub.add_parser("run", help="run a notebook file and print its exit JSON")
    r.add_argument("path", help="path of a Databricks source notebook, e.g. notebooks/Notebook1.py")
    r.add_argument(
        "--param", action="append", metavar="KEY=VALUE", help="widget value (repeatable)"
    )
    r.add_argument(
        "--timeout", type=float, default=None, help="seconds before the run is cancelled"
    )
    r.set_defaults(func=cmd_notebook_run)

    p = sub.add_parser("tables", help="list the source and the five output tables")
    p.add_argument("--source", default=DEFAULT_SOURCE_TABLE, help="source table")
    p.add_argument("--target-schema", default="", help="output schema (default: the source's)")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=cmd_tables)


def _spark():
    from nbpipeline.local import engine

    return engine.get_spark(progress=progress)


# --------------------------------------------------------------------------- engine


def cmd_engine(args: argparse.Namespace) -> int:
    from nbpipeline.local import engine

    if args.action == "start":
        url = engine.start(progress=progress)
        print(url)
    elif args.action == "stop":
        stopped = engine.stop()
        progress("Stopped the local engine." if stopped else "The local engine was not running.")
    else:
        info = engine.status()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            state = f"running (pid {info['pid']})" if info["running"] else "stopped"
            print(
                f"engine: {state}\nurl:    {info['url']}\nhome:   {info['home']}\nlog:    {info['log']}"
            )
            if info["remote"]:
                print(f"remote: {info['remote']} (NBPIPELINE_SPARK_REMOTE; used instead)")
    return 0


# --------------------------------------------------------------------------- seed


def cmd_seed(args: argparse.Namespace) -> int:
    from nbpipeline.identifiers import parse_table
    from nbpipeline.local import seed

    parse_table(args.table, what="--table")
    if args.changes is not None:
        if not 0 < args.changes <= 1:
            raise ConfigError(f"invalid --changes {args.changes}: expected a fraction in (0, 1]")
        spark = _spark()
        result = seed.apply_changes(
            spark,
            args.table,
            fraction=args.changes,
            seed=args.seed,
            progress=progress,
            replace=args.replace,
        )
        progress(
            f"Applied a change batch to {result['table']}: {result['updated']} updated, "
            f"{result['inserted']} inserted, version {result['version']}, {result['seconds']:.1f}s"
        )
    else:
        if args.rows is None or args.rows < 0:
            raise ConfigError("--rows N (N >= 0) is required unless --changes is given")
        spark = _spark()
        result = seed.seed_orders(
            spark,
            args.table,
            rows=args.rows,
            seed=args.seed,
            dirty=args.dirty,
            progress=progress,
            replace=args.replace,
        )
        progress(
            f"Seeded {result['table']}: {result['rows']} rows, version {result['version']}, "
            f"in {result['seconds']:.1f}s"
        )
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- notebook


def cmd_notebook_run(args: argparse.Namespace) -> int:
    from nbpipeline.local.runtime import run_notebook

    params = parse_params(args.param)
    path = Path(args.path)
    if not path.exists():
        raise ConfigError(f"no notebook at {path}", hint="notebooks live in notebooks/")
    spark = _spark()
    started = time.monotonic()
    value = run_notebook(path, params, spark=spark, timeout_seconds=args.timeout)
    progress(f"{path.name} finished in {time.monotonic() - started:.1f}s")
    print(value if value is not None else "null")
    return 0


# --------------------------------------------------------------------------- tables


def cmd_tables(args: argparse.Namespace) -> int:
    from nbpipeline.identifiers import parse_table
    from nbpipeline.tables import OUTPUT_TABLES, output_ref, table_info

    source = parse_table(args.source, what="--source")
    refs = [source] + [output_ref(source, name, args.target_schema) for name in OUTPUT_TABLES]
    spark = _spark()
    infos = [table_info(spark, ref) for ref in refs]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    width = max(len(i["name"]) for i in infos)
    print(f"{'name':<{width}}  {'version':>7}  {'rows':>10}  location")
    for i in infos:
        if not i["exists"]:
            print(f"{i['name']:<{width}}  {'-':>7}  {'-':>10}  (not created yet)")
        else:
            print(f"{i['name']:<{width}}  {i['version']:>7}  {i['rows']:>10}  {i['location']}")
    return 0
