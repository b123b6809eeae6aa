"""The `kv` service: a durable key-value store in one SQLite file.

Rules of this module:

* Each worker thread has its own connection (a SQLite connection belongs to the thread
  that opened it). The file is in WAL mode, so reads never wait for a writer, and
  `busy_timeout` makes concurrent writers queue instead of failing.
* Values are stored in the wire encoding (MessagePack), so whatever a client put, bytes
  included, comes back exactly as it went in.
* Keys compare as SQLite BINARY text, which is UTF-8 byte order and so code point order:
  `list` returns keys in the order Python's `sorted()` gives. A prefix is the range
  `prefix <= key < _successor(prefix)`, so `%`, `_` and `*` are ordinary characters
  and the primary-key index answers the query.
* SQLite errors are turned into mesh errors here; callers never see `sqlite3` ones.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from mesh.node import Node
from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    ConfigurationError,
    InternalError,
    UnavailableError,
    ValidationFailedError,
    decode_payload,
    encode_payload,
)
from mesh.sqlitefile import switch_to_wal

__all__ = ["node", "MAX_KEY_CHARS", "MAX_LIST", "MAX_VALUE_BYTES"]

MAX_KEY_CHARS: Final = 512
MAX_LIST: Final = 1000
# A `get` reply carries the value plus the key and a header; keep it under one message.
MAX_VALUE_BYTES: Final = MAX_MESSAGE_BYTES - 64 * 1024
# As long as a command's default deadline: a write queued behind others (slow fsyncs on a
# loaded disk) waits its turn rather than failing UNAVAILABLE while the caller still waits.
BUSY_TIMEOUT_MS: Final = 30_000

_KEY: Final = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_KEY_CHARS,
    "description": f"The key: a non-empty string of at most {MAX_KEY_CHARS} characters.",
}


def _keyed(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    props = {"key": _KEY, **(extra or {})}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


GET_SCHEMA: Final = _keyed()
PUT_SCHEMA: Final = _keyed({"value": {"description": "Any JSON value to store under the key."}})
DELETE_SCHEMA: Final = _keyed()
INCR_SCHEMA: Final = {
    **_keyed({"by": {"type": "integer", "description": "How much to add (may be negative)."}}),
    "required": ["key", "by"],
}
def _result(props: dict[str, Any]) -> dict[str, Any]:
    """The schema of a result object holding exactly `props`, all present."""
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


_RESULT_KEY: Final = {"type": "string", "description": "The key."}
GET_RESULT: Final = _result({
    "key": _RESULT_KEY,
    "found": {"type": "boolean", "description": "Whether a value is stored under the key."},
    "value": {"description": "The stored value (null when not found)."},
})
PUT_RESULT: Final = _result({
    "key": _RESULT_KEY,
    "created": {"type": "boolean", "description": "True when the key was new, false when a value was replaced."},
})
INCR_RESULT: Final = _result({"key": _RESULT_KEY, "value": {"type": "integer", "description": "The new value."}})
DELETE_RESULT: Final = _result({
    "key": _RESULT_KEY,
    "deleted": {"type": "boolean", "description": "Whether there was a value to remove."},
})
LIST_RESULT: Final = _result({
    "keys": {"type": "array", "items": {"type": "string"}, "description": "The keys, sorted."},
    "truncated": {"type": "boolean", "description": "Whether more keys match than were returned."},
})
LIST_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "prefix": {
            "type": "string",
            "maxLength": MAX_KEY_CHARS,
            "default": "",
            "description": "Only keys starting with this exact text (no wildcards).",
        },
        "limit": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_LIST,
            "default": 100,
            "description": "At most this many keys.",
        },
    },
    "required": [],
    "additionalProperties": False,
}

_CREATE: Final = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID"
)
# The primary result codes worth a retry: another process holds a lock, or the disk hiccuped.
_TRANSIENT: Final = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL}
)


def _successor(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix` (None: no bound)."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code == 0xD800:  # surrogates cannot be stored as UTF-8; skip over them
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Turn a `sqlite3` error into the mesh error that says whether a retry can help."""
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _TRANSIENT:
            raise UnavailableError(f"kv storage is unavailable: {exc}") from None
        raise InternalError(f"kv storage failed: {exc}") from None


