"""The SQLite state file of a consensus node: what it keeps, how it is written, and every corruption it refuses."""

from __future__ import annotations

import random
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from mesh.cluster import Config, Entry, EntryKind, HardState, PersistedState, RaftNode, Ready, Role, Snapshot
from mesh.cluster.storage import SCHEMA_VERSION, SNAPSHOT_CHUNK_BYTES, RaftStorage, _crc, _SnapshotWriter
from mesh.protocol import CorruptStateError, ErrorCode, InternalError

CLUSTER = "test-cluster"
MARKER = b"MARKER-0123456789"


def _entries(first: int, last: int, term: int = 1) -> list[Entry]:
    return [Entry(i, term, b"data%d" % i) for i in range(first, last + 1)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "node.db"


def _filled(path: Path) -> None:
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=(*_entries(1, 2), Entry(3, 2, MARKER), Entry(4, 2, b"x")),
                         hard_state=HardState(2, "a", 3)))


def _sql(path: Path, statement: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(statement)
    conn.commit()
    conn.close()


def _open_corrupt(path: Path) -> CorruptStateError:
    with pytest.raises(CorruptStateError) as info:
        RaftStorage.open(path, CLUSTER)
    err = info.value
    assert str(path) in err.message and err.details["path"] == str(path)
    assert err.code == ErrorCode.CORRUPT_STATE and not err.retryable
    return err


def test_a_new_file_loads_as_the_empty_state(path: Path) -> None:
    """Opening a missing file creates it; a fresh node's state is empty."""
    with RaftStorage.open(path, CLUSTER) as st:
        assert st.load() == PersistedState()
    assert path.exists()


def test_the_file_runs_in_wal_mode_with_full_sync(path: Path) -> None:
    """Commits fsync: journal_mode is WAL and synchronous is FULL (2)."""
    with RaftStorage.open(path, CLUSTER) as st:
        assert st._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert st._conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_what_was_persisted_comes_back_after_reopening(path: Path) -> None:
    """Hard state, entries (with kinds) and snapshot survive close and open."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=(Entry(1, 1, b"", EntryKind.NOOP), *_entries(2, 5)), hard_state=HardState(1, "b", 4)))
        st.begin_snapshot(2, 1, lambda: b"state@2")
        assert st.finish_snapshot(wait=True) == Snapshot(2, 1, b"state@2")
    with RaftStorage.open(path, CLUSTER) as st:
        state = st.load()
    assert state.hard_state == HardState(1, "b", 4)
    assert state.snapshot == Snapshot(2, 1, b"state@2")
    assert state.entries == tuple(_entries(3, 5))


def test_append_replaces_a_conflicting_suffix(path: Path) -> None:
    """Appending from index 3 drops the stored 3..5 before writing the new ones."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.append(_entries(1, 5))
        st.append([Entry(3, 2, b"new3")])
        assert [(e.index, e.term) for e in st.load().entries] == [(1, 1), (2, 1), (3, 2)]


@pytest.mark.parametrize("entries", [[Entry(3, 1)], [Entry(1, 1), Entry(3, 1)]], ids=["gap", "not-consecutive"])
def test_append_refuses_entries_that_would_leave_a_gap(path: Path, entries: list[Entry]) -> None:
    """The log on disk never has holes, so a bad append is a programming error."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.append(_entries(1, 1))
        with pytest.raises(ValueError):
            st.append(entries)


def test_an_installed_snapshot_replaces_the_whole_log(path: Path) -> None:
    """A Ready with a snapshot from the leader clears every entry before writing the new ones."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.append(_entries(1, 5))
        st.persist(Ready(snapshot=Snapshot(9, 3, b"s"), entries=(Entry(10, 3, b"x"),), hard_state=HardState(3)))
        state = st.load()
    assert state.snapshot == Snapshot(9, 3, b"s") and state.entries == (Entry(10, 3, b"x"),)


def test_a_snapshot_older_than_the_stored_one_is_refused(path: Path) -> None:
    """Compaction only moves forward, and one snapshot is written at a time."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.append(_entries(1, 5))
        st.begin_snapshot(4, 1, lambda: b"s")
        with pytest.raises(RuntimeError):
            st.begin_snapshot(5, 1, lambda: b"s")
        st.finish_snapshot(wait=True)
        for index in (2, 4):  # one at the stored index would replace its chunks under it
            with pytest.raises(ValueError):
                st.begin_snapshot(index, 1, lambda: b"s")


def test_a_failed_transaction_leaves_nothing_behind(path: Path) -> None:
    """persist is atomic: an error halfway through rolls the hard state back too."""
    with RaftStorage.open(path, CLUSTER) as st:
        with pytest.raises(ValueError):
            st.persist(Ready(hard_state=HardState(5, "a", 0), entries=(Entry(7, 1),)))
        assert st.load() == PersistedState()


def test_a_restarted_node_continues_from_the_file(path: Path) -> None:
    """A single-node cluster persisting every Ready to SQLite restarts with its log, term and commit."""
    config = Config("a", ("a",))
    node = RaftNode(config, random.Random(1))
    with RaftStorage.open(path, CLUSTER) as st:
        while node.role is not Role.LEADER:
            node.tick()
        for item in (b"x", b"y"):
            node.propose(item)
        while node.has_ready():
            rd = node.ready()
            st.persist(rd)
            node.advance(rd)
    with RaftStorage.open(path, CLUSTER) as st:
        again = RaftNode(config, random.Random(1), st.load())
    assert (again.term, again.vote, again.commit_index, again.log.last_index) == (1, "a", 3, 3)
    assert [e.data for e in again.ready().committed_entries] == [b"", b"x", b"y"]


# ------------------------------------------------------------------ corruption


def test_a_flipped_byte_in_an_entry_is_a_bad_checksum(path: Path) -> None:
    """Changing one byte of an entry's data inside the file is detected and named."""
    _filled(path)
    raw = bytearray(path.read_bytes())
    at = raw.index(MARKER)
    raw[at + 3] ^= 0x01
    path.write_bytes(bytes(raw))
    err = _open_corrupt(path)
    assert err.details["problem"] == "entry 3 has a bad checksum"


def test_an_edited_term_is_a_bad_checksum(path: Path) -> None:
    """A row changed behind the storage's back no longer matches its checksum."""
    _filled(path)
    _sql(path, "UPDATE entries SET term = 2 WHERE idx = 2")
    assert _open_corrupt(path).details["problem"] == "entry 2 has a bad checksum"


def test_a_deleted_entry_row_is_a_gap(path: Path) -> None:
    """A missing entry in the middle of the log is named by its index."""
    _filled(path)
    _sql(path, "DELETE FROM entries WHERE idx = 2")
    assert _open_corrupt(path).details["problem"] == "log has a gap: entries 2 to 2 are missing"


def test_deleted_last_entries_leave_the_commit_index_past_the_log(path: Path) -> None:
    """Losing the committed tail is caught by the commit index check."""
    _filled(path)
    _sql(path, "DELETE FROM entries WHERE idx >= 3")
    assert _open_corrupt(path).details["problem"] == "commit index 3 is past the last log index 2"


def test_a_tampered_hard_state_is_a_bad_checksum(path: Path) -> None:
    """Changing the persisted vote is detected."""
    _filled(path)
    _sql(path, "UPDATE hard_state SET vote = 'c'")
    assert "hard state" in _open_corrupt(path).details["problem"]


def _compact(st: RaftStorage, snap: Snapshot) -> None:
    st.begin_snapshot(snap.index, snap.term, lambda: snap.data)
    assert st.finish_snapshot(wait=True) == snap


@pytest.mark.parametrize(
    ("how", "tamper"),
    [("installed", "UPDATE snapshot SET data = x'00'"), ("compacted", "UPDATE snapshot_chunks SET data = x'00'")],
)
def test_a_tampered_snapshot_is_a_bad_checksum(path: Path, how: str, tamper: str) -> None:
    """Changing the snapshot's data is detected, in its row (installed from a leader) or
    in its chunks (written by a compaction)."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.append(_entries(1, 3))
        if how == "installed":
            st.persist(Ready(snapshot=Snapshot(2, 1, b"state"), hard_state=HardState(1)))
        else:
            _compact(st, Snapshot(2, 1, b"state"))
    _sql(path, tamper)
    assert _open_corrupt(path).details["problem"] == "snapshot at index 2 has a bad checksum"


def test_a_large_snapshot_is_written_in_chunks_and_comes_back_whole(path: Path) -> None:
    """A compaction's snapshot over SNAPSHOT_CHUNK_BYTES is stored in chunks, each its own
    short transaction, and read back byte for byte; the entries it covers are gone."""
    data = random.Random(7).randbytes(3 * SNAPSHOT_CHUNK_BYTES + 12345)
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=tuple(_entries(1, 6)), hard_state=HardState(1, None, 6)))
        _compact(st, Snapshot(4, 1, data))
        assert st._conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 4
    with RaftStorage.open(path, CLUSTER) as st:
        state = st.load()
    assert state.snapshot == Snapshot(4, 1, data) and state.entries == tuple(_entries(5, 6))


def test_the_loop_writes_while_a_snapshot_is_being_written(path: Path) -> None:
    """The invariant the background write exists for: the loop's own transactions commit
    between the chunks of a compaction's snapshot (each waits for one chunk, not for the
    whole snapshot), and what they wrote is all there afterwards, after the snapshot."""
    data = random.Random(8).randbytes(24 << 20)
    total = -(-len(data) // SNAPSHOT_CHUNK_BYTES)
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=tuple(_entries(1, 10)), hard_state=HardState(1, None, 10)))
        st.begin_snapshot(10, 1, lambda: data)
        index, seen = 10, set()
        while st.finish_snapshot() is None:
            index += 1
            st.persist(Ready(entries=(Entry(index, 1, b"e%d" % index),)))
            seen.add(st._conn.execute("SELECT count(*) FROM snapshot_chunks WHERE idx = 10").fetchone()[0])
        assert len(seen & set(range(1, total))) >= 2, seen  # committed while it was partly written
        state = st.load()
    assert state.snapshot.index == 10 and [e.index for e in state.entries] == list(range(11, index + 1))


def test_a_compaction_overtaken_by_an_installed_snapshot_is_discarded(path: Path) -> None:
    """A snapshot from the leader installed while a compaction's older one is written wins:
    the older one is never made current and its chunks are removed."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.append(_entries(1, 5))
        st.persist(Ready(snapshot=Snapshot(9, 2, b"from-leader"), entries=(Entry(10, 2, b"x"),), hard_state=HardState(2)))
        late = _SnapshotWriter(path, 4, 1, lambda: b"older", st._lock)
        late.run()  # as if it had been begun before the install and finished after it
        assert late.error is None and not late.current
        assert st._conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 0
        state = st.load()
    assert state.snapshot == Snapshot(9, 2, b"from-leader") and state.entries == (Entry(10, 2, b"x"),)


