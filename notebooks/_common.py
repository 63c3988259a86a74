# Databricks notebook source
# DBTITLE 1,About this notebook
# MAGIC %md
# MAGIC # nbpipeline: shared notebook code
# MAGIC
# MAGIC Included by Notebook1..4 with `%run ./_common`. It pins the `orders` source at one Delta
# MAGIC version, validates its schema, applies the data contract's cleaning and dedup rules,
# MAGIC MERGEs derived rows into output tables, finds the version each MERGE committed, evaluates
# MAGIC the asset checks on it, and collects the figures each notebook reports with
# MAGIC `dbutils.notebook.exit`. It uses only `spark` and the standard library, so it runs unchanged
# MAGIC on Databricks and on nbpipeline's local runtime.

# COMMAND ----------

# DBTITLE 1,Imports and the contract's constants
import datetime as _dt
import json as _json
import re as _re
import time as _time
import uuid as _uuid
from decimal import Decimal as _Decimal
from decimal import InvalidOperation as _InvalidOperation

VALID_STATUSES = ("placed", "shipped", "delivered", "returned", "cancelled")
REVENUE_STATUSES = ("placed", "shipped", "delivered")

# Contract types, and the source types each accepts. Values are converted with try_cast, so a
# value the contract type cannot hold becomes NULL (a rejected row) whatever spark.sql.ansi.enabled
# says, instead of failing under ANSI mode and wrapping around or vanishing without it.
_INTEGRAL = ("tinyint", "smallint", "int", "bigint")
_TEXT = ("string", "varchar", "char")
_TIME = ("timestamp", "timestamp_ntz")
SOURCE_COLUMNS = {
    "order_id": ("BIGINT", _INTEGRAL),
    "customer_id": ("BIGINT", _INTEGRAL),
    "product_id": ("BIGINT", _INTEGRAL),
    "category": ("STRING", _TEXT),
    "region": ("STRING", _TEXT),
    "order_ts": ("TIMESTAMP", _TIME),
    "quantity": ("INT", _INTEGRAL),
    "unit_price": ("DECIMAL(10,2)", ("decimal",) + _INTEGRAL),
    "discount": ("DECIMAL(4,3)", ("decimal",)),
    "status": ("STRING", _TEXT),
    "updated_at": ("TIMESTAMP", _TIME),
}

# Dedup precedence: greatest first. The contract's tuple after updated_at, then order_ts,
# category, region so that exact ties pick rows identical in every output column.
PRECEDENCE = (
    "updated_at",
    "status",
    "quantity",
    "unit_price",
    "discount",
    "customer_id",
    "product_id",
    "order_ts",
    "category",
    "region",
)


class NotebookInputError(ValueError):
    """Bad input (source, schema or parameter): raised before anything is written."""


# COMMAND ----------

# DBTITLE 1,Parameter validation (the same rules as nbpipeline/widgets.py)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_NAME_RE = _re.compile(rf"^(?:{_IDENT}\.)?{_IDENT}\.{_IDENT}$")
_PATH_RE = _re.compile(r"^delta\.`((?:[a-z][a-z0-9+.-]*:)?/[A-Za-z0-9_.\-/=@:]*)`$")
_SCHEMA_RE = _re.compile(rf"^(?:{_IDENT}\.)?{_IDENT}$")
_THRESHOLD_RE = _re.compile(r"^\d+(\.\d{1,6})?$")
_VERSION_RE = _re.compile(r"^\d{1,18}$")
_TIMESTAMP_RE = _re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?(Z|\+00:?00)?$"
)


def parse_table_name(value, what="source_table"):
    """Validate `[catalog.]schema.table` or delta.`/abs/path`; nothing else reaches SQL."""
    text = (value or "").strip()
    m = _PATH_RE.match(text)
    if m:
        path = m.group(1).rstrip("/")
        last = path.rsplit("/", 1)[-1]
        if ".." not in path.split("/") and _re.match(rf"^{_IDENT}$", last):
            return {"sql": f"delta.`{path}`", "path": path, "schema": None}
    if _NAME_RE.match(text):
        return {"sql": text, "path": None, "schema": text.rsplit(".", 1)[0]}
    raise NotebookInputError(
        f"invalid {what} {value!r}: expected [catalog.]schema.table with plain names "
        "(letters, digits, _) or delta.`/absolute/path`"
    )


