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
* A compaction's snapshot is packed and written by a thread of its own
  (`begin_snapshot`), in chunks of `SNAPSHOT_CHUNK_BYTES`, one short transaction each,
  then made current in one small transaction. A snapshot of the whole shared state runs
  to tens of megabytes; written in the loop's thread in one transaction it stalled every
  broker for up to 0.6 s at once and started elections. The loop's own transactions
  wait at most one chunk. The entries it covers and the snapshot it replaced are
  dropped after, in short transactions as well; until they are, and after a crash in
  between, they are ignored (entries at or below the snapshot's index are never read). An installed snapshot (from the leader) is written in the loop's
  thread, inside the Ready's transaction, as before; a background snapshot older than
  the current one is discarded, never made current.
* The WAL is copied into the database file by a thread of its own every `CHECKPOINT_S`
  (a passive checkpoint, which blocks no writer), never inside a commit of the loop.
* A file that exists is never silently re-created, even when empty or truncated. A file
  of schema version 1 (snapshots in one row) is upgraded in place on open.
* sqlite3 errors never escape: opening maps them to CorruptStateError, writing to
  InternalError (the disk failed under a running node).
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from ..protocol.errors import CorruptStateError, InternalError
from ..sqlitefile import switch_to_wal
from .messages import Entry, EntryKind, HardState, Snapshot
from .raft import PersistedState, Ready

__all__ = ["SCHEMA_VERSION", "RaftStorage"]

log = logging.getLogger("mesh.cluster")

SCHEMA_VERSION: Final = 2
SNAPSHOT_CHUNK_BYTES: Final = 1 << 20  # a background snapshot's transactions hold the file this long at most
ENTRIES_DROPPED_AT_ONCE: Final = 1_000  # and so do those dropping the entries it covers
CHECKPOINT_S: Final = 0.25  # how often the WAL is copied into the database file, in the background
# One broker owns this file; the WAL switch still waits out any other opener (mesh.sqlitefile).
OPEN_WAIT_S: Final = 10.0

_CHUNKS_TABLE: Final = """CREATE TABLE snapshot_chunks (
    idx INTEGER NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (idx, seq))"""
_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE hard_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL, vote TEXT, commit_index INTEGER NOT NULL, checksum INTEGER NOT NULL);
CREATE TABLE snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    idx INTEGER NOT NULL, term INTEGER NOT NULL, data BLOB NOT NULL, checksum INTEGER NOT NULL,
    chunked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE entries (
    idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, kind INTEGER NOT NULL,
    data BLOB NOT NULL, checksum INTEGER NOT NULL);
""" + _CHUNKS_TABLE
# Version 1 had the snapshot's bytes in its row only.
_UPGRADE_FROM_1: Final = f"""
ALTER TABLE snapshot ADD COLUMN chunked INTEGER NOT NULL DEFAULT 0;
{_CHUNKS_TABLE};
UPDATE meta SET value = '2' WHERE key = 'schema_version'
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
            chunk = b"\x02" + struct.pack(">I", len(raw))
            crc = zlib.crc32(raw, zlib.crc32(chunk, crc))  # no copy of a large snapshot
            continue
        crc = zlib.crc32(chunk, crc)
    return crc


