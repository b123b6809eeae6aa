"""The `sqlite` service: read-only SQL over one SQLite database file.

Rules of this module:

* Read-only three times over: the file is opened with `mode=ro`, the connection sets
  `query_only`, and an authorizer lets through only reads (SELECT, reading columns,
  functions, recursive CTEs and a few schema pragmas such as `table_info`). So
  `WITH ... DELETE`, ATTACH, PRAGMA writes, temp tables and transactions are refused
  with `AccessDeniedError` before they run, rather than failing on the read-only file.
* Each worker thread has its own connection (a SQLite connection belongs to the thread
  that opened it).
* A statement is interrupted after the node's `timeout`, so a runaway query (a recursive
  CTE without a limit) cannot hold a worker for good; rows stop at `max_rows` or when
  the reply would outgrow one message, and the result says `truncated`.
* Rows are objects keyed by column name; a repeated name (`SELECT * FROM a JOIN b`)
  gets a `:2`, `:3` suffix so no value is lost, and `columns` lists the keys in order.
* SQLite errors are turned into mesh errors here; callers never see `sqlite3` ones.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Final

from mesh.node import Node
from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    AccessDeniedError,
    ConfigurationError,
    MeshError,
    UnavailableError,
    ValidationFailedError,
    encode_payload,
)

__all__ = ["node", "MAX_ROWS", "REPLY_BUDGET"]

MAX_ROWS: Final = 10_000
# Rows stop before the reply passes this many bytes, leaving room for the header.
REPLY_BUDGET: Final = MAX_MESSAGE_BYTES - 64 * 1024
# How many SQLite VM instructions run between two checks of the deadline.
PROGRESS_STEPS: Final = 10_000

_SCALAR: Final = {"type": ["string", "number", "boolean", "null"]}
QUERY_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "sql": {
            "type": "string",
            "minLength": 1,
            "description": "One SELECT statement (or a schema PRAGMA such as table_info).",
        },
        "params": {
            "type": ["array", "object"],
            "items": _SCALAR,
            "additionalProperties": _SCALAR,
            "description": "Values for `?` placeholders (an array) or `:name` ones (an object).",
        },
        "max_rows": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_ROWS,
            "default": 1000,
            "description": "Return at most this many rows.",
        },
    },
    "required": ["sql"],
    "additionalProperties": False,
}
TABLES_SCHEMA: Final = {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
QUERY_RESULT: Final = {
    "type": "object",
    "properties": {
        "columns": {"type": "array", "items": {"type": "string"}, "description": "The column names, in order."},
        "rows": {
            "type": "array",
            "items": {"type": "object"},
            "description": "One object per row, column name -> value (text, number, null; a BLOB is"
            " bytes, hex over MCP).",
        },
        "truncated": {"type": "boolean", "description": "Whether rows were left out (max_rows or the reply's size)."},
    },
    "required": ["columns", "rows", "truncated"],
    "additionalProperties": False,
}
_NAMED: Final = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
    "required": ["name", "type"],
    "additionalProperties": False,
}
TABLES_RESULT: Final = {
    "type": "object",
    "properties": {
        "tables": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "type": {"enum": ["table", "view"]},
                    "columns": {
                        "type": "array", "items": _NAMED, "description": "Each column's name and declared type.",
                    },
                },
                "required": ["name", "type", "columns"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["tables"],
    "additionalProperties": False,
}

_READS: Final = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
# Pragmas whose argument names a schema object rather than setting anything.
_SCHEMA_PRAGMAS: Final = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
_DENIED_FUNCTIONS: Final = frozenset({"load_extension"})
# Primary result codes that say "the file, not the query": worth a retry later.
_TRANSIENT: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_NOMEM,
    }
)
_READ_ONLY_MESSAGE: Final = (
    "the sqlite service is read-only: only SELECT and schema PRAGMAs (table_info, index_list, ...) may run"
)

Params = Sequence[Any] | Mapping[str, Any]


class _Reader:
    """One worker thread's read-only connection, with the guards that keep it read-only."""

    def __init__(self, uri: str, timeout: float) -> None:
        self.timeout = timeout
        self.denied = False
        self.deadline = math.inf
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        self.conn.text_factory = lambda b: b.decode("utf-8", "replace")
        self.conn.execute("PRAGMA query_only = ON")
        self.conn.set_authorizer(self._authorize)
        self.conn.set_progress_handler(self._past_deadline, PROGRESS_STEPS)

    def _authorize(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        if action in _READS and not (action == sqlite3.SQLITE_FUNCTION and arg2 in _DENIED_FUNCTIONS):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and arg1 in _SCHEMA_PRAGMAS:
            return sqlite3.SQLITE_OK
        self.denied = True  # SQLite reports some denials as plain errors; remember it was us
        return sqlite3.SQLITE_DENY

    def _past_deadline(self) -> bool:
        return time.monotonic() > self.deadline

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Run one statement under the deadline, turning SQLite errors into mesh errors."""
        self.denied = False
        self.deadline = time.monotonic() + self.timeout
        try:
            yield
        except (sqlite3.Error, OverflowError) as exc:
            raise self._refusal(exc) from None
        finally:
            self.deadline = math.inf

    def _refusal(self, exc: Exception) -> Exception:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if self.denied or code == sqlite3.SQLITE_READONLY:
            return AccessDeniedError(_READ_ONLY_MESSAGE, details={"field": "sql"})
        if code == sqlite3.SQLITE_INTERRUPT:
            return ValidationFailedError(
                f"sql: the query ran longer than this node's limit of {self.timeout:g} s; narrow it",
                details={"field": "sql", "limit_seconds": self.timeout},
            )
        if code in _TRANSIENT:
            return UnavailableError(f"the database cannot be read right now: {exc}")
        if isinstance(exc, OverflowError) or "binding" in str(exc).lower():
            return ValidationFailedError(f"params: {exc}", details={"field": "params"})
        return ValidationFailedError(f"sql: {exc}", details={"field": "sql"})

    def query(self, sql: str, params: Params, max_rows: int) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        size, truncated = 0, False
        # Closing the cursor ends the statement, and with it the read lock on the file.
        with self._guard(), closing(self.conn.execute(sql, params)) as cur:
            columns = _unique([d[0] for d in cur.description or ()])
            for values in cur:
                row = dict(zip(columns, values, strict=True))
                size += len(encode_payload(row))
                if len(rows) == max_rows or size > REPLY_BUDGET:
                    truncated = True
                    break
                rows.append(row)
        return {"columns": columns, "rows": rows, "truncated": truncated}

    def tables(self) -> list[dict[str, Any]]:
        with self._guard():
            names = self.conn.execute(
                "SELECT name, type FROM sqlite_schema WHERE type IN ('table', 'view')"
                " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
            ).fetchall()
            return [
                {
                    "name": name,
                    "type": kind,
                    "columns": [
                        {"name": col[1], "type": col[2]}
                        for col in self.conn.execute(f"PRAGMA table_info({_quote(name)})")
                    ],
                }
                for name, kind in names
            ]


def _quote(name: str) -> str:
    """`name` as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _unique(names: list[str]) -> list[str]:
    """Column names made distinct by numbering repeats (`id`, `id:2`)."""
    used: set[str] = set()
    out = []
    for name in names:
        candidate, count = name, 1
        while candidate in used:
            count += 1
            candidate = f"{name}:{count}"
        used.add(candidate)
        out.append(candidate)
    return out


def node(database: str = "var/sample.db", timeout: float = 10.0) -> Node:
    """The sqlite node, answering read-only queries against `database`.

    Args:
        database: path of an existing SQLite file; the node never writes to it.
        timeout: seconds one statement may run before it is interrupted.

    Returns:
        A `Node` named "sqlite" offering `sqlite.query` and `sqlite.tables`.

    Raises:
        ConfigurationError: the file is missing or not a SQLite database, or the timeout
            is not a positive number.
    """
    if not isinstance(database, str) or not database:
        raise ConfigurationError("sqlite: `database` must be a non-empty string", details={"field": "database"})
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigurationError(
            "sqlite: `timeout` must be a positive number of seconds", details={"field": "timeout"}
        )
    file = Path(database).resolve()
    if not file.is_file():
        raise ConfigurationError(
            f"sqlite: database {database} does not exist (run `python -m mesh.nodes.sample var` for the sample)",
            details={"field": "database"},
        )
    uri = file.as_uri() + "?mode=ro"
    try:
        probe = _Reader(uri, timeout)
        probe.tables()
        probe.conn.close()
    except (sqlite3.Error, MeshError) as exc:
        raise ConfigurationError(
            f"sqlite: cannot read {database}: {exc}", details={"field": "database"}
        ) from None

    local = threading.local()

    def reader() -> _Reader:
        r: _Reader | None = getattr(local, "reader", None)
        if r is None:
            try:
                r = local.reader = _Reader(uri, timeout)
            except sqlite3.Error as exc:
                raise UnavailableError(f"the database cannot be opened right now: {exc}") from None
        return r

    n = Node("sqlite")

    @n.action(
        "sqlite", "query", schema=QUERY_SCHEMA, idempotent=True, read_only=True, open_world=False,
        result_schema=QUERY_RESULT,
        description="Run one read-only SQL SELECT and return its rows as objects keyed by column.",
    )
    def query(payload: dict[str, Any]) -> dict[str, Any]:
        return reader().query(payload["sql"], payload.get("params", ()), int(payload.get("max_rows", 1000)))

    @n.action(
        "sqlite", "tables", schema=TABLES_SCHEMA, idempotent=True, read_only=True, open_world=False,
        result_schema=TABLES_RESULT,
        description="List the database's tables and views with their column names and types.",
    )
    def tables(payload: dict[str, Any]) -> dict[str, Any]:
        return {"tables": reader().tables()}

    return n