def parse_schema_name(value, what="target_schema"):
    """Empty, or `[catalog.]schema` with plain names."""
    text = (value or "").strip()
    if text and not _SCHEMA_RE.match(text):
        raise NotebookInputError(
            f"invalid {what} {value!r}: expected [catalog.]schema with plain names"
        )
    return text


def parse_threshold(value, what="high_value_threshold"):
    """A non-negative decimal in plain notation with at most 6 decimals, below 10^30."""
    raw = str(value).strip()
    number = None
    if _THRESHOLD_RE.match(raw):
        try:
            number = _Decimal(raw)
        except _InvalidOperation:
            number = None
    if number is None or number >= _Decimal(10) ** 30:
        raise NotebookInputError(
            f"invalid {what} {value!r}: expected a non-negative decimal with at most 6 "
            "decimals, e.g. 1000.00"
        )
    return number


def parse_source_version(value, what="source_version"):
    """None (the latest version at start), a Delta version, or an aware UTC datetime."""
    raw = str(value if value is not None else "").strip()
    if raw == "":
        return None
    if _VERSION_RE.match(raw):
        return int(raw)
    m = _TIMESTAMP_RE.match(raw)
    if m:
        year, month, day, hour, minute, second, fraction, _zone = m.groups()
        try:
            return _dt.datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second or 0),
                int((fraction or "0").ljust(6, "0")),
                tzinfo=_dt.timezone.utc,
            )
        except ValueError:
            pass
    raise NotebookInputError(
        f"invalid {what} {value!r}: expected empty, a Delta version (0, 1, ...) or an ISO-8601 "
        "UTC timestamp such as 2026-01-31T12:00:00Z"
    )


# COMMAND ----------

# DBTITLE 1,Session settings
# The contract's dates are UTC dates; the session must agree whatever the cluster says.
spark.conf.set("spark.sql.session.timeZone", "UTC")

_MATERIALIZE_CONF = "spark.databricks.delta.merge.materializeSource"

# Settings that only make the notebooks do less work. Each is tried on its own: a runtime that
# refuses one (serverless accepts few session settings) runs without it.
_FAST_SETTINGS = {
    # Adaptive execution coalesces the small shuffles of the dedup and the aggregations.
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.adaptive.coalescePartitions.enabled": "true",
    # A MERGE reads its source twice (find the touched files, then write them); materialized
    # once, the dedup behind it runs once instead of twice.
    _MATERIALIZE_CONF: "all",
}


def _try_set(key, value):
    try:
        spark.conf.set(key, value)
        return True
    except Exception:  # a refused setting only costs speed
        return False


for _key, _value in _FAST_SETTINGS.items():
    _try_set(_key, _value)

# COMMAND ----------

# DBTITLE 1,Helpers
_COMMIT_MARKER_CONF = "spark.databricks.delta.commitInfo.userMetadata"
_MISSING_MARKERS = (
    "TABLE_OR_VIEW_NOT_FOUND",
    "PATH_NOT_FOUND",
    "DELTA_PATH_DOES_NOT_EXIST",
    "SCHEMA_NOT_FOUND",
    "is not a Delta table",
    "doesn't exist",
    "does not exist",
)


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _checkpoint(df):
    """`df` computed once and kept for this run (local checkpoint); where the runtime offers
    no checkpoint (serverless), `df` itself: still correct, as it reads a pinned version."""
    try:
        return df.localCheckpoint()
    except Exception:  # recomputed on use instead
        return df


def _history(table, limit):
    return [r.asDict() for r in spark.sql(f"DESCRIBE HISTORY {table} LIMIT {limit}").collect()]


def _versioned(table, version):
    return table if version is None else f"{table} VERSION AS OF {int(version)}"


# COMMAND ----------

