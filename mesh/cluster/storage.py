"""Durable state of one consensus node, in one SQLite file.

Rules of this module:

* What the core's `Ready` asks to persist is written in one transaction (`persist`),
  so a crash leaves either all of it or none. The database runs in WAL mode with
  `synchronous=FULL`: a commit returns only after the log is on disk, which is what
  lets the application send votes and acknowledgements right after `persist`. One
  exception, as etcd's raft makes it: a transaction that only moves the commit index
  (no entry, no snapshot, the same term and vote) is written without waiting for the
  disk. Raft needs no durable commit index (a restarted node learns it again from the
  leader), and WAL keeps transactions in order, so a crash can only lose such a write
  together with everything after it, never leave a commit index past the stored log.
* Every row carries a CRC-32 of its contents, and the file records its schema version
  and the id of its cluster. `open()` checks all of it, and the log's shape (no gap
  after the snapshot, terms never going backwards, the commit index inside the log,
  the term at least the log's last term). Anything wrong raises `CorruptStateError`
  naming the file and the problem: a broker must not rejoin a cluster with a state it
  cannot trust.
* A file that exists is never silently re-created, even when empty or truncated.
* sqlite3 errors never escape: opening maps them to CorruptStateError, writing to
  InternalError (the disk failed under a running node).
"""

from __future__ import annotations

import sqlite3
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from ..protocol.errors import CorruptStateError, InternalError
from ..sqlitefile import switch_to_wal
from .messages import Entry, EntryKind, HardState, Snapshot
from .raft import PersistedState, Ready

__all__ = ["SCHEMA_VERSION", "RaftStorage"]

SCHEMA_VERSION: Final = 1
# One broker owns this file; the WAL switch still waits out any other opener (mesh.sqlitefile).
OPEN_WAIT_S: Final = 10.0

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE hard_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL, vote TEXT, commit_index INTEGER NOT NULL, checksum INTEGER NOT NULL);
CREATE TABLE snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    idx INTEGER NOT NULL, term INTEGER NOT NULL, data BLOB NOT NULL, checksum INTEGER NOT NULL);
CREATE TABLE entries (
    idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, kind INTEGER NOT NULL,
    data BLOB NOT NULL, checksum INTEGER NOT NULL);
