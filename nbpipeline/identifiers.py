"""Table names the user may pass, validated before any SQL runs.

Accepted: `[catalog.]schema.table` made of plain identifiers, or a Delta path written as
``delta.`/abs/path` ``. Anything else (quotes, semicolons, spaces, relative paths) is refused, so
no value a user passes is ever spliced into SQL unchecked.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from nbpipeline.errors import ConfigError

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_NAME_RE = re.compile(rf"^(?:({IDENT})\.)?({IDENT})\.({IDENT})$")
_PATH_RE = re.compile(r"^delta\.`((?:[a-z][a-z0-9+.-]*:)?/[A-Za-z0-9_.\-/=@:]*)`$")
_IDENT_RE = re.compile(rf"^{IDENT}$")


@dataclass(frozen=True)
class TableRef:
    """A validated table reference: either a catalog name or a Delta path."""

    table: str
    schema: str | None = None
    catalog: str | None = None
    path: str | None = None

    @property
    def sql(self) -> str:
        """The reference as it is written in SQL."""
        if self.path is not None:
            return f"delta.`{self.path}`"
        return ".".join(p for p in (self.catalog, self.schema, self.table) if p)

    @property
    def schema_sql(self) -> str | None:
        """`[catalog.]schema` for catalog tables, None for paths."""
        if self.path is not None:
            return None
        return ".".join(p for p in (self.catalog, self.schema) if p)

    def sibling(self, name: str) -> TableRef:
        """The table called `name` next to this one (same schema, or same parent folder)."""
        check_identifier(name, what="table name")
        if self.path is not None:
            return TableRef(table=name, path=posixpath.join(posixpath.dirname(self.path), name))
        return TableRef(table=name, schema=self.schema, catalog=self.catalog)

    def __str__(self) -> str:
        return self.sql


def check_identifier(value: str, *, what: str = "identifier") -> str:
    """Return `value` if it is a plain SQL identifier, else raise ConfigError naming it."""
    if not isinstance(value, str) or not _IDENT_RE.match(value):
        raise ConfigError(f"invalid {what} {value!r}: use letters, digits and _ only")
    return value


def parse_table(value: str, *, what: str = "table") -> TableRef:
    """Parse `[catalog.]schema.table` or ``delta.`/abs/path` ``; raise ConfigError otherwise."""
    if not isinstance(value, str):
        raise ConfigError(f"invalid {what} {value!r}: expected a string")
    text = value.strip()
    m = _NAME_RE.match(text)
    if m:
        catalog, schema, table = m.groups()
        return TableRef(table=table, schema=schema, catalog=catalog)
    m = _PATH_RE.match(text)
    if m:
        path = m.group(1).rstrip("/")
        if ".." in path.split("/"):
            raise ConfigError(f"invalid {what} {value!r}: '..' is not allowed in a Delta path")
        name = posixpath.basename(path)
        if not _IDENT_RE.match(name):
            raise ConfigError(
                f"invalid {what} {value!r}: the last folder of a Delta path must be a plain name"
            )
        return TableRef(table=name, path=path)
    raise ConfigError(
        f"invalid {what} {value!r}: expected [catalog.]schema.table with plain names "
        "(letters, digits, _) or delta.`/absolute/path`"
    )


def parse_schema(value: str, *, what: str = "schema") -> str:
    """Validate `[catalog.]schema` and return it unchanged."""
    parts = value.split(".") if isinstance(value, str) else [value]
    if not 1 <= len(parts) <= 2:
        raise ConfigError(f"invalid {what} {value!r}: expected [catalog.]schema")
    for part in parts:
        check_identifier(part, what=what)
    return value