# DBTITLE 1,The source: pin one version, check the schema


def _read_schema(src):
    try:
        return spark.table(src).schema
    except Exception as exc:  # turned into one clear line
        if any(m in str(exc) for m in _MISSING_MARKERS):
            raise NotebookInputError(f"source table {src} does not exist") from None
        raise NotebookInputError(f"source table {src} cannot be read: {_first_line(exc)}") from None


def resolve_source_version(src, wanted):
    """The Delta version of `src` to read: the latest (`wanted` None), exactly `wanted` (an
    int), or the latest committed at or before `wanted` (a UTC datetime). A table that is not
    a Delta table (no history) is read as it is, only when no version is asked for."""
    try:
        latest = _history(src, 1)
    except Exception:  # not a Delta table
        if wanted is None:
            return None
        raise NotebookInputError(
            f"source_version {wanted} was given but {src} has no Delta history"
        ) from None
    latest_version = int(latest[0]["version"])
    if wanted is None:
        return latest_version
    if isinstance(wanted, int):
        if wanted > latest_version:
            raise NotebookInputError(
                f"source version {wanted} of {src} does not exist (the latest is {latest_version})"
            )
        return wanted
    # Compared in Spark, where the session time zone (UTC) reads both sides the same way.
    at = wanted.strftime("%Y-%m-%d %H:%M:%S.%f")
    found = (
        spark.sql(f"DESCRIBE HISTORY {src}")
        .selectExpr(
            f"max(CASE WHEN timestamp <= TIMESTAMP '{at}' THEN version END) AS version",
            "CAST(min(timestamp) AS STRING) AS first",
        )
        .collect()[0]
    )
    if found["version"] is None:
        raise NotebookInputError(
            f"source table {src} has no version committed at or before {at} UTC "
            f"(its first version was committed at {found['first']} UTC)"
        )
    return int(found["version"])


def validate_source_schema(src, schema):
    fields = {f.name.lower(): f.dataType.simpleString().lower() for f in schema.fields}
    missing = [c for c in SOURCE_COLUMNS if c not in fields]
    if missing:
        raise NotebookInputError(f"source table {src} is missing column(s): {', '.join(missing)}")
    for column, (wanted, accepted) in SOURCE_COLUMNS.items():
        if fields[column].split("(")[0] not in accepted:
            raise NotebookInputError(
                f"source column {column} has type {fields[column]}, which is incompatible "
                f"with {wanted}"
            )


# COMMAND ----------

# DBTITLE 1,Clean and deduplicate


def flagged_orders_sql(source_sql, recount=False):
    """Every row of the pinned source, typed to the contract, with its gross amount and
    whether the contract accepts it. With `recount`, also `_recount_id`: the raw order_id of
    a row that the check's own valid-row rule (VALID_ROW_SQL) accepts, else NULL."""
    casts = ",\n               ".join(
        [f"try_cast({c} AS {t}) AS {c}" for c, (t, _) in SOURCE_COLUMNS.items()]
        # Read from the raw columns in the same scan, so the check shares no cast with the query.
        + ([f"CASE WHEN {VALID_ROW_SQL} THEN order_id END AS _recount_id"] if recount else [])
    )
    statuses = ", ".join(f"'{s}'" for s in VALID_STATUSES)
    return f"""
        SELECT *, COALESCE(
            order_id IS NOT NULL AND customer_id IS NOT NULL AND product_id IS NOT NULL
            AND order_ts IS NOT NULL AND status IN ({statuses})
            AND quantity >= 1 AND unit_price >= 0 AND discount >= 0 AND discount < 1
            AND gross_amount IS NOT NULL, FALSE) AS is_valid
        FROM (SELECT *, try_cast(quantity * unit_price AS DECIMAL(18,2)) AS gross_amount
              FROM (SELECT {casts} FROM {source_sql}))
    """


