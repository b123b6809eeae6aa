"""The ready nodes (echo, kv, sqlite, fs) and the sample script, on real files in tmp_path.

Each call goes through the action the node registered: its schema validator first, then
its handler, as the node loop does for a command.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mesh.node import Node
from mesh.nodes import echo, fs, kv, sample
from mesh.nodes import sqlite as sqlite_node
from mesh.plugins import load_node
from mesh.protocol import AccessDeniedError, ConfigurationError, ValidationFailedError


def call(n: Node, service: str, action: str, payload: dict[str, Any]) -> Any:
    """Validate `payload` against the action's schema, run its handler, and check that the
    result has the shape its declared result schema promises (every test here checks it)."""
    act = n.actions[(service, action)]
    act.validate(payload)
    result = act.handler(payload)
    result = asyncio.run(result) if act.is_async else result
    assert act.check_result is not None, (service, action)
    act.check_result(result)
    return result


@pytest.fixture
def sample_dir(tmp_path: Path) -> Path:
    sample.prepare(tmp_path / "var")
    return tmp_path / "var"


@pytest.fixture
def kv_node(tmp_path: Path) -> Node:
    return kv.node(path=str(tmp_path / "kv.sqlite3"))


@pytest.fixture
def db_node(sample_dir: Path) -> Node:
    return sqlite_node.node(database=str(sample_dir / "sample.db"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with text, binary and nested files, plus symlinks inside and out of it."""
    r = tmp_path / "root"
    (r / "sub" / "deep").mkdir(parents=True)
    (r / "a.txt").write_text("alpha\nthe needle is here\nomega\n")
    (r / "sub" / "b.md").write_text("# B\nno match\nneedle again\n")
    (r / "sub" / "deep" / "c.txt").write_text("needle deep down\n")
    (r / "binary.bin").write_bytes(b"\x00\x01needle\x00")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("needle outside the root\n")
    (r / "escape").symlink_to(outside / "secret.txt")
    (r / "escape_dir").symlink_to(outside)
    (r / "inner_link").symlink_to(r / "sub" / "b.md")
    return r


@pytest.fixture
def fs_node(root: Path) -> Node:
    return fs.node(root=str(root))


# ------------------------------------------------------------------ all nodes


def test_every_action_schema_is_closed_and_described(tmp_path: Path, sample_dir: Path) -> None:
    """Every action has a one-line description, a closed object schema with `required`, is
    retry-safe (idempotent, or exactly-once: kv.incr), declares its hints (none open-world)
    and the object schema of its result."""
    nodes = [
        echo.node(),
        kv.node(path=str(tmp_path / "kv.sqlite3")),
        sqlite_node.node(database=str(sample_dir / "sample.db")),
        fs.node(root=str(sample_dir / "files")),
    ]
    for n in nodes:
        for (service, name), act in n.actions.items():
            assert act.description and "\n" not in act.description, (service, name)
            assert act.schema["type"] == "object", (service, name)
            assert act.idempotent or (service, name) == ("kv", "incr") and act.exactly_once, (service, name)
            # What an MCP client needs to know: hints declared, the result's shape declared.
            assert act.hints.keys() == {"read_only", "destructive", "open_world"}, (service, name)
            assert act.hints["open_world"] is False, (service, name)
            assert act.result_schema is not None and act.result_schema["type"] == "object", (service, name)
            if (service, name) != ("echo", "echo"):  # echo takes any object on purpose
                assert act.schema["additionalProperties"] is False, (service, name)
                assert set(act.schema["required"]) <= set(act.schema["properties"]), (service, name)


def test_entry_points_load_each_node_with_its_config(tmp_path: Path, sample_dir: Path) -> None:
    """The `mesh.nodes` entry points build each node from a topology's config table."""
    built = {
        "echo": load_node("echo"),
        "kv": load_node("kv", {"path": str(tmp_path / "kv.sqlite3")}),
        "sqlite": load_node("sqlite", {"database": str(sample_dir / "sample.db")}),
        "fs": load_node("fs", {"root": str(sample_dir / "files")}),
    }
    assert {name: sorted(n.actions) for name, n in built.items()} == {
        "echo": [("echo", "echo"), ("echo", "reverse")],
        "kv": [("kv", "delete"), ("kv", "get"), ("kv", "incr"), ("kv", "list"), ("kv", "put")],
        "sqlite": [("sqlite", "query"), ("sqlite", "tables")],
        "fs": [("fs", "list"), ("fs", "read"), ("fs", "search")],
    }
    with pytest.raises(ConfigurationError):
        load_node("kv", {"no_such_option": 1})


