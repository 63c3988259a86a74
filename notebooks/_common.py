# Databricks notebook source
# MAGIC %md
# MAGIC # nbpipeline: shared notebook code
# MAGIC
# MAGIC Included by Notebook1..4 with `%run ./_common`. It reads the `orders` source once at a pinned
# MAGIC Delta version, validates its schema, applies the data contract's cleaning and dedup rules and
# MAGIC MERGEs derived rows into output tables, collecting the figures each notebook reports with
# MAGIC `dbutils.notebook.exit`. It uses only `spark` and the standard library, so it runs unchanged on
# MAGIC Databricks and on nbpipeline's local runtime.

# COMMAND ----------

import datetime as _dt
import json as _json
import re as _re
import time as _time
import uuid as _uuid
from decimal import Decimal as _Decimal
from decimal import InvalidOperation as _InvalidOperation

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_NAME_RE = _re.compile(rf"^(?:{_IDENT}\.)?{_IDENT}\.{_IDENT}$")
_PATH_RE = _re.compile(r"^delta\.`((?:[a-z][a-z0-9+.-]*:)?/[A-Za-z0-9_.\-/=@:]*)`$")
_SCHEMA_RE = _re.compile(rf"^(?:{_IDENT}\.)?{_IDENT}$")

VALID_STATUSES = ("placed", "shipped", "delivered", "returned", "cancelled")
REVENUE_STATUSES = ("placed", "shipped", "delivered")

# Contract types, and the source types each accepts (cast to the contract type on read).
_INTEGRAL = ("tinyint", "smallint", "int", "bigint")
SOURCE_COLUMNS = {
    "order_id": ("BIGINT", _INTEGRAL),
    "customer_id": ("BIGINT", _INTEGRAL),
    "product_id": ("BIGINT", _INTEGRAL),
    "category": ("STRING", ("string", "varchar", "char")),
    "region": ("STRING", ("string", "varchar", "char")),
    "order_ts": ("TIMESTAMP", ("timestamp", "timestamp_ntz")),
    "quantity": ("INT", _INTEGRAL),
    "unit_price": ("DECIMAL(10,2)", ("decimal",) + _INTEGRAL),
    "discount": ("DECIMAL(4,3)", ("decimal",)),
    "status": ("STRING", ("string", "varchar", "char")),
    "updated_at": ("TIMESTAMP", ("timestamp", "timestamp_ntz")),
}


class NotebookInputError(ValueError):
    """Bad input (source, schema or parameter): raised before anything is written."""


def parse_table_name(value, what="source_table"):
    """Validate `[catalog.]schema.table` or delta.`/abs/path`; nothing else reaches SQL."""
    text = (value or "").strip()
    m = _PATH_RE.match(text)
    if m and ".." not in m.group(1).split("/") and _re.match(rf"^{_IDENT}$", m.group(1).rstrip("/").rsplit("/", 1)[-1]):
        return {"sql": f"delta.`{m.group(1).rstrip('/')}`", "path": m.group(1).rstrip("/"), "schema": None}
    if _NAME_RE.match(text):
        return {"sql": text, "path": None, "schema": text.rsplit(".", 1)[0]}
    raise NotebookInputError(
        f"invalid {what} {value!r}: expected [catalog.]schema.table with plain names "
        "(letters, digits, _) or delta.`/absolute/path`"
    )