def derived_orders_sql(flagged_view):
    """The valid orders, one per order_id (the greatest precedence; a NULL sorts lowest), with
    the contract's derived values. A window: an aggregate over a struct of the precedence picks
    the same rows and measured no faster (docs/performance.md)."""
    revenue = ", ".join(f"'{s}'" for s in REVENUE_STATUSES)
    order = ", ".join(f"{c} DESC NULLS LAST" for c in PRECEDENCE)
    return f"""
        SELECT order_id, customer_id, product_id, category, region, order_ts,
               CAST(order_ts AS DATE) AS order_date, status, quantity, unit_price,
               discount, gross_amount,
               CAST(ROUND(gross_amount * (1 - discount), 2) AS DECIMAL(18,2)) AS net_amount,
               status <> 'cancelled' AS counted,
               status IN ({revenue}) AS revenue_bearing
        FROM (
            SELECT *, ROW_NUMBER() OVER (PARTITION BY order_id ORDER BY {order}) AS _rn
            FROM {flagged_view}
            WHERE is_valid
        )
        WHERE _rn = 1
    """


# COMMAND ----------

# DBTITLE 1,MERGE and the version it committed


def merge_sql(target, view, columns, keys, run_ts):
    """Insert new keys, update rows whose values changed (only those, so `_updated_at` moves
    only then), delete keys that no longer derive from the source."""
    names = [c for c, _ in columns]
    values = [c for c in names if c not in keys]
    on = " AND ".join(f"t.{k} <=> s.{k}" for k in keys)
    same = " AND ".join(f"t.{c} <=> s.{c}" for c in values)
    update = ", ".join(f"{c} = s.{c}" for c in values)
    insert_cols = ", ".join(names + ["_updated_at"])
    insert_vals = ", ".join([f"s.{c}" for c in names] + [f"TIMESTAMP '{run_ts}'"])
    return f"""
        MERGE INTO {target} AS t
        USING {view} AS s
        ON {on}
        WHEN MATCHED AND NOT ({same})
            THEN UPDATE SET {update}, _updated_at = TIMESTAMP '{run_ts}'
        WHEN NOT MATCHED THEN INSERT ({insert_cols}) VALUES ({insert_vals})
        WHEN NOT MATCHED BY SOURCE THEN DELETE
    """


def committed_version(target, marker, before, counts):
    """(version, committed) of the MERGE tagged `marker`: its own commit, never a concurrent
    writer's. Delta 4.4 commits a MERGE that changes no row too; a runtime that skips such a
    commit leaves `before` in place (committed False)."""
    entries = [e for e in _history(target, 100) if int(e["version"]) > before]
    ours = [e for e in entries if e.get("userMetadata") == marker]
    if not ours:
        # A session shared with another notebook can overwrite the marker between our setting
        # it and the commit: then take the one MERGE since `before` with our row counts.
        def same_counts(e):
            m = e.get("operationMetrics") or {}
            got = [
                int(m.get(k) or 0)
                for k in ("numTargetRowsInserted", "numTargetRowsUpdated", "numTargetRowsDeleted")
            ]
            return e.get("operation") == "MERGE" and got == counts

        ours = [e for e in entries if same_counts(e)]
        if len(ours) > 1:
            raise RuntimeError(f"cannot tell which commit of {target} is this run's MERGE")
    if not ours:
        if any(counts):
            raise RuntimeError(f"the MERGE into {target} changed rows but its commit is not found")
        return before, False
    return int(ours[0]["version"]), True


# COMMAND ----------

# DBTITLE 1,Checks on the committed version


def check_result(name, passed, description, metadata=None, severity="ERROR"):
    """One check's outcome; passed None means it could not be evaluated (reported as a
    warning, never as failed data)."""
    return {
        "name": name,
        "passed": passed,
        "severity": "WARN" if passed is None else severity,
        "description": description,
        "metadata": dict(metadata or {}),
    }


def _evaluate(name, fn):
    try:
        return fn()
    except Exception as exc:  # reported as not evaluated
        return check_result(name, None, f"not evaluated: {_first_line(exc)}")


def _rows_text(rows):
    return "; ".join(", ".join(f"{k}={v}" for k, v in r.asDict().items()) for r in rows)