# ----------------------------------------------------------------------- echo


def test_echo_returns_the_payload_unchanged() -> None:
    """echo.echo hands back any object as it came."""
    payload = {"text": "hi", "n": [1, 2.5, None], "raw": b"\x00\xff"}
    assert call(echo.node(), "echo", "echo", dict(payload)) == payload


def test_echo_reverse_reverses_the_text() -> None:
    """echo.reverse returns the characters in reverse order."""
    assert call(echo.node(), "echo", "reverse", {"text": "mesh é"}) == {"text": "é hsem"}


def test_echo_reverse_refuses_missing_or_extra_fields() -> None:
    """echo.reverse names the missing or unexpected field."""
    n = echo.node()
    with pytest.raises(ValidationFailedError) as missing:
        call(n, "echo", "reverse", {})
    assert missing.value.details["field"] == "text"
    with pytest.raises(ValidationFailedError) as extra:
        call(n, "echo", "reverse", {"text": "a", "loud": True})
    assert extra.value.details["field"] == "loud"


# ------------------------------------------------------------------------- kv


def test_kv_put_get_delete_round_trip(kv_node: Node) -> None:
    """put says whether it created the key, get finds it, delete removes it once."""
    assert call(kv_node, "kv", "put", {"key": "k", "value": 1}) == {"key": "k", "created": True}
    assert call(kv_node, "kv", "put", {"key": "k", "value": 2}) == {"key": "k", "created": False}
    assert call(kv_node, "kv", "get", {"key": "k"}) == {"key": "k", "found": True, "value": 2}
    assert call(kv_node, "kv", "delete", {"key": "k"}) == {"key": "k", "deleted": True}
    assert call(kv_node, "kv", "delete", {"key": "k"}) == {"key": "k", "deleted": False}
    assert call(kv_node, "kv", "get", {"key": "k"}) == {"key": "k", "found": False, "value": None}


def test_kv_incr_adds_and_refuses_a_non_integer(kv_node: Node) -> None:
    """incr starts a missing key at 0 and returns the new value; a non-integer value is refused."""
    assert call(kv_node, "kv", "incr", {"key": "n", "by": 5}) == {"key": "n", "value": 5}
    assert call(kv_node, "kv", "incr", {"key": "n", "by": -2}) == {"key": "n", "value": 3}
    assert call(kv_node, "kv", "get", {"key": "n"})["value"] == 3
    call(kv_node, "kv", "put", {"key": "s", "value": "text"})
    with pytest.raises(ValidationFailedError):
        call(kv_node, "kv", "incr", {"key": "s", "by": 1})
    assert kv_node.actions[("kv", "incr")].exactly_once


def test_kv_values_come_back_with_their_types(kv_node: Node) -> None:
    """Nested objects, lists, floats, null, false and bytes are stored exactly."""
    value = {"a": [1, 2.5, None, False], "b": {"c": "é"}, "raw": b"\x00\xff"}
    call(kv_node, "kv", "put", {"key": "v", "value": value})
    assert call(kv_node, "kv", "get", {"key": "v"})["value"] == value
    call(kv_node, "kv", "put", {"key": "null", "value": None})
    assert call(kv_node, "kv", "get", {"key": "null"}) == {"key": "null", "found": True, "value": None}


def test_kv_list_treats_percent_and_underscore_literally(kv_node: Node) -> None:
    """A prefix containing % or _ matches only keys with those exact characters."""
    for key in ["a%b", "a%c", "axb", "a_1", "ab1", "a_2", "a", "b"]:
        call(kv_node, "kv", "put", {"key": key, "value": key})
    assert call(kv_node, "kv", "list", {"prefix": "a%"}) == {"keys": ["a%b", "a%c"], "truncated": False}
    assert call(kv_node, "kv", "list", {"prefix": "a_"}) == {"keys": ["a_1", "a_2"], "truncated": False}
    everything = call(kv_node, "kv", "list", {})
    assert everything["keys"] == sorted(["a%b", "a%c", "axb", "a_1", "ab1", "a_2", "a", "b"])


