"""Revoked token ids (jti), persisted in SQLite so a revocation survives a restart.

Rules of this module:

* The whole set lives in memory too, loaded at open: `jti in revocations` is a set
  look-up on the verify hot path and never touches the database.
* A jti joins the in-memory set before it is written, so a failed write never leaves
  the process accepting a token it was asked to refuse.
* Durability by default: WAL mode with `synchronous=FULL`, so a revocation that
  `revoke()` returned from is on disk even after a power cut.
* One process owns the file; other brokers learn revocations from the replicated log,
  not by sharing this database.
* An entry outlives its token's `exp` by `grace` seconds (longer than any verifier's
  leeway) and is then dropped by `prune()`: an expired token is refused anyway.
* sqlite3 errors never leave this module: they become `ConfigurationError` at open and
  `InternalError` afterwards.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Final, Self

from ..protocol import ConfigurationError, InternalError
from ..sqlitefile import switch_to_wal

__all__ = ["DEFAULT_GRACE_S", "Revocations"]

DEFAULT_GRACE_S: Final = 60.0
# Brokers of one cluster open one store as they start together: wait out each other's locks.
OPEN_WAIT_S: Final = 10.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS revoked (
    jti TEXT PRIMARY KEY,
    expires REAL NOT NULL,
    revoked_at REAL NOT NULL
) WITHOUT ROWID
"""


@contextmanager
def _database_errors(action: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as error:
        raise InternalError(
            f"revocation store: cannot {action}", details={"reason": type(error).__name__}
        ) from None


class Revocations:
    """A persisted set of revoked jtis; usable wherever a `Container[str]` is.

    Args:
        path: the SQLite database file (created if missing).
        durable: fsync every revocation (`synchronous=FULL`); False trades the last
            revocations before a power cut for speed (`synchronous=NORMAL`).
        grace: seconds an entry is kept after its token's expiry (see `prune`).

    Raises:
        ConfigurationError: the database cannot be opened or is not a revocation store.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, durable: bool = True, grace: float = DEFAULT_GRACE_S
    ) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=OPEN_WAIT_S)
        except sqlite3.Error:
            raise ConfigurationError(
                "cannot open the revocation store", details={"path": os.fspath(path)}
            ) from None
        try:
            switch_to_wal(self._db, wait_s=OPEN_WAIT_S)
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.execute(_SCHEMA)
            self._revoked = {jti for (jti,) in self._db.execute("SELECT jti FROM revoked")}
        except sqlite3.Error:
            self._db.close()
            raise ConfigurationError(
                "not a usable revocation store", details={"path": os.fspath(path)}
            ) from None
        self._grace = grace

    def __contains__(self, jti: object) -> bool:
        return isinstance(jti, str) and jti in self._revoked

    def __len__(self) -> int:
        return len(self._revoked)

    def revoke(self, jti: str, expires: float, now: float) -> None:
        """Refuse the token `jti` from now on, here and after a restart.

        Revoking twice is harmless; the later expiry wins.

        Args:
            jti: the token id (`Identity.jti`).
            expires: the token's `exp`, after which the entry may be pruned.
            now: current time, recorded as when the revocation happened.

        Raises:
            InternalError: the store could not be written (the jti is refused in this
                process all the same).
        """
        self._revoked.add(jti)
        with _database_errors("record a revocation"):
            self._db.execute(
                "INSERT INTO revoked (jti, expires, revoked_at) VALUES (?, ?, ?) "
                "ON CONFLICT (jti) DO UPDATE SET expires = max(expires, excluded.expires)",
                (jti, expires, now),
            )

    def prune(self, now: float) -> int:
        """Forget revocations whose tokens expired more than `grace` seconds ago.

        Args:
            now: current time, seconds since the epoch.

        Returns:
            How many entries were dropped.

        Raises:
            InternalError: the store could not be written.
        """
        horizon = now - self._grace
        with _database_errors("prune revocations"):
            gone = [
                jti
                for (jti,) in self._db.execute(
                    "DELETE FROM revoked WHERE expires < ? RETURNING jti", (horizon,)
                ).fetchall()
            ]
        self._revoked.difference_update(gone)
        return len(gone)

    def close(self) -> None:
        """Close the database; the object must not be used afterwards."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
