"""The broker's routing decisions, without sockets or clocks.

Rules of this module:

* The loop feeds whole ZeroMQ messages in (`client_message`, `node_message`), calls
  `tick` now and then, and reports sends that failed (`undeliverable`). Each returns the
  messages to send as `(side, identity, frames)` tuples. Time comes in as `now`.
* Only header frames are decoded. Payload frames are forwarded as the same bytes objects.
* Every accepted command is answered exactly once: by its node, or by the broker with an
  error (no handler, deadline, capacity, node lost, shutting down); `commands.py` keeps
  them.
* A resend (same client, same id) never runs twice: one still in flight waits for the
  first copy's answer; one the broker already answered with its node's reply gets that
  reply again from `RecentReplies` (bounded by count, age and bytes). Broker-made errors
  and the node errors that prove the command never started (RESOURCE_EXHAUSTED,
  UNAVAILABLE, which clients retry by themselves) are not remembered.
* Every message from a node proves it alive (`nodes.py` keeps up/suspect/dead). Time
  the broker itself was paused does not count as a node's silence (registry.py; the
  tick that sees it publishes `mesh.broker.resumed`).
* Bad input is answered with an error when the sender is known, and counted otherwise;
  it never raises out of this module.
* With security on (a `BrokerSecurity`), every client message passes the `Gate` first
  (token, replay, level, policy) and a node may register only the services the policy
  gives its CURVE identity; refusals are answered with their security code. The loop
  says who sent each message (`Peer`: the CURVE key's name and the IP address).
* Events from clients and nodes are sequenced by the event bus (`events.py`) and
  acknowledged to their publisher with their sequence number; what the broker itself
  has to tell (nodes and services coming and going, failed commands) it publishes as
  `mesh.*` events, with ids and codes only, never payloads. Everything for subscribers
  collects in `take_published()`, which the loop empties after each batch, like h2's
  `data_to_send()`: replies and publications are separate streams.
* In a cluster (`join_cluster`), exactly-once commands, events, revocations and the
  policy go through the replicated log first (`replicated.py`).

Wire shapes (docs/protocol.md has the byte-level spec):
  client -> broker   [header, payload]
  broker -> node     [envelope, header, payload]   envelope = the client's identity;
                     [envelope, header, payload, sender] with security on: sender = the
                                                   client's CURVE key name, for signatures
  node -> broker     [envelope, header, payload]   envelope = b"" for the node's own commands
                                                   and events
  broker -> subscribers [topic + ".", header, payload]   (from take_published())
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Final

from ...cluster.shared import SharedState
from ...protocol import (
    BadFormatError,
    CommandEvent,
    CommandState,
    DeadlineExceededError,
    HandlerNotFoundError,
    InternalError,
    InvalidStateError,
    MeshError,
    MessageTooLargeError,
    UnavailableError,
    check_size,
    peek_header,
    unpack_header,
)
from ...protocol.names import SYSTEM_SERVICE
from ...security.gate import Peer
from ..config import BrokerConfig
from ..events import EventBus
from ..once import OnceTable, once_key
from ..registry import NodeInfo, Registry
from ..subscribers import Apply, Subscribers
from .commands import CommandBook, Key
from .nodes import Nodes
from .replicated import Replicated
from .state import (
    NOBODY,
    BrokerSecurity,
    Command,
    ConnectionState,
    Outgoing,
    Side,
    correlation,
    error_frames,
    event_ack,
    event_refused,
    ran_on,
    readable_id,
    to_peer,
)
from .system import NODE_ACTIONS, System

__all__ = ["Broker"]

_REPLY_TYPES: Final = frozenset({"response", "error"})
CLIENT_IDLE_S: Final = 300.0  # a client with nothing pending, silent this long, is forgotten
CLIENT_SWEEP_S: Final = 10.0


class Broker:
    """Routing core: commands in, dispatches and replies out.

    It composes the parts that decide: `book` (the commands: tracking, queues, dispatch,
    deadlines, node loss), `nodes` (registration and health), `system` (the `mesh.*`
    actions) and `replicated` (the cluster's shared state); this class reads messages
    and hands each to its part.
    """

    def __init__(self, config: BrokerConfig | None = None, security: BrokerSecurity | None = None) -> None:
        self.config = config or BrokerConfig()
        self.security = security
        self.registry = Registry()
        self.clients: dict[bytes, ConnectionState] = {}
        self.node_links: dict[bytes, ConnectionState] = {}
        self.counters: Counter[str] = Counter()
        self.draining = False
        self._next_sweep = 0.0
        self.events = EventBus(
            self.config.retention,
            max_topics=self.config.max_topics,
            max_retained_bytes=self.config.max_retained_bytes,
            name=self.config.name,
        )
        self.subscribers = Subscribers(self.events, security.gate if security is not None else None)
        self._published: list[list[bytes]] = []  # for subscribers, until the loop takes them
        self.book = CommandBook(self.config, self.registry, self.clients, self.counters, self._emit)
        self.nodes = Nodes(self.config, security, self.registry, self.node_links, self.counters, self._emit)
        self.replicated = Replicated(
            self.config, security, self.registry, self.book, self.counters, self._published_frames
        )
        links = {Side.CLIENT: self.clients, Side.NODE: self.node_links}
        self.system = System(
            self.config, security, self.registry, self.events, links, self.counters, self.nodes,
            self.replicated, self.stats,
        )  # fmt: skip
        # The book's tables, under the names the loop, the monitor and tests read.
        self.commands: dict[Key, Command] = self.book.commands
        self.queues: dict[tuple[str, str], deque[Command]] = self.book.queues
        self.recent = self.book.recent

    @property
    def queued(self) -> int:
        """How many commands wait in queues for a node."""
        return self.book.queued

    @property
    def once(self) -> OnceTable | None:
        """The exactly-once table, with a cluster (`join_cluster`); None without."""
        return self.replicated.once

    @property
    def events_endpoint(self) -> str | None:
        """The events endpoint `mesh.ping` tells clients (set by the loop)."""
        return self.system.events_endpoint

    @events_endpoint.setter
    def events_endpoint(self, value: str | None) -> None:
        self.system.events_endpoint = value

    # ---------------------------------------------------------------- cluster

    def join_cluster(self, shared: SharedState, now: float, *, run: int) -> None:
        """Run exactly-once actions, events, revocations and the access policy through the
        cluster's replicated `shared` state.

        With security on, the policy committed in the log is the one in force; this
        broker proposes the one it read at start, which counts only if none is committed.

        Args:
            shared: the cluster's replicated state machine.
            now: the current time.
            run: higher on every start of this broker (`once.next_run`), so that a claim
                proposed by an earlier run is never taken for one of this run.
        """
        self.replicated.join_cluster(shared, now, run=run)

    def offer_keyring(self, ring: dict[str, Any], now: float) -> bool:
        """This broker's copy of the payload key ring's metadata (`KeyRing.metadata()`):
        proposed to the cluster when it is of a later generation than the one in force
        (a rotation made here).

        Returns:
            Whether it was proposed.

        Raises:
            ValueError: the metadata is not of a ring the cluster can hold (`check_ring`).
        """
        return self.replicated.offer_keyring(ring, now)

    def leader_changed(self) -> None:
        """The cluster has a new leader: propose again what is not committed yet."""
        if self.once is not None:
            self.once.propose_again()

    def take_proposals(self, now: float) -> list[bytes]:
        """Records for the replicated log since the last call (and those due again)."""
        return self.once.take_proposals(now) if self.once is not None else []

    def apply_shared(self, now: float) -> list[Outgoing]:
        """Act on what the replicated log committed since the last call."""
        return self.replicated.apply(now)

    def take_published(self) -> list[list[bytes]]:
        """The messages for subscribers (events, sync markers) since the last call, in order."""
        out, self._published = self._published, []
        return out

    def _published_frames(self, frames: list[bytes]) -> None:
        self._published.append(frames)

    def _emit(self, topic: str, body: dict[str, Any], now: float) -> None:
        self._published.append(self.events.emit(topic, body, now))

    # ----------------------------------------------------------------- clients

    def client_message(
        self, ident: bytes, frames: Sequence[bytes], now: float, peer: Peer = NOBODY
    ) -> list[Outgoing]:
        """A message from a client's DEALER: a command, an event to publish or a cancel."""
        conn = self._touch(self.clients, ident, now)
        try:
            header = self._decode(frames, 2)
        except MeshError as err:
            self.counters["malformed"] += 1
            # Name the command when its id is readable, so the client can match the error.
            return [(Side.CLIENT, ident, error_frames(err, now, readable_id(frames)))]
        cid: str = header["id"]
        conn.last_message_id = cid
        mtype = header["type"]
        identity = None
        if self.security is not None and mtype in ("command", "event"):
            gate = self.security.gate
            try:
                identity = (gate.admit_command if mtype == "command" else gate.admit_event)(header, peer, now)
            except MeshError as err:
                return [(Side.CLIENT, ident, error_frames(err, now, cid))]
        if mtype == "command":
            return self._command(ident, conn, header, frames, now, identity, peer)
        if mtype == "event":
            return self._publish(Side.CLIENT, ident, header, frames[1], now, peer.user)
        if mtype == "cancel":
            return self.book.cancel(ident, header["correlation_id"], frames[0], now)
        self.counters["malformed"] += 1
        refusal = InvalidStateError(f"clients send commands, events and cancels; got {mtype}", details={"field": "type"})
        return [(Side.CLIENT, ident, error_frames(refusal, now, cid))]

    def _command(
        self, ident: bytes, conn: ConnectionState, header: dict[str, Any], frames: Sequence[bytes], now: float,
        identity: Any, peer: Peer,
    ) -> list[Outgoing]:  # fmt: skip
        """A client's command: answered by the broker (`mesh.*`), again (a resend), refused,
        or tracked and routed."""
        self.counters["commands_received"] += 1
        cid: str = header["id"]
        service: str = header["service"]
        action: str = header["action"]
        if service == SYSTEM_SERVICE:
            return self.system.answer(ident, frames[0], frames[1], now, Side.CLIENT, identity=identity, peer=peer)
        key = (ident, cid)
        if key in self.commands:
            # The client resent a command still in flight: the first copy will answer.
            self.counters["duplicates"] += 1
            return []
        answered = self.recent.get(key, now)
        if answered is not None:
            # Answered already (the reply was lost, or the client gave up and resent it).
            self.counters["replayed"] += 1
            return [(Side.CLIENT, ident, answered)]
        deadline = header.get("deadline")
        refused = self._refused(ident, cid, service, action, deadline, now)
        if refused is not None:
            return refused
        if deadline is None:
            deadline = now + self.config.default_timeout
        cmd = Command(ident, cid, service, action, frames[0], frames[1], deadline, now)
        if self.security is not None and peer.user is not None:
            cmd.sender = peer.user.encode()
        if self.once is not None and self.registry.exactly_once(service, action):
            subject = getattr(identity, "subject", None)
            return self.replicated.command(cmd, conn, once_key(cid, service, action, subject), now)
        return self.book.route(cmd, conn, now)

    def _refused(
        self, ident: bytes, cid: str, service: str, action: str, deadline: float | None, now: float
    ) -> list[Outgoing] | None:
        """The answer to a new command the broker will not route, or None to route it."""
        if self.draining:
            return self.book.refuse(ident, cid, UnavailableError("broker is shutting down"), now)
        if deadline is not None and deadline <= now:
            err: MeshError = DeadlineExceededError("deadline passed before routing")
            return self.book.refuse(ident, cid, err, now, "timed_out", (service, action))
        if not self.registry.offers(service, action):
            what = "action" if self.registry.has_service(service) else "service"
            err = HandlerNotFoundError(
                f"no node offers {service}.{action}",
                details={"service": service, "action": action, "missing": what},
            )
            return self.book.refuse(ident, cid, err, now, command=(service, action))
        return None

    # ------------------------------------------------------------------ events

    def _publish(
        self, side: Side, ident: bytes, header: dict[str, Any], payload: bytes, now: float, sender: str | None = None
    ) -> list[Outgoing]:
        """Sequence a publisher's event; acknowledge it with its number (or refuse it).

        `sender` is the publisher's CURVE key name (security on), stamped for subscribers.

        In a cluster the event goes through the replicated log first: every broker
        numbers it when it is committed, and the publisher's acknowledgement waits for that.
        """
        try:
            if self.once is not None:
                return self.replicated.propose_event(side, ident, header, payload, now, sender)
            seq, frames = self.events.publish(header, payload, sender)
        except MeshError as err:
            return [event_refused(self.counters, side, ident, header, err, now)]
        self._published.append(frames)
        return [event_ack(side, ident, header, seq, now)]

    # ------------------------------------------------------------------- nodes

    def node_message(
        self, ident: bytes, frames: Sequence[bytes], now: float, peer: Peer = NOBODY
    ) -> list[Outgoing]:
        """A message from a handler node's DEALER: a reply, a `mesh.*` command or an event."""
        link = self._touch(self.node_links, ident, now)
        node = self.registry.nodes.get(ident)
        if node is not None:
            self.nodes.heard(node, now)
        try:
            header = self._decode(frames, 3)
        except MeshError as err:
            self.counters["malformed"] += 1
            return self._bad_node_message(link, ident, node, frames, err, now)
        link.last_message_id = header["id"]
        if not frames[0]:
            return self._node_own(ident, header, frames, now, peer)
        return self._node_reply(link, ident, node, header, frames, now)

    def _bad_node_message(
        self, link: ConnectionState, ident: bytes, node: NodeInfo | None, frames: Sequence[bytes], err: MeshError,
        now: float,
    ) -> list[Outgoing]:  # fmt: skip
        """A node's message that does not decode: the node is told, and when it was meant
        as a reply the broker still owes a client, that client is answered now instead of
        waiting out its deadline for a reply it cannot get."""
        out = [to_peer(Side.NODE, ident, error_frames(err, now, None))]
        key = _key_of_bad_reply(link, frames)
        if key is None:
            return out
        self.book.settle(link, ident, key)  # the node is done with it: its slot is free
        cmd = self.commands.get(key)
        if cmd is not None and cmd.state is CommandState.DISPATCHED and ran_on(cmd, ident):
            if not isinstance(err, MessageTooLargeError):
                # The peer caused it, not the mesh (as h11 splits remote from local errors).
                err = InternalError(f"the node sent an unusable reply: {err.message}",
                                    details={"cause": "node_reply", "problem": int(err.code)})
            out.append(self.book.fail(cmd, err, now, CommandEvent.FAIL))
        if node is not None:
            out.extend(self.book.drain_queues(node))
        return out

    def _node_own(
        self, ident: bytes, header: dict[str, Any], frames: Sequence[bytes], now: float, peer: Peer
    ) -> list[Outgoing]:
        """A node's own message (empty envelope): a `mesh.*` command, an event, or an
        acknowledgement of something the broker sent it."""
        mtype = header["type"]
        if mtype == "command" and header["service"] == SYSTEM_SERVICE:
            identity = None
            if self.security is not None and header["action"] not in NODE_ACTIONS:
                # Anything but the node protocol is checked as on the client port: a
                # node key alone opens no more than a client key does.
                try:
                    identity = self.security.gate.admit_command(header, peer, now)
                except MeshError as err:
                    return [to_peer(Side.NODE, ident, error_frames(err, now, header["id"]))]
            out = self.system.answer(ident, frames[1], frames[2], now, Side.NODE, identity=identity, peer=peer)
            out.extend(self.book.after_registry_change(self.registry.nodes.get(ident), now))
            return out
        if mtype == "event":
            if self.security is not None:
                try:
                    self.security.gate.admit_node_event(header, peer, now)
                except MeshError as err:
                    return [event_refused(self.counters, Side.NODE, ident, header, err, now)]
            return self._publish(Side.NODE, ident, header, frames[2], now, peer.user)
        if mtype in _REPLY_TYPES:
            return []  # a node acknowledging something the broker sent it
        self.counters["malformed"] += 1
        refusal = HandlerNotFoundError("nodes may only send replies, events and mesh.* commands", details={"field": "type"})
        return [to_peer(Side.NODE, ident, error_frames(refusal, now, header["id"]))]

    def _node_reply(
        self, link: ConnectionState, ident: bytes, node: NodeInfo | None, header: dict[str, Any],
        frames: Sequence[bytes], now: float,
    ) -> list[Outgoing]:  # fmt: skip
        """A node's reply (or progress report) for a client's command."""
        mtype = header["type"]
        envelope = frames[0]
        correlation_id = header.get("correlation_id")
        if mtype not in _REPLY_TYPES or correlation_id is None:
            if mtype == "progress":
                return self._progress(link, ident, envelope, correlation_id, frames)
            self.counters["malformed"] += 1
            err = BadFormatError("a reply must be a response or error with a correlation_id")
            return [to_peer(Side.NODE, ident, error_frames(err, now, header["id"]))]
        key = (envelope, correlation_id)
        answer = [frames[1], frames[2]]
        if key not in link.pending_commands:
            # A reply this node does not owe (a duplicate, or for someone else's command):
            # in a cluster, maybe its copy of an exactly-once reply sent to every broker.
            if self.once is None or not self.replicated.copy(node, correlation_id, header, answer, now):
                self.counters["unexpected_replies"] += 1
            return []
        self.book.settle(link, ident, key)
        if self.once is not None and key in self.once.running:
            out = self.replicated.reply(key, ident, header, answer, now)
        else:
            out = self.book.complete(key, ident, header, answer, now)
        if node is not None:
            out.extend(self.book.drain_queues(node))
        return out

    def _progress(
        self, link: ConnectionState, ident: bytes, envelope: bytes, cid: str | None, frames: Sequence[bytes]
    ) -> list[Outgoing]:
        """A node's progress report on a command it runs: passed to the client as it is.

        One without a correlation id matches no pending command, so it counts as stray.
        """
        cmd = self.commands.get((envelope, cid)) if cid is not None else None
        if cmd is None or (envelope, cid) not in link.pending_commands or not ran_on(cmd, ident):
            self.counters["stray_progress"] += 1
            return []
        self.counters["progress"] += 1
        return [(Side.CLIENT, envelope, [frames[1], frames[2]])]

    # ---------------------------------------------------------- time and loss

    def tick(self, now: float) -> list[Outgoing]:
        """Expire commands past their deadline and nodes past their liveness window.

        Also forgets clients, links of unregistered nodes and subscribers' reports, long
        gone quiet.
        """
        if now >= self._next_sweep:
            self._sweep(now)
        self.recent.expire(now)
        out: list[Outgoing] = []
        if self.once is not None:
            out.extend(self.replicated.overdue(now))
            self.once.forget_done(self.commands)
        paused = self.registry.turn(now)
        if paused:  # this broker was paused: its nodes get a whole window from now (registry.py)
            self.counters["self_pauses"] += 1
            self._emit("mesh.broker.resumed", {"broker": self.config.name, "paused_s": round(paused, 3)}, now)
        for ident in self.nodes.check_health(now):
            self.counters["nodes_expired"] += 1
            out.extend(self._lose_node(ident, set(), now, "silent"))
        out.extend(self.book.expire(now))
        return out

    def _sweep(self, now: float) -> None:
        """Forget clients and node links idle past CLIENT_IDLE_S, with nothing pending."""
        self.events.forget_quiet(now, CLIENT_IDLE_S)
        self._next_sweep = now + CLIENT_SWEEP_S
        for table in (self.clients, self.node_links):
            idle = [
                ident
                for ident, st in table.items()
                if not st.pending_commands
                and now - st.last_activity > CLIENT_IDLE_S
                and ident not in self.registry.nodes
            ]
            for ident in idle:
                del table[ident]

    def undeliverable(
        self,
        side: Side,
        ident: bytes,
        frames: Sequence[bytes],
        now: float,
        *,
        more: Sequence[Sequence[bytes]] = (),
    ) -> list[Outgoing]:
        """The loop could not send `frames` (nor `more`, the rest of its batch) to `ident`.

        The peer is gone. A client's commands are abandoned; a node's commands that never
        reached it are routed again, the ones it was running are answered NODE_LOST.
        """
        self.counters["undeliverable"] += 1 + len(more)
        if side is Side.CLIENT:
            conn = self.clients.pop(ident, None)
            if conn is not None:
                for cid in list(conn.pending_commands):
                    self.book.abandon(ident, cid)
            return []
        unsent = {(f[0], correlation(f)) for f in (frames, *more) if len(f) == 3 and f[0]}
        return self._lose_node(ident, unsent, now)

    def _lose_node(self, ident: bytes, unsent: set[Key], now: float, reason: str = "unreachable") -> list[Outgoing]:
        """Forget a node that is gone and settle what it owed (`CommandBook.node_lost`)."""
        link = self.node_links.pop(ident, None)
        self.nodes.forget(ident, reason, now)
        owed = link.pending_commands if link is not None else set()
        if self.once is not None:
            for key in owed:
                self.once.running.pop(key, None)
        return self.book.node_lost(ident, owed, unsent, now)

    # ---------------------------------------------------------------- shutdown

    def subscriber_message(self, frame: bytes, now: float, peer: Peer = NOBODY, aligned: bool = True) -> list[Apply]:
        """A message from the XPUB socket: a subscriber's (un)subscription or drop report.

        Args:
            frame: the message.
            now: the current time.
            peer: who sent it.
            aligned: whether libzmq would apply a filter to the link that sent this
                message (`Subscribers.upstream`).

        Returns:
            The filters the loop must apply at once to the link that sent it (the
            socket is in manual mode: nothing is subscribed unless returned here).
        """
        applied, markers = self.subscribers.upstream(frame, peer, now, aligned)
        self._published.extend(markers)
        return applied

    def begin_drain(self) -> None:
        """Stop accepting commands; those already accepted still complete."""
        self.draining = True

    @property
    def drained(self) -> bool:
        """Whether a draining broker has answered every command it accepted."""
        return self.draining and not self.commands

    # ----------------------------------------------------------------- helpers

    def _touch(self, table: dict[bytes, ConnectionState], ident: bytes, now: float) -> ConnectionState:
        """The connection state of a peer that just sent a message, updated."""
        conn = table.get(ident)
        if conn is None:
            conn = table[ident] = ConnectionState()
        conn.is_connected = True
        conn.message_count += 1
        conn.last_activity = now
        self.counters["messages_in"] += 1
        return conn

    def _decode(self, frames: Sequence[bytes], count: int) -> dict[str, Any]:
        if len(frames) != count:
            raise BadFormatError(f"expected {count} frames, got {len(frames)}", details={"frames": len(frames)})
        check_size(frames, self.config.max_message_bytes)
        return unpack_header(frames[-2])

    def stats(self) -> dict[str, Any]:
        """Counters and sizes for monitoring."""
        return {
            "counters": dict(self.counters),
            "in_flight": len(self.commands),
            "queued": self.queued,
            "nodes": len(self.registry.nodes),
            "suspect_nodes": sum(1 for n in self.registry.nodes.values() if n.suspect),
            "recent_replies": len(self.recent),
            "clients": len(self.clients),
            "events": {**self.events.stats(), "subscriptions": self.subscribers.in_force,
                       "filters": self.subscribers.stats()},  # fmt: skip
            **({"security": self.security.gate.stats()} if self.security is not None else {}),
            **({"exactly_once": self.once.stats(), "keyring": self.once.shared.keyring} if self.once is not None else {}),
        }


def _key_of_bad_reply(link: ConnectionState, frames: Sequence[bytes]) -> Key | None:
    """The owed command a node's unusable reply was meant for, if it can still be told."""
    if len(frames) != 3 or not frames[0]:
        return None
    cid = peek_header(frames[1], "correlation_id")
    key = (frames[0], cid)
    return key if isinstance(cid, str) and key in link.pending_commands else None