def test_chunks_left_by_a_crash_during_a_compaction_change_nothing(path: Path) -> None:
    """Killed before its last transaction, a compaction leaves chunks that no snapshot row
    names: the state is the one before it, and the next compaction removes them."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=tuple(_entries(1, 5)), hard_state=HardState(1, None, 5)))
        _compact(st, Snapshot(2, 1, b"state@2"))
    _sql(path, "INSERT INTO snapshot_chunks (idx, seq, data) VALUES (4, 0, x'deadbeef')")
    with RaftStorage.open(path, CLUSTER) as st:
        assert st.load().snapshot == Snapshot(2, 1, b"state@2")
        _compact(st, Snapshot(5, 1, b"state@5"))
        assert st._conn.execute("SELECT idx FROM snapshot_chunks").fetchall() == [(5,)]


_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE hard_state (id INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL, vote TEXT, commit_index INTEGER NOT NULL, checksum INTEGER NOT NULL);
CREATE TABLE snapshot (id INTEGER PRIMARY KEY CHECK (id = 1),
    idx INTEGER NOT NULL, term INTEGER NOT NULL, data BLOB NOT NULL, checksum INTEGER NOT NULL);
CREATE TABLE entries (idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, kind INTEGER NOT NULL,
    data BLOB NOT NULL, checksum INTEGER NOT NULL)
"""