def test_kv_list_prefix_at_the_edges_of_unicode(kv_node: Node) -> None:
    """Prefixes ending just below the surrogates or at U+10FFFF still bound the range right."""
    for key in ["z\ud7ff1", "z\ue000", "\U0010ffffa", "\U0010ffff", "zz"]:
        call(kv_node, "kv", "put", {"key": key, "value": 0})
    assert call(kv_node, "kv", "list", {"prefix": "z\ud7ff"})["keys"] == ["z\ud7ff1"]
    assert call(kv_node, "kv", "list", {"prefix": "\U0010ffff"})["keys"] == ["\U0010ffff", "\U0010ffffa"]


def test_kv_list_limit_says_truncated(kv_node: Node) -> None:
    """list returns at most `limit` sorted keys and says when more exist."""
    for i in range(5):
        call(kv_node, "kv", "put", {"key": f"k{i}", "value": i})
    assert call(kv_node, "kv", "list", {"limit": 3}) == {"keys": ["k0", "k1", "k2"], "truncated": True}
    assert call(kv_node, "kv", "list", {"limit": 5}) == {"keys": [f"k{i}" for i in range(5)], "truncated": False}


def test_kv_data_survives_a_new_node_on_the_same_file(tmp_path: Path) -> None:
    """A node started later on the same file sees what an earlier one stored."""
    path = str(tmp_path / "state" / "kv.sqlite3")
    call(kv.node(path=path), "kv", "put", {"key": "greeting", "value": "hello"})
    later = kv.node(path=path)
    assert call(later, "kv", "get", {"key": "greeting"})["value"] == "hello"
    assert call(later, "kv", "put", {"key": "greeting", "value": "hi"})["created"] is False


def test_kv_creates_the_parent_directory_and_uses_wal(tmp_path: Path) -> None:
    """The store's directory is created and the file is in WAL mode."""
    path = tmp_path / "a" / "b" / "kv.sqlite3"
    kv.node(path=str(path))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_kv_refuses_bad_keys_and_limits(kv_node: Node) -> None:
    """Empty, over-long and non-string keys and out-of-range limits are refused by field."""
    for payload in [{"key": ""}, {"key": "x" * 513}, {"key": 5}]:
        with pytest.raises(ValidationFailedError) as bad:
            call(kv_node, "kv", "get", payload)
        assert bad.value.details["field"] == "key"
    call(kv_node, "kv", "get", {"key": "x" * 512})
    with pytest.raises(ValidationFailedError) as no_value:
        call(kv_node, "kv", "put", {"key": "k"})
    assert no_value.value.details["field"] == "value"
    with pytest.raises(ValidationFailedError) as limit:
        call(kv_node, "kv", "list", {"limit": 1001})
    assert limit.value.details["field"] == "limit"


def test_kv_refuses_a_value_too_big_for_a_reply(kv_node: Node) -> None:
    """A value whose `get` reply would not fit in one message is refused on put."""
    with pytest.raises(ValidationFailedError) as big:
        call(kv_node, "kv", "put", {"key": "big", "value": b"x" * kv.MAX_VALUE_BYTES})
    assert big.value.details["field"] == "value"
    assert call(kv_node, "kv", "get", {"key": "big"})["found"] is False


def test_kv_serves_puts_from_many_worker_threads(kv_node: Node) -> None:
    """Concurrent puts from worker threads all land, each created exactly once."""
    def put(i: int) -> bool:
        return call(kv_node, "kv", "put", {"key": f"t{i:03d}", "value": i})["created"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(put, range(200)))
    assert all(created)
    listed = call(kv_node, "kv", "list", {"prefix": "t", "limit": 1000})
    assert listed["keys"] == [f"t{i:03d}" for i in range(200)]


def test_kv_path_that_is_a_directory_is_a_configuration_error(tmp_path: Path) -> None:
    """A store path that cannot be a database file fails at start, not on the first call."""
    with pytest.raises(ConfigurationError):
        kv.node(path=str(tmp_path))


# --------------------------------------------------------------------- sqlite


def test_sqlite_query_returns_rows_keyed_by_column(db_node: Node) -> None:
    """query returns the column names and one object per row."""
    result = call(db_node, "sqlite", "query", {"sql": "SELECT id, name FROM products WHERE id <= 2 ORDER BY id"})
    assert result == {
        "columns": ["id", "name"],
        "rows": [{"id": 1, "name": "keyboard"}, {"id": 2, "name": "mouse"}],
        "truncated": False,
    }