"""


def _crc(*parts: int | bytes | str | None) -> int:
    """CRC-32 over an unambiguous encoding of the parts (length-prefixed bytes)."""
    crc = 0
    for part in parts:
        if part is None:
            chunk = b"\x00"
        elif isinstance(part, int):
            chunk = b"\x01" + struct.pack(">q", part)
        else:
            raw = part.encode() if isinstance(part, str) else part
            chunk = b"\x02" + struct.pack(">I", len(raw)) + raw
        crc = zlib.crc32(chunk, crc)
    return crc


class RaftStorage:
    """The hard state, log entries and snapshot of one node (use `RaftStorage.open`)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._term_vote: tuple[int, str | None] = (0, None)  # as stored: a change of either is synced

    @classmethod
    def open(cls, path: str | Path, cluster_id: str) -> RaftStorage:
        """Open (or create, if missing) the state file of a node of `cluster_id`.

        Raises:
            CorruptStateError: the file is not a database, is not a mesh cluster state of
                this schema version and cluster, or fails an integrity check.
        """
        path = Path(path)
        existed = path.exists()
        try:
            conn = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise _corrupt(path, f"cannot be opened ({exc})") from None
        storage = cls(conn, path)
        try:
            switch_to_wal(conn, wait_s=OPEN_WAIT_S)
            conn.execute("PRAGMA synchronous=FULL")
            if not existed:
                storage._create(cluster_id)
            storage._verify(cluster_id)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _corrupt(path, f"not a readable SQLite database ({exc})") from None
        except CorruptStateError:
            conn.close()
            raise
        return storage

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RaftStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def persist(self, rd: Ready) -> bool:
        """Write what a Ready asks for (snapshot, entries, hard state) in one transaction.

        Returns:
            Whether the transaction waited for the disk (fsync): always, unless it only
            moved the commit index (see the module rules) or there was nothing to write.
        """
        hs = rd.hard_state
        if rd.snapshot is None and not rd.entries and hs is None:
            return False  # most Readies only carry messages: no transaction, no fsync
        sync = rd.snapshot is not None or bool(rd.entries) or (hs is not None and (hs.term, hs.vote) != self._term_vote)
        with self._transaction(sync=sync):
            if rd.snapshot is not None:
                self._write_snapshot(rd.snapshot)
                self._conn.execute("DELETE FROM entries")
            if rd.entries:
                self._append(rd.entries)
            if hs is not None:
                self._write_hard_state(hs)
        if hs is not None:
            self._term_vote = (hs.term, hs.vote)
        return sync

    def append(self, entries: Sequence[Entry]) -> None:
        """Store entries, first dropping every stored entry from `entries[0].index` on.

        Raises:
            ValueError: the entries are not consecutive or would leave a gap in the log.
        """
        with self._transaction():
            self._append(entries)

    def set_hard_state(self, hard_state: HardState) -> None:
        """Store the term, vote and commit index."""
        with self._transaction():
            self._write_hard_state(hard_state)
        self._term_vote = (hard_state.term, hard_state.vote)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store the application's snapshot and drop the entries it covers (compaction).

        Raises:
            ValueError: the snapshot is older than the one stored.
        """
        with self._transaction():
            current = self._conn.execute("SELECT idx FROM snapshot").fetchone()
            if current is not None and snapshot.index < current[0]:
                raise ValueError(f"snapshot at {snapshot.index} is older than the stored one at {current[0]}")
            self._write_snapshot(snapshot)
            self._conn.execute("DELETE FROM entries WHERE idx <= ?", (snapshot.index,))

    # ------------------------------------------------------------------ reading

    def load(self) -> PersistedState:
        """Everything a restarting node needs (checked when the file was opened)."""
        hard = self._conn.execute("SELECT term, vote, commit_index FROM hard_state").fetchone()
        snap = self._conn.execute("SELECT idx, term, data FROM snapshot").fetchone()
        rows = self._conn.execute("SELECT idx, term, kind, data FROM entries ORDER BY idx").fetchall()
        return PersistedState(
            hard_state=HardState(*hard) if hard else HardState(),
            snapshot=Snapshot(*snap) if snap else Snapshot(),
            entries=tuple(Entry(i, t, d, EntryKind(k)) for i, t, k, d in rows),
        )

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _transaction(self, *, sync: bool = True) -> Iterator[None]:
        try:
            if not sync:
                self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: written in order, synced later
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if not sync:
                    self._conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise InternalError(
                f"cluster state {self.path} could not be written ({type(exc).__name__})",
                details={"path": str(self.path)},
            ) from None

    def _append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        first = entries[0].index
        if any(e.index != first + i for i, e in enumerate(entries)):
            raise ValueError("entries must have consecutive indexes")
        snap_index = self._conn.execute("SELECT coalesce(max(idx), 0) FROM snapshot").fetchone()[0]
        last = self._conn.execute("SELECT coalesce(max(idx), ?) FROM entries", (snap_index,)).fetchone()[0]
        if not snap_index < first <= last + 1:
            raise ValueError(f"entries from {first} would leave a gap after {last} (snapshot at {snap_index})")
        self._conn.execute("DELETE FROM entries WHERE idx >= ?", (first,))
        self._conn.executemany(
            "INSERT INTO entries (idx, term, kind, data, checksum) VALUES (?, ?, ?, ?, ?)",
            [(e.index, e.term, int(e.kind), e.data, _crc(e.index, e.term, int(e.kind), e.data)) for e in entries],
        )

    def _write_hard_state(self, hs: HardState) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO hard_state (id, term, vote, commit_index, checksum) VALUES (1, ?, ?, ?, ?)",
            (hs.term, hs.vote, hs.commit, _crc(hs.term, hs.vote, hs.commit)),
        )

    def _write_snapshot(self, snap: Snapshot) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO snapshot (id, idx, term, data, checksum) VALUES (1, ?, ?, ?, ?)",
            (snap.index, snap.term, snap.data, _crc(snap.index, snap.term, snap.data)),
        )

    def _create(self, cluster_id: str) -> None:
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("cluster_id", cluster_id)],
            )

    def _verify(self, cluster_id: str) -> None:
        """Every integrity check of the module rules; raises CorruptStateError at the first failure."""
        conn, path = self._conn, self.path
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _corrupt(path, f"SQLite's integrity check failed ({check})")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "hard_state", "snapshot", "entries"} <= tables:
            raise _corrupt(path, "not a mesh cluster state (tables missing)")
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise _corrupt(path, f"schema version is {meta.get('schema_version')!r}, expected '{SCHEMA_VERSION}'")
        if meta.get("cluster_id") != cluster_id:
            raise _corrupt(path, f"cluster id is {meta.get('cluster_id')!r}, expected {cluster_id!r}")

        hard = HardState()
        row = conn.execute("SELECT term, vote, commit_index, checksum FROM hard_state").fetchone()
        if row is not None:
            if _crc(*row[:3]) != row[3]:
                raise _corrupt(path, "hard state (term, vote, commit) has a bad checksum")
            hard = HardState(*row[:3])
            self._term_vote = (hard.term, hard.vote)
        snap = Snapshot()
        row = conn.execute("SELECT idx, term, data, checksum FROM snapshot").fetchone()
        if row is not None:
            if _crc(*row[:3]) != row[3]:
                raise _corrupt(path, f"snapshot at index {row[0]} has a bad checksum")
            snap = Snapshot(*row[:3])

        expected, last_term = snap.index + 1, snap.term
        for idx, term, kind, data, checksum in conn.execute("SELECT * FROM entries ORDER BY idx"):
            if idx < expected:
                raise _corrupt(path, f"entry {idx} lies inside the snapshot, which ends at {snap.index}")
            if idx > expected:
                raise _corrupt(path, f"log has a gap: entries {expected} to {idx - 1} are missing")
            if _crc(idx, term, kind, data) != checksum:
                raise _corrupt(path, f"entry {idx} has a bad checksum")
            if term < last_term:
                raise _corrupt(path, f"entry {idx} has term {term}, before the term {last_term} preceding it")
            if kind not in EntryKind._value2member_map_:
                raise _corrupt(path, f"entry {idx} has unknown kind {kind}")
            expected, last_term = idx + 1, term
        last_index = expected - 1
        if hard.commit > last_index:
            raise _corrupt(path, f"commit index {hard.commit} is past the last log index {last_index}")
        if hard.term < last_term:
            raise _corrupt(path, f"current term {hard.term} is before the log's last term {last_term}")


def _corrupt(path: Path, problem: str) -> CorruptStateError:
    return CorruptStateError(f"cluster state {path}: {problem}", details={"path": str(path), "problem": problem})