def _version_1_file(path: Path, cluster: str) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_1)
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "1"), ("cluster_id", cluster)])
    conn.execute("INSERT INTO hard_state VALUES (1, 1, 'a', 4, ?)", (_crc(1, "a", 4),))
    conn.execute("INSERT INTO snapshot VALUES (1, 2, 1, ?, ?)", (b"state@2", _crc(2, 1, b"state@2")))
    conn.executemany(
        "INSERT INTO entries VALUES (?, 1, 0, ?, ?)", [(i, b"data%d" % i, _crc(i, 1, 0, b"data%d" % i)) for i in (3, 4)]
    )
    conn.commit()
    conn.close()


def test_another_clusters_version_1_file_is_refused_and_left_as_it_was(path: Path) -> None:
    """The upgrade comes after the checks that the file is this cluster's."""
    _version_1_file(path, "another-cluster")
    assert _open_corrupt(path).details["problem"].startswith("cluster id is 'another-cluster'")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    conn.close()


def test_a_file_of_schema_version_1_is_upgraded_with_its_state(path: Path) -> None:
    """A broker of the previous version left its snapshot in one row: opening the file
    upgrades it in place, the state comes back, and compaction works on it."""
    _version_1_file(path, CLUSTER)
    with RaftStorage.open(path, CLUSTER) as st:
        state = st.load()
        assert state.snapshot == Snapshot(2, 1, b"state@2") and state.entries == tuple(_entries(3, 4))
        assert state.hard_state == HardState(1, "a", 4)
        _compact(st, Snapshot(4, 1, b"state@4"))
        version = st._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert version == str(SCHEMA_VERSION) == "2"
    with RaftStorage.open(path, CLUSTER) as st:
        assert st.load().snapshot == Snapshot(4, 1, b"state@4")