def test_sqlite_binds_positional_and_named_params(db_node: Node) -> None:
    """params fill `?` placeholders from an array and `:name` ones from an object."""
    by_position = call(db_node, "sqlite", "query", {"sql": "SELECT name FROM products WHERE id = ?", "params": [3]})
    assert by_position["rows"] == [{"name": "monitor"}]
    by_name = call(
        db_node, "sqlite", "query",
        {"sql": "SELECT count(*) AS n FROM orders WHERE quantity >= :q", "params": {"q": 3}},
    )
    assert by_name["rows"] == [{"n": 2}]


def test_sqlite_max_rows_truncates(db_node: Node) -> None:
    """max_rows caps the rows and `truncated` says more were there."""
    result = call(db_node, "sqlite", "query", {"sql": "SELECT id FROM orders ORDER BY id", "max_rows": 3})
    assert result["rows"] == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert result["truncated"] is True
    exact = call(db_node, "sqlite", "query", {"sql": "SELECT id FROM orders", "max_rows": len(sample.ORDERS)})
    assert exact["truncated"] is False


def test_sqlite_repeated_column_names_keep_every_value(db_node: Node) -> None:
    """A join with two `id` columns numbers the second instead of dropping it."""
    result = call(
        db_node, "sqlite", "query",
        {"sql": "SELECT p.id, o.id FROM products p JOIN orders o ON o.product_id = p.id WHERE o.id = 4"},
    )
    assert result["columns"] == ["id", "id:2"]
    assert result["rows"] == [{"id": 2, "id:2": 4}]
    clash = call(db_node, "sqlite", "query", {"sql": 'SELECT 1 AS id, 2 AS id, 3 AS "id:2"'})
    assert clash["rows"] == [{"id": 1, "id:2": 2, "id:2:2": 3}]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO products (id, name, price) VALUES (99, 'x', 1)",
        "REPLACE INTO products (id, name, price) VALUES (1, 'x', 1)",
        "UPDATE products SET price = 0",
        "DELETE FROM orders",
        "WITH doomed AS (SELECT 1) DELETE FROM orders",
        "DROP TABLE orders",
        "CREATE TABLE t (x)",
        "CREATE TEMP TABLE t (x)",
        "CREATE INDEX i ON orders (quantity)",
        "ALTER TABLE products ADD COLUMN colour TEXT",
        "ATTACH DATABASE ':memory:' AS other",
        "PRAGMA user_version = 7",
        "PRAGMA query_only = OFF",
        "PRAGMA journal_mode = WAL",
        "BEGIN",
        "VACUUM",
        "ANALYZE",
        "SELECT load_extension('x')",
    ],
)
def test_sqlite_refuses_every_kind_of_write(db_node: Node, sample_dir: Path, sql: str) -> None:
    """Writes, schema changes, ATTACH and setting PRAGMAs are AccessDenied; the file is untouched."""
    database = sample_dir / "sample.db"
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    with pytest.raises(AccessDeniedError) as refused:
        call(db_node, "sqlite", "query", {"sql": sql})
    assert refused.value.details["field"] == "sql"
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before
    after = call(db_node, "sqlite", "query", {"sql": "SELECT count(*) AS n FROM orders"})
    assert after["rows"] == [{"n": len(sample.ORDERS)}]  # the connection still serves reads


def test_sqlite_allows_schema_pragmas(db_node: Node) -> None:
    """PRAGMA table_info reads the schema, so it is allowed."""
    result = call(db_node, "sqlite", "query", {"sql": "PRAGMA table_info(products)"})
    assert [row["name"] for row in result["rows"]] == ["id", "name", "price"]


def test_sqlite_syntax_error_is_validation_failed(db_node: Node) -> None:
    """Bad SQL is ValidationFailed on `sql` with SQLite's own message."""
    with pytest.raises(ValidationFailedError) as bad:
        call(db_node, "sqlite", "query", {"sql": "SELEC * FROM products"})
    assert bad.value.details["field"] == "sql"
    assert "syntax error" in bad.value.message
    with pytest.raises(ValidationFailedError) as unknown:
        call(db_node, "sqlite", "query", {"sql": "SELECT * FROM nowhere"})
    assert "no such table" in unknown.value.message


