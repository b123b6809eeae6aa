"""Cluster members over real ZeroMQ peer links on 127.0.0.1: election, replication,
failover, restart from disk, snapshots, learners, CURVE and corrupted state.

All members of a test share one context and are driven inline by one poller loop, the
way a broker's loop drives its member.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from mesh.cluster.member import COMPACT_AT_MOST, STATE_FILE, ClusterMember
from mesh.cluster.transport import KIND_RAFT, PeerSecurity
from mesh.protocol.errors import ConfigurationError, CorruptStateError, InternalError
from mesh.security.curve import CurveAuthenticator, create_keypair, secure_client, secure_server
from mesh.security.state import ensure_state
from mesh.testing import free_ports

pytestmark = pytest.mark.timeout(40)


class ListMachine:
    """A toy state machine: the list of applied data, snapshotted as MessagePack."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.indexes: list[int] = []

    def apply(self, index: int, data: bytes) -> None:
        assert not self.indexes or index > self.indexes[-1], "applied out of order"
        self.indexes.append(index)
        self.data.append(data)

    def capture(self) -> Callable[[], bytes]:
        data = list(self.data)
        return lambda: msgpack.packb(data)

    def restore(self, data: bytes) -> None:
        self.data = list(msgpack.unpackb(data))
        self.indexes = []