def test_entries_left_inside_the_snapshot_are_never_read(path: Path) -> None:
    """Entries at or below the snapshot's index are what a compaction had not dropped yet
    (it drops them after making the snapshot current, and may be killed in between):
    covered by the snapshot, they are not read, and the next compaction drops them."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=tuple(_entries(1, 3)), hard_state=HardState(1, None, 3)))
        _compact(st, Snapshot(2, 1, b"state"))
    _sql(path, "INSERT INTO entries SELECT 1, term, kind, x'00', 0 FROM entries WHERE idx = 3")
    with RaftStorage.open(path, CLUSTER) as st:
        assert st.load().entries == tuple(_entries(3, 3))
        _compact(st, Snapshot(3, 1, b"state@3"))
        assert st._conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 0


def test_terms_going_backwards_are_refused(path: Path) -> None:
    """A log whose terms decrease was not written by a correct node, even with good checksums."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.append([Entry(1, 3), Entry(2, 3)])
        st._conn.execute("DELETE FROM entries WHERE idx = 2")
        st.append([Entry(2, 2)])
        st.set_hard_state(HardState(3))
    assert _open_corrupt(path).details["problem"] == "entry 2 has term 2, before the term 3 preceding it"


def test_a_term_before_the_logs_last_term_is_refused(path: Path) -> None:
    """The current term can never be older than the last entry's term."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=(Entry(1, 4),), hard_state=HardState(2)))
    assert _open_corrupt(path).details["problem"] == "current term 2 is before the log's last term 4"


@pytest.mark.parametrize("keep", [0, 100, 2000], ids=["empty", "header-only", "half"])
def test_a_truncated_file_is_refused_and_never_recreated(path: Path, keep: int) -> None:
    """Cutting the file short (even to nothing) raises instead of starting a node with no state."""
    _filled(path)
    raw = path.read_bytes()
    assert len(raw) > keep
    path.write_bytes(raw[:keep])
    _open_corrupt(path)


def test_a_file_that_is_not_sqlite_is_refused(path: Path) -> None:
    """Garbage in place of the database gives a clear error, not a sqlite3 exception."""
    path.write_bytes(b"this is not a database" * 100)
    assert "not a readable SQLite database" in _open_corrupt(path).details["problem"]


def test_a_file_of_another_cluster_is_refused(path: Path) -> None:
    """The cluster id row keeps a broker from joining with another cluster's log."""
    _filled(path)
    with pytest.raises(CorruptStateError) as info:
        RaftStorage.open(path, "other-cluster")
    assert info.value.details["problem"] == "cluster id is 'test-cluster', expected 'other-cluster'"