def test_sqlite_refuses_two_statements(db_node: Node) -> None:
    """Only one statement runs per query; a second one is refused, not silently dropped."""
    with pytest.raises(ValidationFailedError) as two:
        call(db_node, "sqlite", "query", {"sql": "SELECT 1; DELETE FROM orders"})
    assert two.value.details["field"] == "sql"
    assert call(db_node, "sqlite", "query", {"sql": "SELECT count(*) AS n FROM orders"})["rows"] == [
        {"n": len(sample.ORDERS)}
    ]


def test_sqlite_wrong_params_point_at_params(db_node: Node) -> None:
    """A wrong number of values, or a non-scalar one, is ValidationFailed on `params`."""
    with pytest.raises(ValidationFailedError) as count:
        call(db_node, "sqlite", "query", {"sql": "SELECT ? + ?", "params": [1]})
    assert count.value.details["field"] == "params"
    with pytest.raises(ValidationFailedError) as unnamed:
        call(db_node, "sqlite", "query", {"sql": "SELECT ?", "params": {"x": 1}})
    assert unnamed.value.details["field"] == "params"
    with pytest.raises(ValidationFailedError) as nested:
        call(db_node, "sqlite", "query", {"sql": "SELECT ?", "params": [[1]]})
    assert nested.value.details["field"].startswith("params")


def test_sqlite_tables_lists_tables_with_columns(db_node: Node) -> None:
    """tables lists every table with its column names and declared types."""
    assert call(db_node, "sqlite", "tables", {}) == {
        "tables": [
            {
                "name": "orders",
                "type": "table",
                "columns": [
                    {"name": "id", "type": "INTEGER"},
                    {"name": "product_id", "type": "INTEGER"},
                    {"name": "quantity", "type": "INTEGER"},
                ],
            },
            {
                "name": "products",
                "type": "table",
                "columns": [
                    {"name": "id", "type": "INTEGER"},
                    {"name": "name", "type": "TEXT"},
                    {"name": "price", "type": "REAL"},
                ],
            },
        ]
    }


def test_sqlite_runaway_query_is_interrupted(sample_dir: Path) -> None:
    """A query past the node's timeout stops with ValidationFailed instead of holding a worker."""
    n = sqlite_node.node(database=str(sample_dir / "sample.db"), timeout=0.2)
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    started = time.monotonic()
    with pytest.raises(ValidationFailedError) as slow:
        call(n, "sqlite", "query", {"sql": endless})
    assert time.monotonic() - started < 5
    assert slow.value.details == {"field": "sql", "limit_seconds": 0.2}
    assert call(n, "sqlite", "query", {"sql": "SELECT 1 AS one"})["rows"] == [{"one": 1}]


def test_sqlite_serves_queries_from_many_worker_threads(db_node: Node) -> None:
    """Queries on several worker threads at once each get their own connection and answer."""
    def count(i: int) -> int:
        return call(db_node, "sqlite", "query", {"sql": "SELECT ? + count(*) AS n FROM orders", "params": [i]})[
            "rows"
        ][0]["n"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(count, range(32))) == [i + len(sample.ORDERS) for i in range(32)]


def test_sqlite_missing_or_bogus_database_is_a_configuration_error(tmp_path: Path) -> None:
    """A missing file, or one that is not SQLite, fails at start with ConfigurationError."""
    with pytest.raises(ConfigurationError, match="does not exist"):
        sqlite_node.node(database=str(tmp_path / "missing.db"))
    bogus = tmp_path / "bogus.db"
    bogus.write_text("this is not a database, just text long enough to have a header" * 4)
    with pytest.raises(ConfigurationError, match="cannot read"):
        sqlite_node.node(database=str(bogus))
    with pytest.raises(ConfigurationError):
        sqlite_node.node(database=str(bogus), timeout=0)


# ------------------------------------------------------------------------- fs


def test_fs_list_root_sorted_without_links_out_of_root(fs_node: Node) -> None:
    """list gives sorted entries with type and size, leaving out symlinks that leave the root."""
    result = call(fs_node, "fs", "list", {})
    assert result == {
        "path": ".",
        "entries": [
            {"name": "a.txt", "type": "file", "size": len("alpha\nthe needle is here\nomega\n")},
            {"name": "binary.bin", "type": "file", "size": len(b"\x00\x01needle\x00")},
            {"name": "inner_link", "type": "file", "size": len("# B\nno match\nneedle again\n")},
            {"name": "sub", "type": "dir", "size": None},
        ],
        "truncated": False,
    }