class _Store:
    """The SQLite file behind the service, one connection per worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        with _storage_errors():
            conn = self._conn()
            switch_to_wal(conn, wait_s=BUSY_TIMEOUT_MS / 1000)
            conn.execute(_CREATE)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # IMMEDIATE: a write transaction takes the write lock at BEGIN (implicit at the
            # first write; `incr`, which reads first, begins it itself).
            conn = sqlite3.connect(self.path, isolation_level="IMMEDIATE")
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> tuple[bool, Any]:
        with _storage_errors():
            row = self._conn().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return (False, None) if row is None else (True, decode_payload(row[0]))

    def put(self, key: str, blob: bytes) -> bool:
        conn = self._conn()
        with _storage_errors(), conn:
            cur = conn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, blob)
            )
            created = cur.rowcount == 1
            if not created:
                conn.execute("UPDATE kv SET value = ? WHERE key = ?", (blob, key))
        return created

    def incr(self, key: str, by: int) -> int:
        """Add `by` to the integer under `key` (0 when missing) in one transaction.

        The write lock is taken before the read: Python's sqlite3 begins its implicit
        transaction only at the first write, so a read before it could see a value
        another writer is about to replace, and an increment would be lost.
        """
        conn = self._conn()
        with _storage_errors(), conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            current = 0 if row is None else decode_payload(row[0])
            if isinstance(current, bool) or not isinstance(current, int):
                raise ValidationFailedError(f"{key} does not hold an integer", details={"field": "key"})
            total = current + by
            conn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, encode_payload(total)),
            )
        return total

    def delete(self, key: str) -> bool:
        conn = self._conn()
        with _storage_errors(), conn:
            return conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount == 1

    def keys(self, prefix: str, limit: int) -> list[str]:
        upper = _successor(prefix)
        sql, args = "SELECT key FROM kv WHERE key >= ?", [prefix]
        if upper is not None:
            sql += " AND key < ?"
            args.append(upper)
        with _storage_errors():
            rows = self._conn().execute(sql + " ORDER BY key LIMIT ?", [*args, limit]).fetchall()
        return [r[0] for r in rows]


def node(path: str = "var/kv.sqlite3") -> Node:
    """The kv node, storing its data in the SQLite file at `path`.

    Args:
        path: the database file; it and its parent directory are created when missing.

    Returns:
        A `Node` named "kv" offering `kv.get`, `kv.put`, `kv.incr`, `kv.delete` and
        `kv.list`. `kv.incr` is exactly-once: in a broker cluster its result is committed
        before the reply, so a retry after a failover never adds twice.

    Raises:
        ConfigurationError: the file cannot be created or opened as a database.
    """
    if not isinstance(path, str) or not path:
        raise ConfigurationError("kv: `path` must be a non-empty string", details={"field": "path"})
    file = Path(path)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        store = _Store(file)
    except (OSError, InternalError, UnavailableError) as exc:
        raise ConfigurationError(f"kv: cannot open {path}: {exc}", details={"field": "path"}) from None

    n = Node("kv")

    @n.action(
        "kv", "get", schema=GET_SCHEMA, idempotent=True, read_only=True, open_world=False, result_schema=GET_RESULT,
        description="Read the value stored under a key.",
    )
    def get(payload: dict[str, Any]) -> dict[str, Any]:
        found, value = store.get(payload["key"])
        return {"key": payload["key"], "found": found, "value": value}

    @n.action(
        "kv", "put", schema=PUT_SCHEMA, idempotent=True, read_only=False, destructive=True, open_world=False,
        result_schema=PUT_RESULT,
        description="Store a JSON value under a key, replacing any value already there.",
    )
    def put(payload: dict[str, Any]) -> dict[str, Any]:
        blob = encode_payload(payload["value"])
        if len(blob) > MAX_VALUE_BYTES:
            raise ValidationFailedError(
                f"value: {len(blob)} bytes encoded, limit {MAX_VALUE_BYTES}",
                details={"field": "value", "limit": MAX_VALUE_BYTES},
            )
        return {"key": payload["key"], "created": store.put(payload["key"], blob)}

    @n.action(
        "kv", "incr", schema=INCR_SCHEMA, exactly_once=True, read_only=False, destructive=False, open_world=False,
        result_schema=INCR_RESULT,
        description="Add to the integer stored under a key and return the new value (runs once per command id).",
    )
    def incr(payload: dict[str, Any]) -> dict[str, Any]:
        return {"key": payload["key"], "value": store.incr(payload["key"], payload["by"])}

    @n.action(
        "kv", "delete", schema=DELETE_SCHEMA, idempotent=True, read_only=False, destructive=True, open_world=False,
        result_schema=DELETE_RESULT,
        description="Remove a key and its value.",
    )
    def delete(payload: dict[str, Any]) -> dict[str, Any]:
        return {"key": payload["key"], "deleted": store.delete(payload["key"])}

    @n.action(
        "kv", "list", schema=LIST_SCHEMA, idempotent=True, read_only=True, open_world=False, result_schema=LIST_RESULT,
        description="List keys starting with a prefix, in sorted order.",
    )
    def list_keys(payload: dict[str, Any]) -> dict[str, Any]:
        limit = int(payload.get("limit", 100))
        keys = store.keys(payload.get("prefix", ""), limit + 1)
        return {"keys": keys[:limit], "truncated": len(keys) > limit}

    return n