class Cluster:
    """Members on fixed loopback ports, their data dirs and state machines, one loop."""

    def __init__(
        self, tmp: Path, ctx: zmq.Context, ids: tuple[str, ...] = ("a", "b", "c"), learners: tuple[str, ...] = (), **kw
    ) -> None:
        self.tmp, self.ctx, self.learners, self.kw = tmp, ctx, learners, kw
        self.endpoints = {m: f"tcp://127.0.0.1:{p}" for m, p in zip(ids, free_ports(len(ids)), strict=True)}
        self.machines: dict[str, ListMachine] = {}
        self.members: dict[str, ClusterMember] = {}
        for m in ids:
            self.start(m)

    def start(self, m: str, **kw) -> ClusterMember:
        self.machines[m] = ListMachine()
        # libzmq unbinds a closed socket in its I/O thread, a moment after close(): a
        # member restarted in the same process may find its port still taken briefly.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                self.members[m] = ClusterMember(
                    m, self.endpoints, self.learners, self.tmp / m, self.machines[m], self.ctx,
                    seed=sum(map(ord, m)), **{**self.kw, **kw},
                )  # fmt: skip
                return self.members[m]
            except ConfigurationError as exc:
                if "in use" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def crash(self, m: str) -> None:
        self.members.pop(m).close()

    def run(self, seconds: float) -> None:
        self.run_until(lambda: False, seconds, fail=False)

    def run_until(self, cond: Callable[[], bool], timeout: float, fail: bool = True) -> float:
        """Drive every live member until `cond()`; returns the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        poller = zmq.Poller()
        owner = {}
        for member in self.members.values():
            for sock in member.sockets:
                poller.register(sock, zmq.POLLIN)
                owner[sock] = member
        while True:
            for member in self.members.values():
                member.process()
            if cond():
                return time.monotonic() - start
            now = time.monotonic()
            if now >= deadline:
                if fail:
                    raise AssertionError(f"timed out; status: {self.statuses()}")
                return now - start
            for sock, _ in poller.poll(10):
                owner[sock].on_readable(sock)
            now = time.monotonic()
            for member in self.members.values():
                member.tick(now)

    def statuses(self) -> dict[str, object]:
        return {m: member.status() for m, member in self.members.items()}

    def leader(self) -> str | None:
        """The one member that leads and that every live member follows, if any."""
        leaders = [m for m, member in self.members.items() if member.is_leader]
        if len(leaders) != 1 or any(member.leader != leaders[0] for member in self.members.values()):
            return None
        return leaders[0]

    def elect(self, timeout: float = 10.0) -> str:
        self.run_until(lambda: self.leader() is not None, timeout)
        leader = self.leader()
        assert leader is not None
        return leader

    def all_have(self, count: int, members: tuple[str, ...] | None = None) -> Callable[[], bool]:
        names = members or tuple(self.members)
        return lambda: all(len(self.machines[m].data) >= count for m in names)

    def close(self) -> None:
        for member in self.members.values():
            member.close()
        self.members.clear()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def cluster_of(tmp_path: Path, ctx: zmq.Context) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(*args, **kw) -> Cluster:
        made.append(Cluster(tmp_path, ctx, *args, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_a_leader_is_elected_and_proposals_from_leader_and_followers_apply_in_one_order(cluster_of):
    """One leader within seconds; data proposed on the leader and on both followers
    (forwarded) is applied once each, in the same order, on all three members."""
    c = cluster_of()
    took = c.run_until(lambda: c.leader() is not None, 10)
    assert took < 5.0
    leader = c.elect()
    followers = [m for m in c.members if m != leader]
    sent = []
    for i in range(30):
        proposer = (leader, *followers)[i % 3]
        data = f"{proposer}-{i}".encode()
        c.members[proposer].propose(data)
        sent.append(data)
        c.run(0.01)
    c.run_until(c.all_have(30), 10)
    first = c.machines[leader].data
    assert sorted(first) == sorted(sent)
    assert all(c.machines[m].data == first for m in followers)
    assert c.members[followers[0]].counters["proposals_forwarded"] == 10
    status = c.members[leader].status()
    assert status["role"] == "leader" and status["applied_index"] == status["commit_index"]
    assert set(status["peers"]) == set(followers)
    assert all(p["lag"] == 0 for p in status["peers"].values())


def test_a_new_leader_takes_over_within_seconds_after_the_leader_crashes(cluster_of):
    """With the leader's sockets and state closed at once, the two others elect a new
    leader in a few seconds, and proposals from either of them commit on both."""
    c = cluster_of()
    old = c.elect()
    c.members[old].propose(b"before")
    c.run_until(c.all_have(1), 5)
    c.crash(old)
    took = c.run_until(lambda: c.leader() is not None, 5)
    assert took < 3.0, f"failover took {took:.2f} s"
    new = c.leader()
    assert new is not None and new != old
    for m in c.members:
        c.members[m].propose(f"after-{m}".encode())
    c.run_until(c.all_have(3), 5)
    data = [c.machines[m].data for m in c.members]
    assert data[0] == data[1] and data[0][0] == b"before"


def test_proposals_made_while_no_leader_is_known_are_sent_once_one_is(cluster_of):
    """A proposal made before any election waits in the member's queue and commits
    once a leader appears; one that waits past the timeout is dropped and counted."""
    c = cluster_of(pending_timeout=3.0)
    c.members["a"].propose(b"early")
    assert c.members["a"].status()["pending_proposals"] == 1
    c.elect()
    c.run_until(c.all_have(1), 5)
    assert c.machines["b"].data == [b"early"]

    lonely = cluster_of(("x", "y", "z"), pending_timeout=0.3)
    lonely.crash("y")
    lonely.crash("z")
    lonely.members["x"].propose(b"lost")
    lonely.run(0.6)
    assert lonely.members["x"].counters["proposals_expired"] == 1
    assert lonely.members["x"].status()["pending_proposals"] == 0


class QuorumDurable:
    """Wraps a member's state machine: before applying an entry, checks that a quorum of
    the members' state files already hold it, read through connections of their own
    (which see only transactions committed to disk)."""

    def __init__(self, inner: ListMachine, files: list[Path], quorum: int) -> None:
        self.inner, self.quorum = inner, quorum
        self.readers = [sqlite3.connect(f"file:{f}?mode=ro", uri=True) for f in files]
        self.checked = 0

    def apply(self, index: int, data: bytes) -> None:
        held = sum(
            1 for db in self.readers
            if db.execute("SELECT 1 FROM entries WHERE idx = ?", (index,)).fetchone()
            or db.execute("SELECT 1 FROM snapshot WHERE idx >= ?", (index,)).fetchone()
        )  # fmt: skip
        assert held >= self.quorum, f"entry {index} applied while {held} state files hold it"
        self.checked += 1
        self.inner.apply(index, data)

    def capture(self) -> Callable[[], bytes]:
        return self.inner.capture()

    def restore(self, data: bytes) -> None:
        self.inner.restore(data)

    def close(self) -> None:
        for db in self.readers:
            db.close()


def test_a_burst_of_proposals_is_group_committed_and_applied_only_once_on_a_quorums_disk(cluster_of, tmp_path):
    """Durability under group commit: hundreds of records proposed at once on the leader
    and on a follower travel in a few appends and transactions (not one per record), yet
    no member applies an entry (what a broker answers a client on) before a quorum of
    the members' SQLite files hold it."""
    c = cluster_of()
    leader = c.elect()
    follower = next(m for m in c.members if m != leader)
    files = [tmp_path / m / STATE_FILE for m in c.members]
    checks = {m: QuorumDurable(c.machines[m], files, quorum=2) for m in c.members}
    for m, member in c.members.items():
        member.state_machine = checks[m]
    sent_before = c.members[leader].transport.counters["sent"]
    try:
        for i in range(300):
            c.members[leader].propose(b"L%d" % i)
        for i in range(150):
            c.members[follower].propose(b"F%d" % i)
        c.run_until(c.all_have(450), 20)
    finally:
        for check in checks.values():
            check.close()
    assert all(check.checked == 450 for check in checks.values())
    assert all(c.machines[m].data == c.machines[leader].data for m in c.members)
    counters = c.members[leader].counters
    assert counters["entries_persisted"] >= 450 and counters["persists"] < 450 / 4
    assert c.members[leader].transport.counters["sent"] - sent_before < 450 / 2