def test_a_file_of_another_schema_version_is_refused(path: Path) -> None:
    """A file written by a different schema version is not read as if it were this one."""
    _filled(path)
    _sql(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    assert _open_corrupt(path).details["problem"] == f"schema version is '99', expected '{SCHEMA_VERSION}'"


def test_only_a_transaction_that_merely_moves_the_commit_index_skips_the_fsync(path: Path) -> None:
    """Durability of what Raft needs durable: entries, snapshots, a new term or vote wait
    for the disk; a commit-index-only write does not (etcd's MustSync), yet it is stored,
    and the next write waits for the disk again (synchronous=FULL is restored)."""
    with RaftStorage.open(path, CLUSTER) as st:
        assert st.persist(Ready(entries=tuple(_entries(1, 3)), hard_state=HardState(1, "a", 0)))
        assert not st.persist(Ready(hard_state=HardState(1, "a", 2)))
        assert st._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
        assert st.persist(Ready(hard_state=HardState(1, "b", 2)))  # a vote
        assert st.persist(Ready(hard_state=HardState(2, None, 2)))  # a term
        assert st.persist(Ready(entries=(Entry(4, 2, b"x"),)))
        assert not st.persist(Ready())
    with RaftStorage.open(path, CLUSTER) as st:
        assert st.load().hard_state == HardState(2, None, 2)
        assert not st.persist(Ready(hard_state=HardState(2, None, 3)))  # term and vote read back at open


def test_a_snapshot_that_cannot_be_made_is_an_internal_error_in_the_loop(path: Path) -> None:
    """Whatever fails in the writer's thread (packing the state, the disk) reaches the
    loop's thread as InternalError when it collects the snapshot, and nothing changed."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=tuple(_entries(1, 3)), hard_state=HardState(1, None, 3)))
        st.begin_snapshot(2, 1, lambda: b"" + 1)  # type: ignore[operator]
        with pytest.raises(InternalError) as info:
            st.finish_snapshot(wait=True)
        assert "TypeError" in info.value.message and not st.writing_snapshot
        assert st.load().snapshot == Snapshot() and len(st.load().entries) == 3


def test_an_installed_snapshot_replaces_a_compacted_one_and_its_chunks(path: Path) -> None:
    """A snapshot from the leader is stored in its row; the chunks of the compaction it
    replaces go with the same transaction."""
    with RaftStorage.open(path, CLUSTER) as st:
        st.persist(Ready(entries=tuple(_entries(1, 4)), hard_state=HardState(1, None, 4)))
        _compact(st, Snapshot(3, 1, b"compacted"))
        assert st._conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 1
        st.persist(Ready(snapshot=Snapshot(9, 2, b"from-leader"), hard_state=HardState(2, None, 9)))
        assert st._conn.execute("SELECT count(*) FROM snapshot_chunks").fetchone()[0] == 0
    with RaftStorage.open(path, CLUSTER) as st:
        assert st.load().snapshot == Snapshot(9, 2, b"from-leader")


def _entries_in_main_file(path: Path, copy: Path) -> int:
    """How many entries the database file holds without its WAL (what a checkpoint copied)."""
    shutil.copyfile(path, copy)
    conn = sqlite3.connect(copy)
    try:
        return conn.execute("SELECT count(*) FROM entries").fetchone()[0]
    except sqlite3.DatabaseError:  # no table yet, or copied halfway through a checkpoint
        return 0
    finally:
        conn.close()


def test_the_wal_is_copied_into_the_file_in_the_background_not_by_the_loop(path: Path, tmp_path: Path) -> None:
    """The loop's connection never checkpoints (a checkpoint inside its commit cost it
    30-45 ms every second under load); the storage's own thread does, well before SQLite's
    1,000-page trigger: 50 entries written reach the database file itself."""
    with RaftStorage.open(path, CLUSTER) as st:
        assert st._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        st.persist(Ready(entries=tuple(_entries(1, 50)), hard_state=HardState(1, None, 50)))
        deadline = time.monotonic() + 5
        while _entries_in_main_file(path, tmp_path / "copy.db") < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _entries_in_main_file(path, tmp_path / "copy.db") == 50