def test_fs_list_subdirectory_with_pattern(fs_node: Node) -> None:
    """list takes a relative directory and an optional glob on names."""
    result = call(fs_node, "fs", "list", {"path": "sub", "pattern": "*.md"})
    assert result["path"] == "sub"
    assert [e["name"] for e in result["entries"]] == ["b.md"]
    assert [e["name"] for e in call(fs_node, "fs", "list", {"path": "sub/"})["entries"]] == ["b.md", "deep"]


def test_fs_read_returns_text_and_size(fs_node: Node) -> None:
    """read returns the whole text of a small file with its size and path."""
    assert call(fs_node, "fs", "read", {"path": "sub/b.md"}) == {
        "path": "sub/b.md",
        "text": "# B\nno match\nneedle again\n",
        "size": 26,
        "truncated": False,
    }


def test_fs_read_truncates_without_splitting_a_character(fs_node: Node, root: Path) -> None:
    """max_bytes cuts the text, drops a half character at the cut and says truncated."""
    (root / "u.txt").write_text("aé" * 10, encoding="utf-8")  # é is two bytes
    result = call(fs_node, "fs", "read", {"path": "u.txt", "max_bytes": 5})
    assert result == {"path": "u.txt", "text": "aéa", "size": 30, "truncated": True}
    cut = call(fs_node, "fs", "read", {"path": "u.txt", "max_bytes": 2})
    assert cut["text"] == "a" and cut["truncated"] is True