def parse_threshold(value, what="high_value_threshold"):
    """A non-negative decimal with at most 6 decimal places."""
    try:
        number = _Decimal(str(value).strip())
    except _InvalidOperation:
        raise NotebookInputError(f"invalid {what} {value!r}: expected a decimal number such as 1000.00") from None
    if not number.is_finite() or number < 0 or number.as_tuple().exponent < -6 or number >= _Decimal(10) ** 30:
        raise NotebookInputError(f"invalid {what} {value!r}: expected a non-negative number with at most 6 decimals")
    return number


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class NotebookRun:
    """One notebook run: the pinned, validated, cleaned source and the tables it writes."""

    def __init__(self, notebook, source_table, target_schema=""):
        self.notebook = notebook
        self.started_at = _dt.datetime.now(_dt.timezone.utc)
        self._t0 = _time.monotonic()
        self.source = parse_table_name(source_table)
        target_schema = (target_schema or "").strip()
        if target_schema and not _SCHEMA_RE.match(target_schema):
            raise NotebookInputError(f"invalid target_schema {target_schema!r}: expected [catalog.]schema with plain names")
        self.target_schema = target_schema
        self._suffix = _uuid.uuid4().hex[:10]
        self._views = []
        self.tables = []
        # The contract's dates are UTC dates; make the session agree whatever the cluster says.
        spark.conf.set("spark.sql.session.timeZone", "UTC")
        self.source_version = self._pin_source()
        self._validate_schema()
        self.clean_view = self._register_clean()
        counts = spark.sql(
            f"SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN is_valid THEN 0 ELSE 1 END), 0) AS bad FROM {self._flagged}"
        ).collect()[0]
        self.rows_read = int(counts["n"])
        self.rows_rejected = int(counts["bad"])

    # -- the source ---------------------------------------------------------------------------

    def _pin_source(self):
        """The source's current Delta version; every read below uses it, so all outputs derive
        from one snapshot even while the upstream system keeps writing."""
        src = self.source["sql"]
        try:
            self._source_schema = spark.table(src).schema
        except Exception as exc:  # noqa: BLE001 - turned into one clear line
            text = str(exc)
            if any(m in text for m in ("TABLE_OR_VIEW_NOT_FOUND", "PATH_NOT_FOUND", "DELTA_PATH_DOES_NOT_EXIST", "SCHEMA_NOT_FOUND", "is not a Delta table", "doesn't exist", "does not exist")):
                raise NotebookInputError(f"source table {src} does not exist") from None
            raise NotebookInputError(f"source table {src} cannot be read: {_first_line(exc)}") from None
        try:
            return int(spark.sql(f"DESCRIBE HISTORY {src} LIMIT 1").collect()[0]["version"])
        except Exception:  # noqa: BLE001 - not a Delta table: read it as it is
            return None

    def _validate_schema(self):
        fields = {f.name.lower(): f.dataType.simpleString().lower() for f in self._source_schema.fields}
        missing = [c for c in SOURCE_COLUMNS if c not in fields]
        if missing:
            raise NotebookInputError(f"source table {self.source['sql']} is missing column(s): {', '.join(missing)}")
        for column, (wanted, accepted) in SOURCE_COLUMNS.items():
            actual = fields[column].split("(")[0]
            if actual not in accepted:
                raise NotebookInputError(
                    f"source column {column} has type {fields[column]}, which is incompatible with {wanted}"
                )

    def _view(self, name, sql):
        view = f"nbp_{name}_{self._suffix}"
        spark.sql(sql).createOrReplaceTempView(view)
        self._views.append(view)
        return view

    def _register_clean(self):
        src = self.source["sql"]
        version = "" if self.source_version is None else f" VERSION AS OF {self.source_version}"
        casts = ",\n  ".join(f"CAST({c} AS {t}) AS {c}" for c, (t, _) in SOURCE_COLUMNS.items())
        statuses = ", ".join(f"'{s}'" for s in VALID_STATUSES)
        revenue = ", ".join(f"'{s}'" for s in REVENUE_STATUSES)
        self._flagged = self._view(
            "flagged",
            f"""
            SELECT *, COALESCE(
                order_id IS NOT NULL AND customer_id IS NOT NULL AND product_id IS NOT NULL
                AND order_ts IS NOT NULL AND status IS NOT NULL
                AND quantity >= 1 AND unit_price >= 0 AND discount >= 0 AND discount < 1
                AND status IN ({statuses}), FALSE) AS is_valid
            FROM (SELECT {casts} FROM {src}{version})
            """,
        )
        # Dedup: greatest updated_at (NULL lowest), then the contract's tie-break tuple; the last
        # keys only make exact duplicates deterministic.
        return self._view(
            "clean",
            f"""
            SELECT order_id, customer_id, product_id, category, region, order_ts,
                   CAST(order_ts AS DATE) AS order_date, status, quantity, unit_price, discount,
                   gross_amount,
                   CAST(ROUND(gross_amount * (1 - discount), 2) AS DECIMAL(18,2)) AS net_amount,
                   status <> 'cancelled' AS counted,
                   status IN ({revenue}) AS revenue_bearing
            FROM (
                SELECT *, CAST(quantity * unit_price AS DECIMAL(18,2)) AS gross_amount,
                       ROW_NUMBER() OVER (
                           PARTITION BY order_id
                           ORDER BY updated_at DESC NULLS LAST, status DESC, quantity DESC,
                                    unit_price DESC, discount DESC, customer_id DESC,
                                    product_id DESC, order_ts DESC, category DESC NULLS LAST,
                                    region DESC NULLS LAST) AS _rn
                FROM {self._flagged} WHERE is_valid
            ) WHERE _rn = 1
            """,
        )

    # -- outputs ------------------------------------------------------------------------------

    def target(self, name):
        """Where output `name` lives: the target schema, else beside the source."""
        if self.target_schema:
            return f"{self.target_schema}.{name}"
        if self.source["path"]:
            return f"delta.`{self.source['path'].rsplit('/', 1)[0]}/{name}`"
        return f"{self.source['schema']}.{name}"

    def merge(self, name, columns, keys, select_sql):
        """MERGE the rows of `select_sql` into output `name`: insert new keys, update rows whose
        values changed (and only those, so `_updated_at` moves only then), delete keys that no
        longer derive from the source. `columns` is a list of (name, SQL type), keys first."""
        target = self.target(name)
        if self.target_schema:
            spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.target_schema}")
        ddl = ", ".join(f"{c} {t}" for c, t in columns)
        spark.sql(f"CREATE TABLE IF NOT EXISTS {target} ({ddl}, _updated_at TIMESTAMP) USING DELTA")
        view = self._view(name, select_sql)
        names = [c for c, _ in columns]
        values = [c for c in names if c not in keys]
        run_ts = self.started_at.strftime("%Y-%m-%d %H:%M:%S.%f")
        on = " AND ".join(f"t.{k} <=> s.{k}" for k in keys)
        same = " AND ".join(f"t.{c} <=> s.{c}" for c in values)
        update = ", ".join(f"{c} = s.{c}" for c in values)
        insert_cols = ", ".join(names + ["_updated_at"])
        insert_vals = ", ".join([f"s.{c}" for c in names] + [f"TIMESTAMP '{run_ts}'"])
        metrics = spark.sql(
            f"""
            MERGE INTO {target} AS t
            USING {view} AS s
            ON {on}
            WHEN MATCHED AND NOT ({same}) THEN UPDATE SET {update}, _updated_at = TIMESTAMP '{run_ts}'
            WHEN NOT MATCHED THEN INSERT ({insert_cols}) VALUES ({insert_vals})
            WHEN NOT MATCHED BY SOURCE THEN DELETE
            """
        ).collect()[0].asDict()
        history = spark.sql(f"DESCRIBE HISTORY {target} LIMIT 1").collect()[0]
        row_count = spark.sql(f"SELECT COUNT(*) AS n FROM {target}").collect()[0]["n"]
        schema = spark.table(target).schema
        entry = {
            "asset": name,
            "table": target,
            "location": self._location(target),
            "rows_read": self.rows_read,
            "rows_rejected": self.rows_rejected,
            "rows_inserted": int(metrics.get("num_inserted_rows") or 0),
            "rows_updated": int(metrics.get("num_updated_rows") or 0),
            "rows_deleted": int(metrics.get("num_deleted_rows") or 0),
            "delta_version": int(history["version"]),
            "row_count": int(row_count),
            "columns": [{"name": f.name, "type": f.dataType.simpleString()} for f in schema.fields],
        }
        self.tables.append(entry)
        return entry

    def _location(self, target):
        # DESCRIBE DETAIL sizes the whole snapshot; the extended description is much cheaper.
        if target.startswith("delta.`"):
            return target[len("delta.`") : -1]
        for row in spark.sql(f"DESCRIBE TABLE EXTENDED {target}").collect():
            if row[0] == "Location":
                return row[1]
        return None

    def finish(self):
        """The exit JSON, after dropping this run's temporary views."""
        for view in self._views:
            spark.catalog.dropTempView(view)
        ended = _dt.datetime.now(_dt.timezone.utc)
        return _json.dumps(
            {
                "notebook": self.notebook,
                "started_at": self.started_at.isoformat(),
                "ended_at": ended.isoformat(),
                "duration_s": round(_time.monotonic() - self._t0, 3),
                "source_table": self.source["sql"],
                "source_version": self.source_version,
                "rows_read": self.rows_read,
                "rows_rejected": self.rows_rejected,
                "tables": self.tables,
            }
        )