def test_no_acknowledgement_leaves_a_member_whose_disk_write_failed(cluster_of):
    """Acknowledge only what is on disk: a follower whose SQLite write fails sends no
    acknowledgement of the entries it could not persist, so with the other follower down
    the leader never commits them; its own appends still leave before its fsync."""
    c = cluster_of()
    leader = c.elect()
    follower, down = (m for m in c.members if m != leader)
    raft = c.members[leader].raft
    c.run_until(lambda: raft.commit_index == raft.log.last_index, 5)  # the leader's NOOP
    c.crash(down)
    committed = c.members[leader].raft.commit_index
    c.members[follower].storage.close()  # every later write of this member fails
    c.members[leader].propose(b"unsaved")
    poller = zmq.Poller()
    for member in c.members.values():
        poller.register(member.transport.router, zmq.POLLIN)
    failed = 0
    for _ in range(40):
        for m, member in c.members.items():
            try:
                member.process()
            except InternalError:
                assert m == follower
                failed += 1
        for sock, _ in poller.poll(10):
            next(member for member in c.members.values() if sock in member.sockets).on_readable(sock)
    assert failed and c.members[follower].raft.log.last_index > committed  # it received the entry
    assert c.members[leader].raft.commit_index == committed and c.machines[leader].data == []


def test_a_restarted_member_replays_its_disk_then_catches_up_from_the_leader(cluster_of):
    """A member restarted from its data directory first re-applies what it had
    committed, then receives what the others committed while it was down."""
    c = cluster_of()
    leader = c.elect()
    down = next(m for m in c.members if m != leader)
    for i in range(10):
        c.members[leader].propose(b"x%d" % i)
    c.run_until(c.all_have(10), 5)
    before = list(c.machines[down].data)
    c.crash(down)
    for i in range(10, 20):
        c.members[leader].propose(b"x%d" % i)
    c.run_until(c.all_have(20), 5)
    c.start(down)
    assert c.machines[down].data == before  # replayed from its own disk, before any message
    c.run_until(c.all_have(20), 5)
    assert c.machines[down].data == c.machines[leader].data


