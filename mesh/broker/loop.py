"""The broker's socket loop: two ROUTERs and an XPUB around the routing core.

Rules of this module:

* This is the only code that touches the broker's sockets. It drains each readable
  socket in batches, hands every message to `Broker`, and sends what it returns; after
  each batch it publishes what the core has for subscribers.
* With security on, every socket is a CURVE server, a ZAP handler (started before the
  sockets bind) admits only known keys, and each message is handed over with the
  `Peer` it came from.
* Subscriptions are the core's decision: the XPUB is in manual mode, and the filters
  the core returns are applied right after the message that asked for them.
* Publishing never waits: a subscriber whose queue is full misses events (and sees the
  gap in their sequence numbers), so it cannot slow the others or the commands.
* A send that fails because the peer is gone or full is reported back to the core
  (`undeliverable`), never silently lost.
* `stop()` may be called from any thread or a signal handler: the loop stops accepting
  commands, lets the accepted ones finish (up to `drain_timeout`), then closes.
* With a cluster (`ClusterSettings`), the broker is also a member of the Raft group:
  the peer socket is polled with the others, and each loop turn hands the core's
  proposals to the member, drives the member, and sends what the newly committed
  entries mean for this broker's clients and nodes (`Broker.apply_shared`).
* With the monitor on, the tick builds a snapshot of the core at most every
  `SNAPSHOT_S` and hands it to the HTTP thread, which never touches the core. Per
  message the cost is one boolean test; one node reply every `SAMPLE_S` is timed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import zmq

from ..monitor.snapshot import SAMPLE_S, SNAPSHOT_S, Monitor, process_usage, reply_latency
from ..protocol.errors import MeshError
from ..security.gate import Peer
from ..sockets import LINGER_MS, Secure, bound_endpoint, publisher, recv_frames, recv_frames_from, router, send_frames
from .config import BrokerConfig
from .core import Broker, BrokerSecurity, Outgoing, Side
from .once import next_run
from .settings import BACKLOG, IO_THREADS

if TYPE_CHECKING:
    from ..cluster.member import ClusterMember
    from ..monitor.server import MonitorServer, MonitorSettings

__all__ = ["BrokerServer", "ClusterSettings", "Endpoints"]

log = logging.getLogger("mesh.broker")

BATCH: Final = 64
TICK_S: Final = 0.05
REFRESH_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where a broker listens: clients, handler nodes, and event subscribers."""

    clients: str
    nodes: str
    events: str = "tcp://127.0.0.1:*"


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """This broker's place in a cluster (docs/operations.md).

    Args:
        members: broker name -> peer endpoint, for every member, this broker included
            (its name is `BrokerConfig.name`).
        data_dir: this broker's durable cluster state (created if missing).
        learners: members that receive the log but do not vote.
        state_dir: security on: the state directory with the brokers' peer keys.
        tick_s: one consensus tick; `election_ticks` of them without a leader start
            an election (0.5 to 1 s by default).
        election_ticks: see `tick_s`.
    """

    members: Mapping[str, str]
    data_dir: str
    learners: frozenset[str] = field(default_factory=frozenset)
    state_dir: str | None = None
    tick_s: float = 0.05
    election_ticks: int = 10