def test_fs_read_replaces_invalid_utf8(fs_node: Node, root: Path) -> None:
    """Bytes that are not UTF-8 come back as U+FFFD instead of failing the read."""
    (root / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert call(fs_node, "fs", "read", {"path": "latin1.txt"})["text"] == "caf\ufffd\n"


def test_fs_refuses_dotdot_escape(fs_node: Node) -> None:
    """A `..` path that leaves the root is AccessDenied for list, read and search."""
    with pytest.raises(AccessDeniedError):
        call(fs_node, "fs", "read", {"path": "../outside/secret.txt"})
    with pytest.raises(AccessDeniedError):
        call(fs_node, "fs", "list", {"path": "sub/../.."})
    with pytest.raises(AccessDeniedError):
        call(fs_node, "fs", "search", {"text": "needle", "path": ".."})


def test_fs_allows_dotdot_that_stays_inside(fs_node: Node) -> None:
    """A `..` that ends inside the root is fine and reported by its real relative path."""
    assert call(fs_node, "fs", "read", {"path": "sub/../a.txt"})["path"] == "a.txt"


def test_fs_refuses_absolute_paths(fs_node: Node, root: Path) -> None:
    """Absolute paths are refused even when they point inside the root."""
    with pytest.raises(AccessDeniedError):
        call(fs_node, "fs", "read", {"path": "/etc/passwd"})
    with pytest.raises(AccessDeniedError) as inside:
        call(fs_node, "fs", "read", {"path": str(root / "a.txt")})
    assert inside.value.details["field"] == "path"


def test_fs_refuses_symlinks_out_of_the_root(fs_node: Node) -> None:
    """A symlink to a file or directory outside the root cannot be read or listed."""
    with pytest.raises(AccessDeniedError):
        call(fs_node, "fs", "read", {"path": "escape"})
    with pytest.raises(AccessDeniedError):
        call(fs_node, "fs", "list", {"path": "escape_dir"})
    with pytest.raises(AccessDeniedError):
        call(fs_node, "fs", "read", {"path": "escape_dir/secret.txt"})


def test_fs_search_finds_lines_inside_the_root_only(fs_node: Node) -> None:
    """search finds the text with path and line number, skipping binary files and links out."""
    assert call(fs_node, "fs", "search", {"text": "needle"}) == {
        "matches": [
            {"path": "a.txt", "line": 2, "text": "the needle is here"},
            {"path": "inner_link", "line": 3, "text": "needle again"},
            {"path": "sub/b.md", "line": 3, "text": "needle again"},
            {"path": "sub/deep/c.txt", "line": 1, "text": "needle deep down"},
        ],
        "truncated": False,
    }


def test_fs_search_is_case_sensitive_and_scoped(fs_node: Node) -> None:
    """search matches case exactly and looks only under the given directory or file."""
    assert call(fs_node, "fs", "search", {"text": "NEEDLE"})["matches"] == []
    scoped = call(fs_node, "fs", "search", {"text": "needle", "path": "sub/deep"})
    assert [m["path"] for m in scoped["matches"]] == ["sub/deep/c.txt"]
    one_file = call(fs_node, "fs", "search", {"text": "needle", "path": "a.txt"})
    assert [m["line"] for m in one_file["matches"]] == [2]


def test_fs_search_max_results_says_truncated(fs_node: Node) -> None:
    """search stops at max_results and says more matches exist."""
    result = call(fs_node, "fs", "search", {"text": "needle", "max_results": 2})
    assert [m["path"] for m in result["matches"]] == ["a.txt", "inner_link"]
    assert result["truncated"] is True


def test_fs_search_shows_the_match_in_a_long_line(fs_node: Node, root: Path) -> None:
    """A match far into a very long line is inside the excerpt returned."""
    (root / "long.txt").write_text("x" * 5000 + "needle" + "y" * 5000)
    match = call(fs_node, "fs", "search", {"text": "needle", "path": "long.txt"})["matches"][0]
    assert "needle" in match["text"] and len(match["text"]) == fs.MAX_LINE_CHARS


def test_fs_missing_paths_and_wrong_kinds_are_validation_failed(fs_node: Node, root: Path) -> None:
    """Missing paths, reading a directory, listing a file and reading a FIFO name the path."""
    os.mkfifo(root / "pipe")
    cases = [
        ("read", {"path": "nope.txt"}),
        ("list", {"path": "nope"}),
        ("search", {"text": "x", "path": "nope"}),
        ("read", {"path": "sub"}),
        ("list", {"path": "a.txt"}),
        ("read", {"path": "pipe"}),  # would block forever if opened blindly
    ]
    for action, payload in cases:
        with pytest.raises(ValidationFailedError) as bad:
            call(fs_node, "fs", action, payload)
        assert bad.value.details["field"] == "path", (action, payload)


def test_fs_missing_root_is_a_configuration_error(tmp_path: Path) -> None:
    """A root that does not exist fails at start with ConfigurationError."""
    with pytest.raises(ConfigurationError):
        fs.node(root=str(tmp_path / "missing"))


# --------------------------------------------------------------------- sample


def test_sample_script_is_idempotent_and_feeds_the_nodes(tmp_path: Path) -> None:
    """`python -m mesh.nodes.sample DIR` twice succeeds, duplicates nothing, and the nodes can use it."""
    target = tmp_path / "var"
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "mesh.nodes.sample", str(target)],
            capture_output=True, text=True, timeout=30, cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("\n") == 1 and done.stdout.startswith("prepared ")
    with sqlite3.connect(target / "sample.db") as conn:
        assert conn.execute("SELECT count(*) FROM products").fetchone()[0] == len(sample.PRODUCTS)
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == len(sample.ORDERS)
    db = sqlite_node.node(database=str(target / "sample.db"))
    assert call(db, "sqlite", "query", {"sql": "SELECT name FROM products WHERE id = 1"})["rows"] == [
        {"name": "keyboard"}
    ]
    files = fs.node(root=str(target / "files"))
    found = call(files, "fs", "search", {"text": "mesh"})["matches"]
    assert {m["path"] for m in found} == {"README.txt", "notes/todo.md"}


def test_kv_incr_loses_no_update_under_concurrent_writers(tmp_path: Path) -> None:
    """Invariant: n acknowledged increments of one key leave it at n, and no two callers
    see the same value, with eight threads (each its own SQLite connection) and two node
    instances on one file, as replicas of a topology share it."""
    path = str(tmp_path / "kv.sqlite3")
    nodes = [kv.node(path=path), kv.node(path=path)]

    def bump(i: int) -> int:
        return call(nodes[i % 2], "kv", "incr", {"key": "shared", "by": 1})["value"]

    with ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(bump, range(2000)))
    assert sorted(seen) == list(range(1, 2001))
    assert call(nodes[0], "kv", "get", {"key": "shared"})["value"] == 2000