def test_a_member_behind_the_compacted_log_catches_up_through_a_snapshot(cluster_of):
    """With a small compaction threshold the leader snapshots while a member is down;
    the restarted member installs the snapshot, then follows the log, and a member
    restarted after compacting itself restores from its own snapshot."""
    c = cluster_of(compact_after=20)
    leader = c.elect()
    down = next(m for m in c.members if m != leader)
    c.crash(down)
    for i in range(60):
        c.members[leader].propose(b"y%d" % i)
        if i % 16 == 15:
            c.run(0.05)
    c.run_until(c.all_have(60), 10)
    assert c.members[leader].counters["compactions"] >= 1
    assert c.members[leader].status()["snapshot_index"] > 0
    c.start(down)
    c.run_until(c.all_have(60), 10)
    assert c.members[down].counters["snapshots_installed"] == 1
    assert c.machines[down].data == c.machines[leader].data

    other = next(m for m in c.members if m not in (leader, down))
    expected = list(c.machines[other].data)
    c.crash(other)
    c.start(other)
    assert c.machines[other].data == expected  # its snapshot, then the entries after it


def test_compaction_waits_for_as_many_log_bytes_as_the_last_snapshot_holds(cluster_of):
    """The amortization rule: a snapshot holds the whole state, so taking one every
    `compact_after` entries costs more per entry the larger the state grows (a 20 MB
    state every 10,000 entries stalled the brokers). A member compacts only once the
    log since its last snapshot is as large as that snapshot: with the state growing by
    each entry, the snapshots' sizes double, and 320 entries past a threshold of 10 give
    a handful of compactions instead of about 30."""
    c = cluster_of(compact_after=10)
    leader = c.elect()
    for i in range(320):
        c.members[leader].propose(b"z%03d" % i + b"." * 60)
        if i % 16 == 15:
            c.run(0.02)
    c.run_until(c.all_have(320), 10)
    c.run(0.2)  # the last snapshot begun is written
    compactions = c.members[leader].counters["compactions"]
    assert 3 <= compactions <= 6, compactions
    snapshot_index = c.members[leader].status()["snapshot_index"]
    assert 160 <= snapshot_index <= 320  # the last one came after the log had doubled


def test_a_large_state_still_gets_a_snapshot_after_at_most_ten_thresholds_of_entries(cluster_of):
    """The byte rule has a ceiling: with a state far larger than the entries that follow
    (one 60 KB entry, then tiny ones), a member still compacts once the log runs
    COMPACT_AT_MOST x compact_after entries, so a restart never replays an unbounded log."""
    c = cluster_of(compact_after=5)
    leader = c.elect()
    c.members[leader].propose(b"big" + b"." * 60_000)
    for i in range(8):
        c.members[leader].propose(b"s%d" % i)
    c.run_until(c.all_have(9), 10)
    c.run(0.2)
    first = c.members[leader].counters["compactions"]
    assert first >= 1  # the big entry's own snapshot: the state is now 60 KB
    for i in range(COMPACT_AT_MOST * 5 + 5):
        c.members[leader].propose(b"t%d" % i)
        if i % 16 == 15:
            c.run(0.02)
    c.run_until(c.all_have(9 + COMPACT_AT_MOST * 5 + 5), 10)
    c.run(0.2)
    assert c.members[leader].counters["compactions"] > first  # 240 bytes of entries against 60 KB


def test_a_learner_receives_the_log_but_does_not_count_for_the_quorum(cluster_of):
    """A learner applies what the voters commit and never leads; with two voters gone
    the leader's new entry reaches the learner but is not committed."""
    c = cluster_of(("a", "b", "c", "l"), learners=("l",))
    leader = c.elect()
    assert leader != "l" and c.members["l"].status()["role"] == "learner"
    c.members["l"].propose(b"from-learner")
    c.members[leader].propose(b"from-leader")
    c.run_until(c.all_have(2), 5)
    assert c.machines["l"].data == c.machines[leader].data

    for m in [m for m in ("a", "b", "c") if m != leader]:
        c.crash(m)
    commit = c.members[leader].status()["commit_index"]
    c.members[leader].propose(b"no-quorum")
    c.run(0.3)
    assert c.members["l"].status()["last_index"] == commit + 1  # replicated to the learner
    assert c.members[leader].status()["commit_index"] == commit  # but not committed
    assert all(len(m.data) == 2 for m in c.machines.values())
    assert not c.members["l"].is_leader