class RaftStorage:
    """The hard state, log entries and snapshot of one node (use `RaftStorage.open`)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._term_vote: tuple[int, str | None] = (0, None)  # as stored: a change of either is synced
        self._writer: _SnapshotWriter | None = None
        self._lock = threading.Lock()  # one transaction at a time with the snapshot's writer
        self._checkpointer: _Checkpointer | None = None

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
            conn.execute("PRAGMA wal_autocheckpoint=0")  # _Checkpointer's work, outside the loop
            if not existed:
                storage._create(cluster_id)
            storage._verify(cluster_id)
            storage._checkpointer = _Checkpointer(path)
            storage._checkpointer.start()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _corrupt(path, f"not a readable SQLite database ({exc})") from None
        except CorruptStateError:
            conn.close()
            raise
        return storage

    def close(self) -> None:
        """Wait for a snapshot being written, then close the file."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
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

    def begin_snapshot(self, index: int, term: int, produce: Callable[[], bytes]) -> None:
        """Start storing a compaction's snapshot at `index` in the background: `produce()`
        gives its bytes, called in the writer's thread; `finish_snapshot` says when done.

        Raises:
            ValueError: the snapshot is not past the one stored.
            RuntimeError: the previous one is still being written.
            InternalError: the file could not be read.
        """
        if self._writer is not None:
            raise RuntimeError("a snapshot is still being written")
        try:
            current = self._conn.execute("SELECT idx FROM snapshot").fetchone()
        except sqlite3.Error as exc:
            raise InternalError(f"cluster state {self.path} could not be read ({exc})", details={"path": str(self.path)}) from None
        if current is not None and index <= current[0]:
            raise ValueError(f"snapshot at {index} is not past the stored one at {current[0]}")
        writer = _SnapshotWriter(self.path, index, term, produce, self._lock)
        writer.start()
        self._writer = writer

    @property
    def writing_snapshot(self) -> bool:
        """Whether a snapshot begun is not yet collected by `finish_snapshot`."""
        return self._writer is not None

    def finish_snapshot(self, *, wait: bool = False) -> Snapshot | None:
        """The snapshot `begin_snapshot` stored, once it is current; None while it is
        being written (`writing_snapshot`), when none was begun, or when a snapshot
        installed meanwhile was newer and it was discarded. With `wait`, wait for it.

        Raises:
            InternalError: it could not be made or written (the disk failed under a
                running node, or the state could not be packed).
        """
        writer = self._writer
        if writer is None or (writer.is_alive() and not wait):
            return None
        writer.join()
        self._writer = None
        if writer.error is not None:
            raise InternalError(
                f"cluster state {self.path}: the snapshot could not be written "
                f"({type(writer.error).__name__}: {writer.error})",
                details={"path": str(self.path)},
            )
        return writer.snapshot if writer.current else None

    # ------------------------------------------------------------------ reading

    def load(self) -> PersistedState:
        """Everything a restarting node needs (checked when the file was opened)."""
        hard = self._conn.execute("SELECT term, vote, commit_index FROM hard_state").fetchone()
        snapshot = self._read_snapshot()[0]
        rows = self._conn.execute(
            "SELECT idx, term, kind, data FROM entries WHERE idx > ? ORDER BY idx", (snapshot.index,)
        ).fetchall()  # those at or below it are a compaction's, not yet dropped
        return PersistedState(
            hard_state=HardState(*hard) if hard else HardState(),
            snapshot=snapshot,
            entries=tuple(Entry(i, t, d, EntryKind(k)) for i, t, k, d in rows),
        )

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _transaction(self, *, sync: bool = True) -> Iterator[None]:
        try:
            with self._lock:
                if not sync:
                    self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: written in order, synced later
                try:
                    with _immediate(self._conn):
                        yield
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
        last = max(snap_index, self._conn.execute("SELECT coalesce(max(idx), 0) FROM entries").fetchone()[0])
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
            "INSERT OR REPLACE INTO snapshot (id, idx, term, data, checksum, chunked) VALUES (1, ?, ?, ?, ?, 0)",
            (snap.index, snap.term, snap.data, _crc(snap.index, snap.term, snap.data)),
        )
        self._conn.execute("DELETE FROM snapshot_chunks")  # a background write's, now stale

    def _read_snapshot(self) -> tuple[Snapshot, int | None]:
        """The stored snapshot, and its stored checksum (None when there is none)."""
        row = self._conn.execute("SELECT idx, term, data, checksum, chunked FROM snapshot").fetchone()
        if row is None:
            return Snapshot(), None
        idx, term, data, checksum, chunked = row
        if chunked:
            chunks = self._conn.execute("SELECT data FROM snapshot_chunks WHERE idx = ? ORDER BY seq", (idx,))
            data = b"".join(chunk for (chunk,) in chunks)
        return Snapshot(idx, term, data), checksum

    def _upgrade(self) -> None:
        """Bring a checked file of schema version 1 to this one, in one transaction (an
        error is the caller's sqlite3 error: the file cannot be used)."""
        with _immediate(self._conn):
            for statement in _UPGRADE_FROM_1.split(";"):
                if statement.strip():
                    self._conn.execute(statement)

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
        if meta.get("cluster_id") != cluster_id:
            raise _corrupt(path, f"cluster id is {meta.get('cluster_id')!r}, expected {cluster_id!r}")
        if meta.get("schema_version") == "1":
            self._upgrade()
            meta["schema_version"], tables = str(SCHEMA_VERSION), tables | {"snapshot_chunks"}
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise _corrupt(path, f"schema version is {meta.get('schema_version')!r}, expected '{SCHEMA_VERSION}'")
        if "snapshot_chunks" not in tables:
            raise _corrupt(path, "not a mesh cluster state (tables missing)")

        hard = HardState()
        row = conn.execute("SELECT term, vote, commit_index, checksum FROM hard_state").fetchone()
        if row is not None:
            if _crc(*row[:3]) != row[3]:
                raise _corrupt(path, "hard state (term, vote, commit) has a bad checksum")
            hard = HardState(*row[:3])
            self._term_vote = (hard.term, hard.vote)
        snap, checksum = self._read_snapshot()
        if checksum is not None and _crc(snap.index, snap.term, snap.data) != checksum:
            raise _corrupt(path, f"snapshot at index {snap.index} has a bad checksum")

        expected, last_term = snap.index + 1, snap.term
        entries = conn.execute("SELECT * FROM entries WHERE idx > ? ORDER BY idx", (snap.index,))
        for idx, term, kind, data, checksum in entries:
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


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on `conn`: committed, or rolled back if the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _connect_existing(path: Path) -> sqlite3.Connection:
    """A background thread's own connection (mode=rw: never a new, empty file where the state file was)."""
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, isolation_level=None)