def profile(table_sql, keys, amounts):
    """Row count, distinct keys and negative amounts of one table version, in one scan."""
    negatives = "".join(f", COUNT_IF({c} < 0) AS neg_{c}" for c in amounts)
    if len(keys) == 1:
        # A plain distinct count is much cheaper than one over a struct; a NULL key, which
        # COUNT(DISTINCT) skips, counts as one more key, as it would in a struct.
        distinct = f"COUNT(DISTINCT {keys[0]}) + IF(COUNT_IF({keys[0]} IS NULL) > 0, 1, 0)"
    else:
        # struct(...) so that keys with NULL parts (a NULL region) still count as keys.
        distinct = f"COUNT(DISTINCT struct({', '.join(keys)}))"
    row = spark.sql(
        f"SELECT COUNT(*) AS rows, {distinct} AS keys{negatives} FROM {table_sql}"
    ).collect()[0]
    return {k: int(v) for k, v in row.asDict().items()}


def check_unique_keys(table_sql, described, keys, stats):
    cols = ", ".join(keys)
    extra = stats["rows"] - stats["keys"]
    meta = {"rows": stats["rows"], "distinct_keys": stats["keys"], "checked": described}
    if extra == 0:
        return check_result("unique_keys", True, f"({cols}) is unique in {described}", meta)
    dups = f"SELECT {cols}, COUNT(*) AS n FROM {table_sql} GROUP BY {cols} HAVING COUNT(*) > 1"
    dup_keys = int(spark.sql(f"SELECT COUNT(*) AS n FROM ({dups})").collect()[0]["n"])
    examples = _rows_text(spark.sql(f"{dups} ORDER BY n DESC LIMIT 5").collect())
    meta.update(duplicate_keys=dup_keys, examples=examples)
    return check_result(
        "unique_keys",
        False,
        f"{dup_keys} key(s) ({cols}) occur more than once in {described} ({extra} extra "
        f"rows), e.g. {examples}",
        meta,
    )


def check_no_negative(described, amounts, stats):
    negative = {c: stats[f"neg_{c}"] for c in amounts}
    meta = {f"negative_{c}": n for c, n in negative.items()}
    meta["checked"] = described
    bad = {c: n for c, n in negative.items() if n}
    if not bad:
        text = f"no negative {', '.join(amounts)} in {described}"
        return check_result("no_negative_revenue", True, text, meta)
    text = ", ".join(f"{c} ({n} rows)" for c, n in bad.items())
    return check_result(
        "no_negative_revenue", False, f"negative values in {text} of {described}", meta
    )


# The contract's valid row, written apart from the cleaning query on purpose: the check must
# not share a mistake with the query it checks.
VALID_ROW_SQL = (
    "order_id IS NOT NULL AND customer_id IS NOT NULL AND product_id IS NOT NULL "
    "AND order_ts IS NOT NULL AND status IN ('placed', 'shipped', 'delivered', 'returned', "
    "'cancelled') AND try_cast(quantity AS INT) >= 1 "
    "AND try_cast(unit_price AS DECIMAL(10,2)) >= 0 AND try_cast(discount AS DECIMAL(4,3)) >= 0 "
    "AND try_cast(discount AS DECIMAL(4,3)) < 1 "
    "AND try_cast(try_multiply(try_cast(quantity AS INT), try_cast(unit_price AS DECIMAL(10,2)))"
    " AS DECIMAL(18,2)) IS NOT NULL"
)


def check_matches_source(described, expected, source_described, stats):
    """`expected`: the distinct order_ids of the source's rows that VALID_ROW_SQL accepts
    (counted by NotebookRun(recount=True) in its scan of the source)."""
    actual = stats["rows"]
    meta = {
        "expected_rows": expected,
        "actual_rows": actual,
        "source": source_described,
        "checked": described,
    }
    if expected == actual:
        text = f"{actual} rows = valid deduplicated orders in {source_described}"
        return check_result("row_count_matches_source", True, text, meta)
    return check_result(
        "row_count_matches_source",
        False,
        f"{described} has {actual} rows but {source_described} has {expected} valid "
        f"deduplicated orders ({actual - expected:+d})",
        meta,
    )