def test_bad_frames_on_the_peer_port_are_counted_and_the_member_keeps_serving(cluster_of, ctx):
    """Garbage, unknown senders, spoofed and misaddressed records are dropped and counted;
    the cluster still elects and replicates."""
    from mesh.cluster.messages import VoteRequest, encode_message

    c = cluster_of()
    target = "a"

    def raw(routing_id: bytes) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(c.endpoints[target])
        return sock

    stranger, spoofer = raw(b"mallory"), raw(b"b")
    try:
        time.sleep(0.2)
        stranger.send_multipart([KIND_RAFT, b"\xc1garbage"])
        spoofer.send_multipart([KIND_RAFT, b"\xc1garbage"])
        spoofer.send_multipart([b"\x09", b"?"])
        spoofer.send_multipart([KIND_RAFT])
        spoofer.send_multipart([KIND_RAFT, encode_message(VoteRequest("a", "c", 5, 0, 0, True))])
        spoofer.send_multipart([KIND_RAFT, encode_message(VoteRequest("z", "b", 5, 0, 0, True))])
        counters = c.members[target].transport.counters
        c.run_until(lambda: sum(counters.values()) >= 6, 5)
    finally:
        stranger.close(linger=0)
        spoofer.close(linger=0)
    assert counters["unknown_peer"] == 1
    assert counters["bad_message"] == 1
    assert counters["unknown_kind"] == 1
    assert counters["bad_frame_count"] == 1
    assert counters["spoofed_sender"] == 1
    assert counters["misaddressed"] == 1
    leader = c.elect()
    c.members[leader].propose(b"still fine")
    c.run_until(c.all_have(1), 5)


def test_a_message_larger_than_a_frame_crosses_a_real_link_in_chunks(ctx):
    """A snapshot bigger than the peer links' frame limit arrives whole (in 17 chunks here)."""
    import os

    from mesh.cluster.messages import Snapshot, SnapshotRequest, VoteRequest
    from mesh.cluster.transport import PeerTransport, RaftIn

    endpoints = {m: f"tcp://127.0.0.1:{p}" for m, p in zip("ab", free_ports(2), strict=True)}
    a = PeerTransport(ctx, "a", endpoints, chunk_bytes=64 * 1024)
    b = PeerTransport(ctx, "b", endpoints, chunk_bytes=64 * 1024)
    try:
        big = SnapshotRequest("b", "a", 3, Snapshot(10, 2, os.urandom(1024 * 1024)))
        small = VoteRequest("b", "a", 3, 10, 2, False)
        got: list[object] = []
        deadline = time.monotonic() + 10
        while big not in [m.message for m in got if isinstance(m, RaftIn)] and time.monotonic() < deadline:
            a.send_message(big)  # queued only once the link is up (IMMEDIATE)
            time.sleep(0.05)
            got += b.receive()
        a.send_message(small)
        while small not in [m.message for m in got if isinstance(m, RaftIn)] and time.monotonic() < deadline:
            time.sleep(0.01)
            got += b.receive()
        assert [m.message for m in got if isinstance(m, RaftIn)][-2:] == [big, small]
        assert a.counters["sent_chunked"] >= 1 and b.counters["too_large"] == 0
        # A record cut short at the sender (its queue was full) is dropped when the next frame comes.
        from mesh.cluster.messages import encode_message
        from mesh.cluster.transport import chunk_frames

        first_chunk = next(chunk_frames(encode_message(big), 99, 64 * 1024))
        a.dealers["b"].send_multipart(first_chunk)
        a.send_message(small)
        got = []
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
            got += b.receive()
        assert [m.message for m in got] == [small] and b.counters["chunk_lost"] == 1
    finally:
        a.close()
        b.close()


