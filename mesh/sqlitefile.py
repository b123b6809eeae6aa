"""Opening SQLite files that several processes may create at the same moment.

SQLite answers the switch to WAL with `SQLITE_BUSY` at once, without calling its busy
handler, while another connection makes the same switch; brokers of one cluster share
their revocation store and replicas of a kv node share their file, and they start
together. Every WAL switch in the tree goes through `switch_to_wal`.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Final

RETRY_S: Final = 0.01
_LOCKED: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def switch_to_wal(conn: sqlite3.Connection, *, wait_s: float) -> None:
    """Put `conn`'s database in WAL mode, trying again while another process holds it.

    Args:
        conn: an open connection outside any transaction.
        wait_s: how long to keep trying, as long as a busy write would wait.

    Raises:
        sqlite3.Error: the file is not a usable database, or stayed locked for `wait_s`.
    """
    give_up = time.monotonic() + wait_s
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code not in _LOCKED or time.monotonic() >= give_up:
                raise
            time.sleep(RETRY_S)