class BrokerServer:
    """Runs a `Broker` on real sockets until stopped.

    `backlog` and `io_threads` are the settings of those names (mesh.broker.settings):
    the listen queue of each bound socket and the libzmq I/O threads of its context.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        config: BrokerConfig | None = None,
        *,
        drain_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        security: BrokerSecurity | None = None,
        secure: Secure | None = None,
        zap: Callable[[zmq.Context], Any] | None = None,
        monitor: MonitorSettings | None = None,
        cluster: ClusterSettings | None = None,
        backlog: int = BACKLOG,
        io_threads: int = IO_THREADS,
    ) -> None:
        self.core = Broker(config, security)
        self.member: ClusterMember | None = None
        self._leader: str | None = None  # the cluster leader the last turn knew
        self._own_policy: Any = None  # the policy read at start, until the cluster's differs
        self._keyring_path: Path | None = None  # the state directory's key ring, in a secure cluster
        self._keyring: Any = None  # its KeyRingFile, once the file could be read
        self._keyring_check = 0.0  # when to look at it next
        self._keyring_offered: dict[str, Any] | None = None
        self._keyring_said: str | None = None  # the last problem logged, to log each once
        self.drain_timeout = drain_timeout
        self._clock = clock
        self._ctx = zmq.Context(io_threads)
        limit = self.core.config.max_message_bytes
        self._zap = None
        try:
            if zap is not None:
                self._zap = zap(self._ctx)  # must answer before the first client connects
            self._clients = router(self._ctx, endpoints.clients, limit, secure, backlog)
            self._nodes = router(self._ctx, endpoints.nodes, limit, secure, backlog)
            self._events = publisher(self._ctx, endpoints.events, self.core.config.event_hwm, secure, backlog)
            if cluster is not None:
                self.member = self._join(cluster)
            self.monitor: MonitorServer | None = None
            if monitor is not None:
                from ..monitor.server import MonitorServer  # HTTP and prometheus_client only when on

                self.monitor = MonitorServer(monitor, clock)
        except Exception:
            if self._zap is not None:
                self._zap.stop()
            self._ctx.destroy(linger=0)
            raise
        self.endpoints = Endpoints(
            bound_endpoint(self._clients), bound_endpoint(self._nodes), bound_endpoint(self._events)
        )
        self.core.events_endpoint = self.endpoints.events
        self._stop_requested = False
        self._sockets = {Side.CLIENT: self._clients, Side.NODE: self._nodes}
        self._watch = Monitor(self.core.config.name, clock()) if monitor is not None else None
        self._next_sample = clock() if monitor is not None else float("inf")  # when to time a reply
        self._sent = 0  # messages sent, for the monitor
        self._aligned = True  # whether libzmq applies a filter to the link whose message was read last

    def _join(self, cluster: ClusterSettings) -> ClusterMember:
        """Open this broker's cluster state and peer link (raises CorruptStateError)."""
        from ..cluster.member import ClusterMember
        from ..cluster.shared import SharedState
        from ..cluster.transport import PeerSecurity

        name = self.core.config.name
        if name not in cluster.members:
            raise ValueError(f"broker {name!r} is not one of the cluster's members {sorted(cluster.members)}")
        shared = SharedState(events=self.core.events)
        member = ClusterMember(
            name, cluster.members, cluster.learners, cluster.data_dir, shared, self._ctx,
            security=PeerSecurity.from_state(cluster.state_dir) if cluster.state_dir is not None else None,
            tick_s=cluster.tick_s, election_ticks=cluster.election_ticks,
        )  # fmt: skip
        if self.core.security is not None:
            self._own_policy = self.core.security.gate.policy
        if cluster.state_dir is not None:
            from ..security.state import StateLayout

            self._keyring_path = StateLayout.at(cluster.state_dir).keyring
        self.core.join_cluster(shared, self._clock(), run=next_run(shared, name, time.time_ns()))
        shared.take_effects()  # what the restart re-applied concerns no command of this run
        return member

    def stop(self) -> None:
        """Ask the loop to drain and exit (safe from signal handlers and other threads)."""
        self._stop_requested = True

    def run(self) -> None:
        """Serve until `stop()`; then drain in-flight commands and close the sockets."""
        core, clients, nodes, events = self.core, self._clients, self._nodes, self._events
        poller = zmq.Poller()
        poller.register(clients, zmq.POLLIN)
        poller.register(nodes, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        member = self.member
        peer_sockets = tuple(member.sockets) if member is not None else ()
        for sock in peer_sockets:
            poller.register(sock, zmq.POLLIN)
        clock = self._clock
        next_tick = clock() + TICK_S
        next_refresh = next_snapshot = next_tick
        drain_deadline: float | None = None
        if self.monitor is not None:
            self.monitor.start()
        try:
            while True:
                wait = next_tick - clock()
                if member is not None:
                    wait = min(wait, member.next_tick_in(time.monotonic()))
                # Whole milliseconds, rounded up: rounded down, the last millisecond before
                # every tick was spent in polls that return at once (0.4 empty turns per
                # message at 1,200 calls/s, and idle CPU 20 times a second).
                ready = dict(poller.poll(math.ceil(max(0.0, wait) * 1000)))
                if clients in ready:
                    self._drain(clients, core.client_message)
                if nodes in ready:
                    self._drain(nodes, core.node_message)
                if events in ready:
                    self._upstream()
                if member is not None:
                    self._cluster_turn(member, [s for s in peer_sockets if s in ready])
                now = clock()
                if now >= next_tick:
                    next_tick = now + TICK_S
                    self._send(core.tick(now))
                    self._publish()
                    if self._zap is not None and now >= next_refresh:
                        next_refresh = now + REFRESH_S
                        self._zap.reload_if_changed()  # keys added or removed by the operator
                    if self._watch is not None and now >= next_snapshot:
                        next_snapshot = now + SNAPSHOT_S
                        self._snapshot(now)
                    if self._stop_requested and drain_deadline is None:
                        core.begin_drain()
                        drain_deadline = now + self.drain_timeout
                        log.info("draining %d in-flight commands", len(core.commands))
                    if drain_deadline is not None and (core.drained or now >= drain_deadline):
                        if not core.drained:
                            log.warning("stopped with %d commands unanswered", len(core.commands))
                        break
        finally:
            self.close()

    def _cluster_turn(self, member: ClusterMember, readable: list[zmq.Socket]) -> None:
        """Peer messages in, proposals out, ticks, then act on what committed."""
        for sock in readable:
            member.on_readable(sock)
        now = self._clock()
        if member.leader != self._leader:
            self._leader = member.leader
            if self._leader is not None:
                self.core.leader_changed()
        for record in self.core.take_proposals(now):
            try:
                member.propose(record)
            except MeshError as err:  # an outcome over the proposal limit: never committed
                self.core.counters["proposals_refused"] += 1
                log.warning("cluster: a proposal was refused: %s", err.message)
        member.tick(time.monotonic())
        member.process()
        out = self.core.apply_shared(now)
        if out:
            self._send(out)
        self._publish()  # committed events reach subscribers now, not at the next tick
        self._note_cluster_policy()
        if self._keyring_path is not None and now >= self._keyring_check:
            self._keyring_check = now + 1.0
            self._say_keyring(self._watch_keyring(self._keyring_path, now))

    def _watch_keyring(self, path: Path, now: float) -> str | None:
        """Offer this machine's payload key ring to the cluster when it changed (a rotation
        made here); what is wrong with it, if anything (a rotation made elsewhere whose
        file was not copied here, so clients and nodes here cannot decrypt; a bad file)."""
        from ..security.payload import KeyRingFile

        try:
            if self._keyring is None:
                if not path.exists():  # only payload encryption (level 2 and up) needs one
                    return None
                self._keyring = KeyRingFile(path, interval=0.0)  # this method runs once a second
            ring = self._keyring.current(now).metadata()  # read again when the file changed
            if ring != self._keyring_offered:
                self._keyring_offered = ring
                self.core.offer_keyring(ring, now)
        except (MeshError, ValueError, OverflowError) as exc:
            return f"cluster: the key ring in {path} cannot be shared with the cluster: {exc}"
        if self._keyring.error is not None:
            return f"cluster: the key ring in {path} is kept as last read: {self._keyring.error.message}"
        committed = self.core.once.shared.keyring if self.core.once is not None else None
        if committed is None:
            return None
        missing = sorted(
            kid for kid, times in committed["keys"].items()
            if kid not in ring["keys"] and (times["retire_at"] is None or times["retire_at"] > now)
        )
        if missing:
            return (
                f"cluster: the key ring in {path} lacks key(s) {', '.join(missing)} of the cluster's key ring "
                f"(generation {committed['generation']}): copy the newest keyring.json here, or clients and "
                "nodes using this file cannot decrypt"
            )  # fmt: skip
        return None

    def _say_keyring(self, problem: str | None) -> None:
        """Log each key-ring problem once, again only after it went away and came back."""
        if problem is not None and problem != self._keyring_said:
            log.warning("%s", problem)
        self._keyring_said = problem

    def _note_cluster_policy(self) -> None:
        """Say once that an edited policy file is not what is in force: the cluster's log is."""
        own = self._own_policy
        if own is None or self.core.security is None or self.core.security.gate.policy.text == own.text:
            return
        self._own_policy = None
        log.warning(
            "cluster: the access policy in force is the one from %s, not %s, which differs; "
            "change the cluster's policy with `mesh policy set FILE`",
            self.core.security.gate.policy.source, own.source,
        )

    def _drain(self, sock: zmq.Socket, handle: Callable[..., list[Outgoing]]) -> None:
        """Handle up to BATCH waiting messages, then send what they produced in one burst.

        One burst per batch wakes each peer's I/O thread once rather than once per message.
        """
        now = self._clock()
        pending: list[Outgoing] = []
        secure = self.core.security is not None
        # With the monitor on, time the first reply of a node batch now and then.
        probe = sock is self._nodes and now >= self._next_sample
        for _ in range(BATCH):
            try:
                if secure:
                    frames, user, address = recv_frames_from(sock)
                else:
                    frames = recv_frames(sock)
            except zmq.Again:
                break
            if probe:
                probe = False
                self._sample(frames, now)
            try:
                if secure:
                    pending += handle(frames[0], frames[1:], now, Peer(user, address))
                else:
                    pending += handle(frames[0], frames[1:], now)
            except Exception:  # a bug in the core must not take the broker down for everyone
                self.core.counters["internal_errors"] += 1
                log.exception("internal error handling a message (dropped, not answered)")
        if pending:
            self._send(pending)
        self._publish()

    def _sample(self, frames: list[bytes], now: float) -> None:
        assert self._watch is not None
        self._next_sample = now + SAMPLE_S
        latency = reply_latency(self.core, frames[1:], now)
        if latency is not None:
            self._watch.observe(latency)

    def _snapshot(self, now: float) -> None:
        """Build the monitor's snapshot here, in the core's thread, and hand it over."""
        assert self._watch is not None and self.monitor is not None
        try:
            snap = self._watch.snapshot(
                self.core, now, messages_out=self._sent, usage=process_usage(),
                cluster=self.member.status() if self.member is not None else None,
            )  # fmt: skip
        except Exception:  # a bug in the monitor must not take the broker down
            log.exception("monitor snapshot failed")
            return
        self.monitor.publish(snap)

    def _upstream(self) -> None:
        """Subscriptions and drop reports from subscribers (single frames)."""
        now = self._clock()
        events = self._events
        secure = self.core.security is not None
        for _ in range(BATCH):
            try:
                if secure:
                    frames, user, address = recv_frames_from(events)
                else:
                    frames, user, address = recv_frames(events), None, None
            except zmq.Again:
                self._aligned = True  # both of libzmq's queues are empty again
                break
            if len(frames) != 1 or frames[0][:1] not in (b"\x00", b"\x01"):
                # libzmq (4.3.5 and later) queues such a message without its link, so each
                # read after it takes the link of the next message: until the queue is empty,
                # a SUBSCRIBE would reach another subscriber's link.
                self._aligned = False
            try:
                applied = self.core.subscriber_message(frames[0], now, Peer(user, address), self._aligned)
            except Exception:  # a bug in the core must not take the broker down for everyone
                self.core.counters["internal_errors"] += 1
                log.exception("internal error handling a subscription (not applied)")
                continue
            # Manual mode: a filter applies to the link of the last message read, so now.
            for item in applied:
                events.setsockopt(zmq.SUBSCRIBE if item.subscribe else zmq.UNSUBSCRIBE, item.filter)
        self._publish()

    def _publish(self) -> None:
        for frames in self.core.take_published():
            send_frames(self._events, frames)  # XPUB drops for a full subscriber, never blocks

    def _send(self, out: list[Outgoing]) -> None:
        sockets = self._sockets
        while out:
            self._sent += len(out)
            follow_up: list[Outgoing] = []
            gone: set[tuple[Side, bytes]] = set()
            for i, (side, ident, frames) in enumerate(out):
                if (side, ident) in gone:
                    continue
                try:
                    send_frames(sockets[side], frames, ident)
                except zmq.ZMQError as exc:
                    if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                        raise
                    gone.add((side, ident))
                    rest = [f for s, p, f in out[i + 1 :] if s is side and p == ident]
                    follow_up.extend(self.core.undeliverable(side, ident, frames, self._clock(), more=rest))
            out = follow_up

    def close(self) -> None:
        """Close the sockets, giving the last replies `LINGER_MS` to leave."""
        self._clients.close(linger=LINGER_MS)
        self._nodes.close(linger=LINGER_MS)
        self._events.close(linger=0)
        if self.member is not None:
            self.member.close()
        if self.monitor is not None:
            self.monitor.close()
        if self._zap is not None:
            self._zap.stop()
        self._ctx.term()