def test_a_forwarded_proposal_to_a_member_that_does_not_lead_is_dropped(cluster_of, ctx):
    """A proposal frame that reaches a follower is counted and not re-forwarded."""
    c = cluster_of()
    leader = c.elect()
    follower = next(m for m in c.members if m != leader)
    sender = next(m for m in c.members if m not in (leader, follower))
    assert c.members[sender].transport.forward_proposal(follower, b"misdirected")
    counters = c.members[follower].counters
    c.run_until(lambda: counters["forwarded_not_leader"] == 1, 5)
    c.run(0.2)
    assert all(m.data == [] for m in c.machines.values())


# ----------------------------------------------------------------------- CURVE


@pytest.fixture
def secure_state(tmp_path: Path, ctx: zmq.Context) -> Iterator[Path]:
    """A state directory as `mesh up` makes it, and the ZAP handler a broker runs."""
    layout = ensure_state(tmp_path / "state", nodes={"echo": ["echo"]}, now=time.time())
    auth = CurveAuthenticator(ctx, layout.allowed_dir)
    auth.start()
    yield layout.root
    auth.stop()


def test_with_curve_brokers_holding_the_peer_key_elect_and_replicate(cluster_of, secure_state):
    """Every link is CURVE with the state directory's broker and broker-peer keys."""
    c = cluster_of(security=PeerSecurity.from_state(secure_state))
    leader = c.elect()
    c.members[next(m for m in c.members if m != leader)].propose(b"secret")
    c.run_until(c.all_have(1), 5)
    assert all(m.data == [b"secret"] for m in c.machines.values())
    assert all(m.transport.counters["unauthorized"] == 0 for m in c.members.values())


@pytest.mark.parametrize("key", ["stranger", "echo"])
def test_with_curve_a_member_without_the_peer_key_is_refused(cluster_of, secure_state, tmp_path, key):
    """A member whose key is unknown (refused by ZAP) or a node's (admitted by ZAP, not a
    broker peer) gets none of its messages through; the two others carry on."""
    good = PeerSecurity.from_state(secure_state)
    if key == "stranger":
        _, secret = create_keypair(tmp_path / "stranger", "stranger")
    else:
        secret = secure_state / "curve" / "private" / "echo.key_secret"
    broker_public = secure_state / "curve" / "broker.key"
    bad = PeerSecurity(
        server=lambda sock: secure_server(sock, secret),  # nor does it hold the brokers' key
        client=lambda sock: secure_client(sock, secret, broker_public),
    )
    c = cluster_of(security=good)
    c.crash("c")
    c.start("c", security=bad)
    c.run_until(lambda: c.members["a"].is_leader or c.members["b"].is_leader, 10)
    leader = "a" if c.members["a"].is_leader else "b"
    c.members[leader].propose(b"for brokers only")
    c.run_until(c.all_have(1, ("a", "b")), 5)
    c.run(0.5)
    assert c.machines["c"].data == []
    assert not c.members["c"].is_leader
    assert c.members[leader].status()["peers"]["c"]["match_index"] == 0
    refused = sum(c.members[m].transport.counters["unauthorized"] for m in ("a", "b"))
    assert (refused > 0) == (key == "echo")


# ----------------------------------------------------------------- bad state


def test_a_corrupted_state_file_refuses_to_start_naming_the_file(cluster_of, tmp_path, ctx):
    """CorruptStateError at construction, before any port is bound; the message names
    the file. A state of another cluster is refused the same way."""
    c = cluster_of()
    c.elect()
    c.members["a"].propose(b"z" * 64)
    c.run_until(c.all_have(1), 5)
    c.close()
    path = tmp_path / "b" / STATE_FILE
    raw = bytearray(path.read_bytes())
    raw[100:4000] = b"\xff" * 3900
    path.write_bytes(bytes(raw))
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with pytest.raises(CorruptStateError) as err:
        c.start("b")
    assert str(path) in str(err.value)
    probe = ctx.socket(zmq.ROUTER)
    try:
        probe.bind(c.endpoints["b"])  # the member bound nothing
    finally:
        probe.close(linger=0)

    with pytest.raises(CorruptStateError, match="cluster id"):
        c.start("a", cluster_id="another-cluster")