def check_subset(table_sql, described, facts_sql, facts_described):
    # Only the facts whose order_id the checked table holds take part in the join: a small
    # side, where all of order_facts would be shuffled.
    facts = f"SELECT * FROM {facts_sql} WHERE order_id IN (SELECT order_id FROM {table_sql})"
    orphans = (
        f"SELECT h.order_id, h.net_amount FROM {table_sql} h LEFT ANTI JOIN ({facts}) f "
        "ON h.order_id = f.order_id AND f.revenue_bearing AND h.customer_id <=> f.customer_id "
        "AND h.region <=> f.region AND h.order_date <=> f.order_date "
        "AND h.net_amount <=> f.net_amount"
    )
    count = int(spark.sql(f"SELECT COUNT(*) AS n FROM ({orphans})").collect()[0]["n"])
    meta = {"rows_not_in_order_facts": count, "checked": described, "order_facts": facts_described}
    if count == 0:
        text = f"every row of {described} matches a revenue-bearing row of {facts_described}"
        return check_result("subset_of_order_facts", True, text, meta)
    examples = _rows_text(spark.sql(f"{orphans} LIMIT 5").collect())
    meta["examples"] = examples
    return check_result(
        "subset_of_order_facts",
        False,
        f"{count} row(s) of {described} have no matching revenue-bearing row in "
        f"{facts_described}, e.g. {examples}",
        meta,
    )


# COMMAND ----------

# DBTITLE 1,One notebook run