class _SnapshotWriter(threading.Thread):
    """Packs one snapshot (`produce`) and writes it through a connection of its own
    (sqlite3 lets go of the GIL while it writes), in chunks, then makes it current
    unless a newer one is.

    Each of its transactions holds `lock`, which the loop's transactions take too: SQLite's
    own busy wait backs off in growing sleeps and lost the file to this thread's next
    chunk again and again (waits of 35-140 ms), where the lock hands it over at once.
    """

    def __init__(self, path: Path, index: int, term: int, produce: Callable[[], bytes], lock: threading.Lock) -> None:
        super().__init__(name="raft-snapshot", daemon=True)
        self.path = path
        self.index, self.term, self.produce = index, term, produce
        self.lock = lock
        self.snapshot: Snapshot | None = None  # once produced
        self.current = False  # made the stored snapshot
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.snapshot = Snapshot(self.index, self.term, self.produce())
            conn = _connect_existing(self.path)
            try:
                self._write(conn, self.snapshot)
            finally:
                conn.close()
        except BaseException as exc:  # noqa: BLE001 - carried to the loop's thread by finish_snapshot
            self.error = exc

    def _write(self, conn: sqlite3.Connection, snap: Snapshot) -> None:
        checksum = _crc(snap.index, snap.term, snap.data)
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the _Checkpointer's work, not under the lock
        conn.execute("PRAGMA synchronous=NORMAL")  # the swap's fsync covers the chunks before it (WAL)
        self._step(conn, "DELETE FROM snapshot_chunks WHERE idx = ?", (snap.index,))  # a killed try's
        view = memoryview(snap.data)
        for seq, start in enumerate(range(0, len(view), SNAPSHOT_CHUNK_BYTES)):
            chunk = view[start : start + SNAPSHOT_CHUNK_BYTES]
            self._step(conn, "INSERT INTO snapshot_chunks (idx, seq, data) VALUES (?, ?, ?)", (snap.index, seq, chunk))
        conn.execute("PRAGMA synchronous=FULL")
        with self.lock, _immediate(conn):
            stored = conn.execute("SELECT idx FROM snapshot").fetchone()
            self.current = stored is None or stored[0] < snap.index  # else an installed snapshot overtook it
            if self.current:
                conn.execute(
                    "INSERT OR REPLACE INTO snapshot (id, idx, term, data, checksum, chunked) VALUES (1, ?, ?, ?, ?, 1)",
                    (snap.index, snap.term, b"", checksum),
                )
        # What it replaced goes in short transactions, not synced: a crash leaves it unread.
        conn.execute("PRAGMA synchronous=NORMAL")
        kept = snap.index if self.current else stored[0]
        for key in conn.execute("SELECT idx, seq FROM snapshot_chunks WHERE idx != ?", (kept,)).fetchall():
            self._step(conn, "DELETE FROM snapshot_chunks WHERE idx = ? AND seq = ?", key)
        drop = "DELETE FROM entries WHERE idx IN (SELECT idx FROM entries WHERE idx <= ? ORDER BY idx LIMIT ?)"
        while self._step(conn, drop, (kept, ENTRIES_DROPPED_AT_ONCE)):
            pass

    def _step(self, conn: sqlite3.Connection, sql: str, args: Sequence[object]) -> int:
        """One statement, its own transaction; the rows it changed."""
        with self.lock:
            changed = conn.execute(sql, args).rowcount
        time.sleep(0)  # let a loop waiting for the lock have it first
        return changed


class _Checkpointer(threading.Thread):
    """Copies what the WAL holds into the database file every `CHECKPOINT_S`
    (`wal_checkpoint(PASSIVE)`), through a connection of its own.

    SQLite otherwise checkpoints inside whichever commit takes the WAL past 1,000 pages:
    the loop's own (30-45 ms every second under exactly-once load here) or, holding the
    lock, the snapshot writer's. A passive checkpoint waits for no writer and no writer
    waits for it; one with nothing to copy costs next to nothing.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(name="raft-checkpoint", daemon=True)
        self.path = path
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            conn = _connect_existing(self.path)
        except sqlite3.Error as exc:
            log.warning("cluster state %s: no background checkpoints (%s)", self.path, exc)
            return
        try:
            while not self._stopping.wait(CHECKPOINT_S):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # the loop's next write says what is wrong with the disk
            log.warning("cluster state %s: background checkpoints stopped (%s)", self.path, exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def _corrupt(path: Path, problem: str) -> CorruptStateError:
    return CorruptStateError(f"cluster state {path}: {problem}", details={"path": str(path), "problem": problem})
