"""`python -m mesh.nodes.sample DIR`: the quickstart's sample data for the sqlite and fs nodes.

Writes DIR/sample.db (a small shop: `products` and `orders`) and DIR/files/ (a README
and notes that mention "mesh"), which are the default `database` and `root` of those
nodes when DIR is `var`. Every run writes the same rows under the same ids and the same
file contents, so running it again never fails and never duplicates anything. The
database keeps SQLite's default rollback journal: a WAL file could not be opened by the
read-only sqlite node from a directory it cannot write.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Final

__all__ = ["prepare", "main", "PRODUCTS", "ORDERS", "FILES"]

PRODUCTS: Final = [
    (1, "keyboard", 49.0),
    (2, "mouse", 19.5),
    (3, "monitor", 219.0),
    (4, "usb cable", 4.25),
    (5, "laptop stand", 35.0),
]
ORDERS: Final = [
    (1, 1, 2),
    (2, 2, 1),
    (3, 3, 1),
    (4, 2, 3),
    (5, 4, 10),
    (6, 5, 1),
    (7, 1, 1),
]
FILES: Final = {
    "README.txt": (
        "Sample files for the fs node of the mesh quickstart.\n"
        "Try fs.list, fs.read on notes/todo.md, or fs.search for the word mesh.\n"
    ),
    "notes/todo.md": (
        "# To do\n\n"
        "- start the mesh with `mesh up topologies/quickstart.toml`\n"
        "- ask the sqlite node which product sells best\n"
        "- store a greeting in the kv node\n"
    ),
    "notes/ideas.md": "# Ideas\n\n- a weather node\n- a calendar node\n",
}

_TABLES: Final = (
    "CREATE TABLE IF NOT EXISTS products ("
    " id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS orders ("
    " id INTEGER PRIMARY KEY,"
    " product_id INTEGER NOT NULL REFERENCES products (id),"
    " quantity INTEGER NOT NULL)",
)


def prepare(directory: Path) -> str:
    """Create or refresh the sample data under `directory`.

    Args:
        directory: created when missing; gets `sample.db` and `files/`.

    Returns:
        One line saying what was prepared.
    """
    directory.mkdir(parents=True, exist_ok=True)
    database = directory / "sample.db"
    with closing(sqlite3.connect(database)) as conn, conn:
        for ddl in _TABLES:
            conn.execute(ddl)
        conn.executemany("INSERT OR REPLACE INTO products (id, name, price) VALUES (?, ?, ?)", PRODUCTS)
        conn.executemany("INSERT OR REPLACE INTO orders (id, product_id, quantity) VALUES (?, ?, ?)", ORDERS)
    files = directory / "files"
    for name, text in FILES.items():
        path = files / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return (
        f"prepared {database} ({len(PRODUCTS)} products, {len(ORDERS)} orders)"
        f" and {len(FILES)} files under {files}"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse `DIR`, prepare it and print what was done."""
    parser = argparse.ArgumentParser(prog="python -m mesh.nodes.sample", description=__doc__.splitlines()[0])
    parser.add_argument("directory", metavar="DIR", type=Path, help="where to put sample.db and files/")
    args = parser.parse_args(argv)
    try:
        print(prepare(args.directory))
    except (OSError, sqlite3.Error) as exc:
        print(f"cannot prepare {args.directory}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