class NotebookRun:
    """One notebook run: the pinned, validated, cleaned source and the tables it writes."""

    def __init__(
        self,
        notebook,
        source_table,
        target_schema="",
        source_version="",
        reuse=False,
        recount=False,
    ):
        self.notebook = notebook
        self.started_at = _dt.datetime.now(_dt.timezone.utc)
        self._t0 = _time.monotonic()
        # Every parameter is checked before anything is read or written.
        self.source = parse_table_name(source_table)
        self.target_schema = parse_schema_name(target_schema)
        self.source_version_requested = str(source_version or "").strip()
        wanted = parse_source_version(source_version)
        self._suffix = _uuid.uuid4().hex[:10]
        self._views = []
        self.tables = []
        src = self.source["sql"]
        schema = _read_schema(src)
        self.source_version = resolve_source_version(src, wanted)
        validate_source_schema(src, schema)
        self.source_sql = _versioned(src, self.source_version)
        flagged_view = self.view(
            "flagged", spark.sql(flagged_orders_sql(self.source_sql, recount=recount))
        )
        # A pass of its own: Spark Connect fills observed metrics only for actions that return
        # rows, never for a MERGE, a checkpoint or a table write (docs/performance.md).
        recounted = ", COUNT(DISTINCT _recount_id) AS valid_orders" if recount else ""
        counts = spark.sql(
            f"SELECT COUNT(*) AS n, COUNT_IF(NOT is_valid) AS bad{recounted} FROM {flagged_view}"
        ).collect()[0]
        self.rows_read = int(counts["n"])
        self.rows_rejected = int(counts["bad"])
        #: Distinct order_ids of valid source rows by the check's own rule (with `recount`).
        self.valid_orders = int(counts["valid_orders"]) if recount else None
        clean = spark.sql(derived_orders_sql(flagged_view))
        # Kept only for a notebook whose MERGEs read the rows more than once (`reuse`): keeping
        # them costs more than one derivation from the pinned version, which gives the same rows.
        kept = _checkpoint(clean) if reuse else clean
        # A MERGE reading kept rows need not materialize its source again: they cannot change.
        self._materialize = "none" if kept is not clean else None
        clean = kept
        # Held until `finish`: Spark Connect frees a checkpoint when its DataFrame is collected.
        self._frames = [clean]
        self.clean_view = self.view("clean", clean)

    @property
    def source_described(self):
        if self.source_version is None:
            return self.source["sql"]
        return f"{self.source['sql']} version {self.source_version}"

    def view(self, name, df):
        """Register `df` as a temporary view of this run; dropped by `finish`."""
        view = f"nbp_{name}_{self._suffix}"
        df.createOrReplaceTempView(view)
        self._views.append(view)
        return view

    def target(self, name):
        """Where output `name` lives: the target schema, else beside the source."""
        if self.target_schema:
            return f"{self.target_schema}.{name}"
        if self.source["path"]:
            return f"delta.`{self.source['path'].rsplit('/', 1)[0]}/{name}`"
        return f"{self.source['schema']}.{name}"

    def merge(self, name, columns, keys, select_sql, amounts):
        """MERGE the rows of `select_sql` into output `name` and check the version committed.
        `columns` is a list of (name, SQL type), keys first; `amounts` the columns that are
        never negative. Returns the exit-JSON entry (with `view`, the MERGE source)."""
        target = self.target(name)
        if self.target_schema:
            spark.sql(f"CREATE SCHEMA IF NOT EXISTS {self.target_schema}")
        ddl = ", ".join(f"{c} {t}" for c, t in columns)
        spark.sql(f"CREATE TABLE IF NOT EXISTS {target} ({ddl}, _updated_at TIMESTAMP) USING DELTA")
        view = self.view(name, spark.sql(select_sql))
        before = int(_history(target, 1)[0]["version"])
        marker = f"nbpipeline {self.notebook} {name} {self._suffix}"
        run_ts = self.started_at.strftime("%Y-%m-%d %H:%M:%S.%f")
        # A runtime refusing the setting still commits; `committed_version` then goes by counts.
        marked = _try_set(_COMMIT_MARKER_CONF, marker)
        materialize = self._materialize and _try_set(_MATERIALIZE_CONF, self._materialize)
        try:
            metrics = spark.sql(merge_sql(target, view, columns, keys, run_ts)).collect()[0]
        finally:
            if marked:
                spark.conf.unset(_COMMIT_MARKER_CONF)
            if materialize:
                _try_set(_MATERIALIZE_CONF, _FAST_SETTINGS[_MATERIALIZE_CONF])
        metrics = metrics.asDict()
        counts = [
            int(metrics.get(k) or 0)
            for k in ("num_inserted_rows", "num_updated_rows", "num_deleted_rows")
        ]
        version, committed = committed_version(target, marker, before, counts)
        table_sql = _versioned(target, version)
        described = f"{target} version {version}"
        stats = profile(table_sql, keys, amounts)
        checks = [
            _evaluate("unique_keys", lambda: check_unique_keys(table_sql, described, keys, stats)),
            _evaluate("no_negative_revenue", lambda: check_no_negative(described, amounts, stats)),
        ]
        entry = {
            "asset": name,
            "table": target,
            "location": self._location(target),
            "rows_read": self.rows_read,
            "rows_rejected": self.rows_rejected,
            "rows_inserted": counts[0],
            "rows_updated": counts[1],
            "rows_deleted": counts[2],
            "delta_version": version,
            "committed": committed,
            "row_count": stats["rows"],
            "columns": [
                {"name": f.name, "type": f.dataType.simpleString()}
                for f in spark.table(target).schema.fields
            ],
            "checks": checks,
        }
        self.tables.append(entry)
        return {**entry, "view": view}

    def add_check(self, entry, name, fn):
        """Evaluate one more check of a table written by this run and report it with it."""
        for table in self.tables:
            if table["asset"] == entry["asset"]:
                table["checks"].append(_evaluate(name, fn))

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
        self._frames = []
        ended = _dt.datetime.now(_dt.timezone.utc)
        return _json.dumps(
            {
                "notebook": self.notebook,
                "started_at": self.started_at.isoformat(),
                "ended_at": ended.isoformat(),
                "duration_s": round(_time.monotonic() - self._t0, 3),
                "source_table": self.source["sql"],
                "source_version": self.source_version,
                "source_version_requested": self.source_version_requested,
                "rows_read": self.rows_read,
                "rows_rejected": self.rows_rejected,
                "tables": self.tables,
            },
            default=str,
        )
