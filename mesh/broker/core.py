"""The broker's routing decisions, without sockets or clocks.

Rules of this module:

* The loop feeds whole ZeroMQ messages in (`client_message`, `node_message`), calls
  `tick` now and then, and reports sends that failed (`undeliverable`). Each returns the
  messages to send as `(side, identity, frames)` tuples. Time comes in as `now`.
* Only header frames are decoded. Payload frames are forwarded as the same bytes objects.
* Every accepted command is answered exactly once: by its node, or by the broker with an
  error (no handler, deadline, capacity, node lost, shutting down).
* A resend (same client, same id) never runs twice: one still in flight waits for the
  first copy's answer; one the broker already answered with its node's reply gets that
  reply again from `RecentReplies` (bounded by count, age and bytes). Broker-made errors
  and the node errors that prove the command never started (RESOURCE_EXHAUSTED,
  UNAVAILABLE, which clients retry by themselves) are not remembered.
* Every message from a node proves it alive. `tick` makes a node silent past 1.5
  heartbeat intervals suspect (`mesh.node.suspect`; `pick` then prefers other nodes) and
  one silent past its liveness window dead (`mesh.node.down`); a suspect node that
  speaks again is `mesh.node.recovered`. Heartbeats carry the node's load report. Time
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

from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from ..link.health import PeerEvent
from ..protocol import (
    MAX_MESSAGE_BYTES,
    BadFormatError,
    CancelledError,
    CommandEvent,
    CommandState,
    DeadlineExceededError,
    AccessDeniedError,
    ErrorCode,
    HandlerNotFoundError,
    InternalError,
    MessageTooLargeError,
    Header,
    InvalidStateError,
    MeshError,
    NetworkError,
    NodeLostError,
    ResourceExhaustedError,
    UnavailableError,
    ValidationFailedError,
    advance,
    check_size,
    decode_header,
    peek_header,
    unpack_header,
    decode_payload,
    new_id,
    encode_header,
    encode_payload,
    encode_response_header,
    error_header,
    response_to,
)
from ..protocol.names import ID_MATCH, SYSTEM_SERVICE
from ..security.gate import Gate, Peer
from ..cluster.messages import MAX_PROPOSAL_BYTES
from ..cluster.shared import (
    Claimed,
    Committed,
    Forgotten,
    KeyRingSet,
    PolicySet,
    Published,
    Restored,
    Revoked,
    RunStarted,
    SharedState,
    check_ring,
    event_record,
    keyring_digest,
    keyring_record,
    parse_claimant,
    policy_digest,
    policy_record,
)
from ..security.policy import PolicyError, policy_from_text
from .events import DEFAULT_RULE, EventBus, RetentionRule, check_publishable
from .once import OnceTable, event_key, keyring_key, once_key, policy_key, revoke_key
from .registry import NodeInfo, Registry, parse_load, parse_page_request, silence_event
from .subscribers import Apply, Subscribers

__all__ = ["Side", "Outgoing", "BrokerConfig", "Broker", "Command", "ConnectionState", "RecentReplies"]

_REPLY_TYPES: Final = frozenset({"response", "error"})
CLIENT_IDLE_S: Final = 300.0  # a client with nothing pending, silent this long, is forgotten
CLIENT_SWEEP_S: Final = 10.0
_NODE_ACTIONS: Final = frozenset({"register", "unregister", "heartbeat"})
_NOBODY: Final = Peer()
# Node errors that prove the command never ran: clients resend these with the same id
# (see client.AUTO_RETRY), so remembering them would turn every retry into the refusal.
_NEVER_STARTED: Final = frozenset({int(ErrorCode.RESOURCE_EXHAUSTED), int(ErrorCode.UNAVAILABLE)})
MAX_UNCOMMITTED_EVENTS: Final = 10_000  # in a cluster: events waiting for their commit
MAX_POLICY_CHANGES: Final = 100  # in a cluster: mesh.policy calls waiting for their commit
# System answers larger than this must be acknowledged (`Broker._large_answer`).
LARGE_ANSWER_BYTES: Final = 16 * 1024
MAX_UNREAD_ANSWERS: Final = 4
# An exactly-once reply goes into one log entry with its key and framing.
MAX_OUTCOME_REPLY_BYTES: Final = MAX_PROPOSAL_BYTES - 64 * 1024


class Side(IntEnum):
    """Which of the broker's two sockets a message comes from or goes to."""

    CLIENT = 0
    NODE = 1


Outgoing = tuple[Side, bytes, list[bytes]]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Limits of one broker (set from the topology's `[brokers.NAME]` table)."""

    name: str = "broker"
    queue_limit: int = 1024
    default_timeout: float = 30.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    retention: tuple[RetentionRule, ...] = (DEFAULT_RULE,)
    max_topics: int = 10_000
    max_retained_bytes: int = 64 * 1024 * 1024
    event_hwm: int = 10_000  # events queued per subscriber before it starts missing some
    # Answered commands remembered for resends: this many, this long, this many bytes.
    recent_replies: int = 10_000
    recent_reply_s: float = 60.0
    recent_reply_bytes: int = 64 * 1024 * 1024


@dataclass(slots=True)
class BrokerSecurity:
    """What a broker needs when security is on: the gate, and what renews and revokes tokens."""

    gate: Gate
    issuer: Any = None  # tokens.TokenIssuer, for mesh.renew
    revocations: Any = None  # revocations.Revocations, for mesh.revoke
    renew_ttl: float = 3600.0


@dataclass(slots=True)
class ConnectionState:
    """The seed's ProtocolState, kept per connected client and node.

    `pending_commands` holds command ids for a client, and (client, id) keys for a node:
    the replies that node still owes, which is what its capacity is counted against.
    """

    is_connected: bool = True
    last_message_id: str | None = None
    pending_commands: set[Any] = field(default_factory=set)
    message_count: int = 0
    last_activity: float = 0.0
    unread: deque[str] = field(default_factory=deque)  # nonces of large answers not acknowledged


class RecentReplies:
    """The replies to recently finished commands, so that a resend gets the same answer.

    Bounded three ways, oldest first: at most `max_entries` replies, none older than
    `max_age` seconds, at most `max_bytes` of frames (a reply larger than that is not
    kept). Frames are kept as the same bytes objects, never copied. Time comes in as
    `now`; entries are ordered by when they were stored, so a clock that steps back
    only delays their expiry.
    """

    def __init__(self, max_entries: int, max_age: float, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[float, list[bytes], int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, now: float) -> list[bytes] | None:
        """The frames stored for `key`, unless they are older than `max_age`."""
        item = self._items.get(key)
        if item is None or now - item[0] > self.max_age:
            return None
        return item[1]

    def put(self, key: Hashable, frames: list[bytes], now: float) -> None:
        """Remember `frames` for `key` (replacing what was there), then trim to the bounds."""
        items = self._items
        old = items.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        size = sum(map(len, frames))
        if size > self.max_bytes:
            return
        items[key] = (now, frames, size)
        self.bytes += size
        while len(items) > self.max_entries or self.bytes > self.max_bytes:
            self.bytes -= items.popitem(last=False)[1][2]

    def expire(self, now: float) -> None:
        """Forget the replies older than `max_age`."""
        items = self._items
        limit = now - self.max_age
        while items:
            key, (stored, _, size) = next(iter(items.items()))
            if stored >= limit:
                break
            del items[key]
            self.bytes -= size


@dataclass(slots=True)
class Command:
    """A command the broker accepted, until it is answered (`state` says where it is)."""

    client: bytes
    id: str
    service: str
    action: str
    header: bytes
    payload: bytes
    deadline: float
    received_at: float
    state: CommandState = CommandState.RECEIVED
    node: NodeInfo | None = None
    once: str | None = None  # the cluster-wide key of an exactly-once command
    sender: bytes = b""  # with security on: the client's CURVE key name, told to the node


class Broker:
    """Routing core: commands in, dispatches and replies out."""

    def __init__(self, config: BrokerConfig | None = None, security: BrokerSecurity | None = None) -> None:
        self.config = config or BrokerConfig()
        self.security = security
        self.registry = Registry()
        self.commands: dict[tuple[bytes, str], Command] = {}
        self.queues: dict[tuple[str, str], deque[Command]] = {}
        self.queued = 0
        self.clients: dict[bytes, ConnectionState] = {}
        self.node_links: dict[bytes, ConnectionState] = {}
        self.counters: Counter[str] = Counter()
        self.draining = False
        self._next_sweep = 0.0
        self._owed_by: dict[tuple[bytes, str], bytes] = {}  # running command -> node identity
        self.events = EventBus(
            self.config.retention,
            max_topics=self.config.max_topics,
            max_retained_bytes=self.config.max_retained_bytes,
            name=self.config.name,
        )
        self.subscribers = Subscribers(self.events, security.gate if security is not None else None)
        self.events_endpoint: str | None = None  # told to clients by mesh.ping (set by the loop)
        self._published: list[list[bytes]] = []  # for subscribers, until the loop takes them
        self.recent = RecentReplies(
            self.config.recent_replies, self.config.recent_reply_s, self.config.recent_reply_bytes
        )
        self.once: OnceTable | None = None  # with a cluster (`join_cluster`)
        # In a cluster: (topic, id) of each event waiting for its commit -> who to acknowledge.
        self._event_acks: dict[tuple[str, str], tuple[Side, bytes, dict[str, Any]]] = {}
        # In a cluster: digest of each policy proposed by mesh.policy -> who to answer.
        self._policy_acks: dict[str, list[tuple[Side, bytes, Header]]] = {}

    def join_cluster(self, shared: SharedState, now: float, *, run: int) -> None:
        """Run exactly-once actions, events, revocations and the access policy through the
        cluster's replicated `shared` state.

        With security on, the policy committed in the log is the one in force; this
        broker proposes the one it read at start, which counts only if none is committed.

        Args:
            run: higher on every start of this broker (`once.next_run`), so that a claim
                proposed by an earlier run is never taken for one of this run.
        """
        self.once = OnceTable(self.config.name, run, shared)
        self.once.propose_run(now)
        if self.security is None:
            return
        if shared.policy is not None:
            self._install_policy(shared.policy)
        if self.security.revocations is not None:
            for jti, expires in shared.revoked.items():  # committed before a crash, maybe never acted on
                self.security.revocations.revoke(jti, expires, now)
        text = self.security.gate.policy.text
        if text is not None:
            self.once.propose_policy(policy_digest(text), policy_record(text), now)

    def offer_keyring(self, ring: dict[str, Any], now: float) -> bool:
        """This broker's copy of the payload key ring's metadata (`KeyRing.metadata()`):
        proposed to the cluster when it is of a later generation than the one in force
        (a rotation made here). Whether it was proposed.

        Raises:
            ValueError: the metadata is not of a ring the cluster can hold (`check_ring`).
        """
        check_ring(ring)
        once = self.once
        if once is None or once.shared.keyring is not None and ring["generation"] <= once.shared.keyring["generation"]:
            return False
        once.propose_keyring(keyring_digest(ring), keyring_record(ring), now)
        return True

    def _install_policy(self, text: str) -> None:
        """Put the committed policy `text` in force (it was checked before it was proposed)."""
        assert self.security is not None
        gate = self.security.gate
        if gate.policy.text == text:
            return
        try:
            gate.policy = policy_from_text(text, f"the cluster's log ({policy_digest(text)})")
        except PolicyError:
            self.counters["policy_invalid"] += 1  # a newer broker's policy: keep the one in force
            return
        self.counters["policy_changes"] += 1

    def leader_changed(self) -> None:
        """The cluster has a new leader: propose again what is not committed yet."""
        if self.once is not None:
            self.once.propose_again()

    def take_proposals(self, now: float) -> list[bytes]:
        """Records for the replicated log since the last call (and those due again)."""
        return self.once.take_proposals(now) if self.once is not None else []

    def take_published(self) -> list[list[bytes]]:
        """The messages for subscribers (events, sync markers) since the last call, in order."""
        out, self._published = self._published, []
        return out

    def _emit(self, topic: str, body: dict[str, Any], now: float) -> None:
        self._published.append(self.events.emit(topic, body, now))

    # ----------------------------------------------------------------- clients

    def client_message(
        self, ident: bytes, frames: Sequence[bytes], now: float, peer: Peer = _NOBODY
    ) -> list[Outgoing]:
        """A message from a client's DEALER: a command, or an event to publish."""
        conn = self._touch(self.clients, ident, now)
        try:
            header = self._decode(frames, 2)
        except MeshError as err:
            self.counters["malformed"] += 1
            # Name the command when its id is readable, so the client can match the error.
            return [(Side.CLIENT, ident, self._error_frames(err, now, _readable_id(frames)))]
        cid: str = header["id"]
        conn.last_message_id = cid
        identity = None
        security = self.security
        if security is not None and header["type"] in ("command", "event"):
            try:
                if header["type"] == "command":
                    identity = security.gate.admit_command(header, peer, now)
                else:
                    identity = security.gate.admit_event(header, peer, now)
            except MeshError as err:
                return [(Side.CLIENT, ident, self._error_frames(err, now, cid))]
        if header["type"] != "command":
            if header["type"] == "event":
                return self._publish(Side.CLIENT, ident, header, frames[1], now, peer.user)
            if header["type"] == "cancel":
                return self._cancel(ident, header["correlation_id"], frames[0], now)
            self.counters["malformed"] += 1
            err = InvalidStateError(
                f"clients send commands, events and cancels; got {header['type']}", details={"field": "type"}
            )
            return [(Side.CLIENT, ident, self._error_frames(err, now, cid))]
        self.counters["commands_received"] += 1
        service: str = header["service"]
        action: str = header["action"]
        if service == SYSTEM_SERVICE:
            return self._system(ident, frames[0], frames[1], now, Side.CLIENT, identity=identity, peer=peer)
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
        if self.draining:
            return self._refuse(ident, cid, UnavailableError("broker is shutting down"), now)
        deadline = header.get("deadline")
        if deadline is None:
            deadline = now + self.config.default_timeout
        elif deadline <= now:
            return self._refuse(
                ident, cid, DeadlineExceededError("deadline passed before routing"), now, "timed_out",
                (service, action),
            )
        if not self.registry.offers(service, action):
            what = "action" if self.registry.has_service(service) else "service"
            return self._refuse(
                ident,
                cid,
                HandlerNotFoundError(
                    f"no node offers {service}.{action}",
                    details={"service": service, "action": action, "missing": what},
                ),
                now,
                command=(service, action),
            )
        cmd = Command(ident, cid, service, action, frames[0], frames[1], deadline, now)
        if security is not None and peer.user is not None:
            cmd.sender = peer.user.encode()
        if self.once is not None and self.registry.exactly_once(service, action):
            subject = getattr(identity, "subject", None)
            return self._once_command(cmd, conn, once_key(cid, service, action, subject), now)
        holder = self.registry.nodes.get(self._owed_by.get(key, b""))
        if holder is not None:
            # A resend of a command that timed out while this node still runs it: the
            # running copy's answer will serve the resend, and nothing runs twice.
            self._track(cmd, conn)
            cmd.state = advance(cmd.state, CommandEvent.DISPATCH)
            cmd.node = holder
            self.counters["rejoined"] += 1
            return []
        node = self.registry.pick(service, action)
        if node is None:
            if self.queued >= self.config.queue_limit:
                return self._refuse(
                    ident,
                    cid,
                    ResourceExhaustedError(
                        f"every node of {service} is busy and the queue is full",
                        details={"queue_limit": self.config.queue_limit},
                    ),
                    now,
                    command=(service, action),
                )
            self._track(cmd, conn)
            cmd.state = advance(cmd.state, CommandEvent.ENQUEUE)
            self._enqueue(cmd)
            return []
        self._track(cmd, conn)
        return [self._dispatch(cmd, node)]

    def _cancel(self, ident: bytes, cid: str, header_frame: bytes, now: float) -> list[Outgoing]:
        """A client's `cancel` of its command `cid`: answer it CANCELLED, tell its node.

        A command the broker no longer holds (answered, expired, never sent) is ignored:
        its one answer is already on its way. A dispatched command keeps its node slot
        until the node answers, as after a deadline, and that late answer is dropped.
        """
        cmd = self.commands.get((ident, cid))
        if cmd is None:
            self.counters["cancels_ignored"] += 1
            return []
        self.counters["cancelled"] += 1
        out: list[Outgoing] = []
        if cmd.state is CommandState.QUEUED:
            self.queues[(cmd.service, cmd.action)].remove(cmd)
            self.queued -= 1
        elif cmd.node is not None:
            out.append((Side.NODE, cmd.node.identity, [ident, header_frame, b"\xc0"]))
        out.append(self._fail(cmd, CancelledError(f"{cmd.service}.{cmd.action} was cancelled by its caller",
                                                  details={"state": cmd.state.value}), now, CommandEvent.FAIL))
        return out

    # ------------------------------------------------------------ exactly once

    def _once_command(self, cmd: Command, conn: ConnectionState, key: str, now: float) -> list[Outgoing]:
        """An exactly-once command: its committed outcome, or a claim to run it, or a wait.

        Only the broker run whose claim is committed sends the command (`OnceTable`); a
        resend that finds another's claim waits here for the outcome.
        """
        once = self.once
        assert once is not None
        outcome = once.shared.outcomes.get(key)
        if outcome is not None:
            self.counters["once_replayed"] += 1
            return [(Side.CLIENT, cmd.client, list(outcome))]
        if key in once.shared.forgotten:
            return self._refuse(cmd.client, cmd.id, _forgotten(cmd), now, command=(cmd.service, cmd.action))
        claim = once.shared.claims.get(key)
        node = None if claim is not None else self.registry.pick(cmd.service, cmd.action)
        if claim is None and (node is None or node.instance is None):
            # No queue here: a queued command would need a claim for a node not yet chosen.
            return self._refuse(
                cmd.client, cmd.id,
                ResourceExhaustedError(f"every node of {cmd.service} is busy", details={"exactly_once": True}),
                now, command=(cmd.service, cmd.action),
            )  # fmt: skip
        cmd.once = key
        self._track(cmd, conn)
        once.wait(key, (cmd.client, cmd.id))
        if claim is not None:
            if claim[1] == once.claimant:
                return self._once_start(key, now)
            if self.registry.by_instance(claim[0]) is None:
                return [self._fail(cmd, _claimed_node_gone(cmd), now, CommandEvent.FAIL)]
            self.counters["once_awaited"] += 1  # another broker (or run) sends it: await its outcome
            copy = once.copies.pop(key, None)
            if copy is not None:
                once.propose_outcome(key, copy, now)
                self.counters["once_outcomes_copied"] += 1
            elif not once.await_outcome((cmd.client, cmd.id), key, now):
                return [self._outcome_unknown(cmd, claim[1], now)]
            return []
        assert node is not None and node.instance is not None
        once.propose_claim(key, node.instance, now)
        self.counters["once_claims"] += 1
        return []

    def _once_start(self, key: str, now: float) -> list[Outgoing]:
        """Send `key`'s command if this run may (`OnceTable.may_dispatch`): the first of its
        waiting copies goes, once; the others are answered with the outcome. When another
        run holds the claim, what waits here waits `AWAIT_S` for its outcome."""
        once = self.once
        assert once is not None
        instance = once.may_dispatch(key)
        if instance is None:
            claim = once.shared.claims.get(key)
            if claim is not None and claim[1] != once.claimant:
                for ref in once.waiting.get(key, ()):
                    once.await_outcome(ref, key, now)  # answered by the next tick when it is past
            return []
        for ref in once.waiting.get(key, ()):
            cmd = self.commands.get(ref)
            if cmd is not None and cmd.once == key and cmd.state is CommandState.RECEIVED:
                return self._once_dispatch(cmd, instance, now)
        return []

    def _once_dispatch(self, cmd: Command, instance: str, now: float) -> list[Outgoing]:
        """Send a claimed command to the node process its claim names, and to no other."""
        assert self.once is not None and cmd.once is not None
        node = self.registry.by_instance(instance)
        if node is None:
            return [self._fail(cmd, _claimed_node_gone(cmd), now, CommandEvent.FAIL)]
        self.once.dispatched.add(cmd.once)
        self.once.running[(cmd.client, cmd.id)] = cmd.once
        self.counters["once_dispatched"] += 1
        return [self._dispatch(cmd, node)]

    def _once_reply(
        self, key: tuple[bytes, str], cmd: Command | None, ident: bytes, header: dict[str, Any],
        answer: list[bytes], now: float,
    ) -> list[Outgoing]:  # fmt: skip
        """A node's reply to an exactly-once command: proposed as its outcome, answered on commit.

        An error proving the command never started is answered at once (the client
        retries it by itself) and not committed: the claimed node may still run it later.
        """
        once = self.once
        assert once is not None
        okey = once.running.pop(key)
        mine = cmd is not None and cmd.state is CommandState.DISPATCHED and _ran_on(cmd, ident)
        node = self.registry.nodes.get(ident)
        if node is not None:
            node.completed += 1
        code = header["error"]["code"] if header["type"] == "error" and "error" in header else 0
        if code in _NEVER_STARTED:
            once.dispatched.discard(okey)  # the node proved it did not start it: a resend may go again
            if mine:
                assert cmd is not None
                self._finish(cmd, CommandEvent.FAIL)
                return [(Side.CLIENT, key[0], answer)]
            return []
        if okey not in once.shared.outcomes:
            size = sum(map(len, answer))
            if size > MAX_OUTCOME_REPLY_BYTES:  # it ran: commit that, since the reply cannot be
                answer = self._error_frames(MessageTooLargeError(
                    f"the command ran, but its reply of {size} bytes is over what the cluster's log keeps "
                    f"as an exactly-once outcome ({MAX_OUTCOME_REPLY_BYTES} bytes); it is not run again",
                    details={"limit": MAX_OUTCOME_REPLY_BYTES, "exactly_once": True},
                ), now, key[1])  # fmt: skip
            once.propose_outcome(okey, answer, now)
            self.counters["once_outcomes"] += 1
        if mine:
            assert cmd is not None
            cmd.node = None  # the node is done with it; the client waits for the commit
        return []

    def _once_copy(
        self, node: NodeInfo | None, cid: str, header: dict[str, Any], answer: list[bytes], now: float
    ) -> bool:
        """A node's reply to an exactly-once command this run does not wait for from it: sent
        by another broker (or an earlier run of this one), or answered NODE_LOST here before
        the node spoke again. Kept, or proposed as the outcome at once when a caller waits
        here (its claimant may be dead). True when it was such a reply."""
        once = self.once
        assert once is not None
        key = once.shared.claim_ids.get(cid)
        if key is None or node is None or key in once.shared.outcomes or key in once.shared.forgotten:
            return False
        claim = once.shared.claims.get(key)
        if claim is None or claim[0] != node.instance:
            return False  # not from the node that holds the claim
        code = header["error"]["code"] if header["type"] == "error" and "error" in header else 0
        if code in _NEVER_STARTED:
            return True
        if key in once.waiting:
            once.propose_outcome(key, answer, now)
            self.counters["once_outcomes_copied"] += 1
        else:
            once.keep_copy(key, answer)
        return True

    def apply_shared(self, now: float) -> list[Outgoing]:
        """Act on what the replicated log committed since the last call."""
        once = self.once
        if once is None:
            return []
        out: list[Outgoing] = []
        for effect in once.shared.take_effects():
            if isinstance(effect, Claimed):
                once.confirmed(effect.key, outcome=False)
                if effect.key not in once.shared.outcomes:
                    once.saw_claim(effect.key, now)
                out.extend(self._once_start(effect.key, now))
            elif isinstance(effect, Committed):
                once.confirmed(effect.key, outcome=True)
                out.extend(self._once_answer(effect.key, effect.reply))
            elif isinstance(effect, Forgotten):
                once.confirmed(effect.key, outcome=True)
                out.extend(self._once_forget(effect.key, now))
            elif isinstance(effect, RunStarted):
                once.confirmed(f"run {effect.claimant}", outcome=False)
            elif isinstance(effect, Restored):
                out.extend(self._once_reconcile(now))
            elif isinstance(effect, Published):
                once.confirmed(event_key(effect.topic, effect.id), outcome=False)
                if effect.frames is not None:
                    self._published.append(effect.frames)
                    self.counters["events_committed"] += 1
                waiting = self._event_acks.pop((effect.topic, effect.id), None)
                if waiting is not None:
                    side, ident, header = waiting
                    out.append(
                        self._event_refused(side, ident, header, effect.error, now) if effect.error is not None
                        else self._event_ack(side, ident, header, effect.seq, now)
                    )  # fmt: skip
            elif isinstance(effect, KeyRingSet):
                once.confirmed(keyring_key(effect.proposed), outcome=False)
            elif isinstance(effect, PolicySet):
                once.confirmed(policy_key(effect.proposed), outcome=False)
                if self.security is not None:
                    self._install_policy(effect.text)
                for side, ident, header in self._policy_acks.pop(effect.proposed, ()):
                    prefix: list[bytes] = [b""] if side is Side.NODE else []
                    answer = encode_payload({"policy": policy_digest(effect.text)})
                    out.append((side, ident, [*prefix, encode_header(response_to(header, now=now)), answer]))
            elif isinstance(effect, Revoked):
                once.confirmed(revoke_key(effect.jti), outcome=False)
                revocations = self.security.revocations if self.security is not None else None
                if revocations is not None:
                    try:
                        revocations.revoke(effect.jti, effect.expires, now)  # refused here even if the write fails
                    except MeshError:
                        self.counters["revocations_unsaved"] += 1
                    self.counters["revocations_applied"] += 1
        return out

    def _once_overdue(self, now: float) -> list[Outgoing]:
        """Tell callers whose command waited `AWAIT_S` on another run's claim that its outcome
        is unknown (it may have run), rather than hold them to their deadline: that run may
        be paused or dead, and only it may send the command."""
        once = self.once
        assert once is not None
        out: list[Outgoing] = []
        for ref in once.overdue(now):
            cmd = self.commands.get(ref)
            if cmd is None or cmd.once is None or cmd.state is not CommandState.RECEIVED:
                continue
            claim = once.shared.claims.get(cmd.once)
            if claim is None or cmd.once in once.shared.outcomes:
                continue
            out.append(self._outcome_unknown(cmd, claim[1], now))
        return out

    def _outcome_unknown(self, cmd: Command, claimant: str, now: float) -> Outgoing:
        holder = parse_claimant(claimant)[0]
        err = NetworkError(
            f"{cmd.service}.{cmd.action} is claimed by broker {holder}, which has not committed its outcome: "
            "it may have run; resend it with the same id later to learn it",
            details={"exactly_once": True, "claimed_by": holder, "outcome": "unknown"},
        )
        self.counters["once_unknown"] += 1
        return self._fail(cmd, err, now, CommandEvent.FAIL)

    def _once_answer(self, key: str, reply: tuple[bytes, bytes]) -> list[Outgoing]:
        """`key`'s outcome is committed: every copy of the command waiting here gets it."""
        assert self.once is not None
        self.once.settled(key)
        failed = peek_header(reply[0], "type") == "error"
        out: list[Outgoing] = []
        for ref in self.once.waiting.pop(key, ()):
            cmd = self.commands.get(ref)
            if cmd is None or cmd.once != key:
                continue
            if cmd.state is CommandState.RECEIVED:
                cmd.state = advance(cmd.state, CommandEvent.DISPATCH)  # it ran, through another broker
            self._finish(cmd, CommandEvent.FAIL if failed else CommandEvent.RESPOND)
            out.append((Side.CLIENT, cmd.client, list(reply)))
        return out

    def _once_forget(self, key: str, now: float) -> list[Outgoing]:
        """`key`'s outcome was dropped for room: what waits for it is refused, not run."""
        assert self.once is not None
        self.once.settled(key)
        out: list[Outgoing] = []
        for ref in self.once.waiting.pop(key, ()):
            cmd = self.commands.get(ref)
            if cmd is not None and cmd.once == key:
                out.append(self._fail(cmd, _forgotten(cmd), now, CommandEvent.FAIL))
        return out

    def _once_reconcile(self, now: float) -> list[Outgoing]:
        """After a snapshot restore: settle every waiting command by what the log now holds.

        Its claims and outcomes arrived without effects, so each key waited for here is
        answered (outcome), refused (forgotten), sent (a claim of this run, never sent) or
        left waiting (another's claim, or none yet: its proposal is repeated).
        """
        once = self.once
        assert once is not None
        shared = once.shared
        out: list[Outgoing] = []
        for key in list(once.waiting):
            outcome = shared.outcomes.get(key)
            if outcome is not None:
                once.confirmed(key, outcome=True)
                out.extend(self._once_answer(key, outcome))
            elif key in shared.forgotten:
                once.confirmed(key, outcome=True)
                out.extend(self._once_forget(key, now))
            elif key in shared.claims:
                once.confirmed(key, outcome=False)
                out.extend(self._once_start(key, now))
        self.counters["once_restores"] += 1
        return out

    def _track(self, cmd: Command, conn: ConnectionState) -> None:
        self.commands[(cmd.client, cmd.id)] = cmd
        conn.pending_commands.add(cmd.id)

    def _enqueue(self, cmd: Command, front: bool = False) -> None:
        q = self.queues.get((cmd.service, cmd.action))
        if q is None:
            q = self.queues[(cmd.service, cmd.action)] = deque()
        q.appendleft(cmd) if front else q.append(cmd)
        self.queued += 1

    def _dispatch(self, cmd: Command, node: NodeInfo) -> Outgoing:
        cmd.state = advance(cmd.state, CommandEvent.DISPATCH)
        cmd.node = node
        key = (cmd.client, cmd.id)
        node.owed.add(key)
        self._owed_by[key] = node.identity
        self.counters["dispatched"] += 1
        if cmd.sender:  # security on: the node checks signatures against this name
            return (Side.NODE, node.identity, [cmd.client, cmd.header, cmd.payload, cmd.sender])
        return (Side.NODE, node.identity, [cmd.client, cmd.header, cmd.payload])

    def _finish(self, cmd: Command, event: CommandEvent) -> None:
        cmd.state = advance(cmd.state, event)
        del self.commands[(cmd.client, cmd.id)]
        conn = self.clients.get(cmd.client)
        if conn is not None:
            conn.pending_commands.discard(cmd.id)
        self.counters[cmd.state.value] += 1

    def _refuse(
        self,
        ident: bytes,
        cid: str,
        err: MeshError,
        now: float,
        outcome: str = "failed",
        command: tuple[str, str] | None = None,
    ) -> list[Outgoing]:
        """Answer a command the broker will not route (it was never tracked)."""
        self.counters[outcome] += 1
        self.counters[f"error_{int(err.code)}"] += 1
        if command is not None:
            self._command_failed(cid, *command, int(err.code), now)
        return [(Side.CLIENT, ident, self._error_frames(err, now, cid))]

    def _fail(self, cmd: Command, err: MeshError, now: float, event: CommandEvent) -> Outgoing:
        """Answer a tracked command with an error and retire it."""
        self._finish(cmd, event)
        self.counters[f"error_{int(err.code)}"] += 1
        self._command_failed(cmd.id, cmd.service, cmd.action, int(err.code), now)
        return (Side.CLIENT, cmd.client, self._error_frames(err, now, cmd.id))

    def _command_failed(self, cid: str, service: str, action: str, code: int, now: float) -> None:
        self._emit("mesh.command.failed", {"id": cid, "service": service, "action": action, "code": code}, now)

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
                return self._propose_event(side, ident, header, payload, now, sender)
            seq, frames = self.events.publish(header, payload, sender)
        except MeshError as err:
            return [self._event_refused(side, ident, header, err, now)]
        self._published.append(frames)
        return [self._event_ack(side, ident, header, seq, now)]

    def _propose_event(
        self, side: Side, ident: bytes, header: dict[str, Any], payload: bytes, now: float, sender: str | None
    ) -> list[Outgoing]:
        assert self.once is not None
        topic = header["topic"]
        check_publishable(topic)
        if len(self._event_acks) >= MAX_UNCOMMITTED_EVENTS:
            raise UnavailableError(
                f"{MAX_UNCOMMITTED_EVENTS} events wait for the cluster to commit them (is a majority of brokers up?)",
                details={"uncommitted": len(self._event_acks)},
            )
        record = event_record(header, payload, sender)
        if len(record) > MAX_PROPOSAL_BYTES:
            raise MessageTooLargeError(
                f"an event of {len(payload)} bytes is over what the cluster's log takes ({MAX_PROPOSAL_BYTES} bytes)",
                details={"limit": MAX_PROPOSAL_BYTES},
            )
        self._event_acks[(topic, header["id"])] = (side, ident, header)
        self.once.propose_event(topic, header["id"], record, now)
        return []

    def _event_ack(self, side: Side, ident: bytes, header: dict[str, Any], seq: int, now: float) -> Outgoing:
        prefix: list[bytes] = [b""] if side is Side.NODE else []
        return (side, ident, [*prefix, encode_response_header(header, now), encode_payload({"seq": seq})])

    def _event_refused(self, side: Side, ident: bytes, header: dict[str, Any], err: MeshError, now: float) -> Outgoing:
        self.counters["events_refused"] += 1
        prefix: list[bytes] = [b""] if side is Side.NODE else []
        return (side, ident, [*prefix, *self._error_frames(err, now, header["id"])])

    # ------------------------------------------------------------------- nodes

    def node_message(
        self, ident: bytes, frames: Sequence[bytes], now: float, peer: Peer = _NOBODY
    ) -> list[Outgoing]:
        """A message from a handler node's DEALER: a reply, a `mesh.*` command or an event."""
        link = self._touch(self.node_links, ident, now)
        node = self.registry.nodes.get(ident)
        if node is not None:
            if node.suspect:
                self._node_recovered(node, now)
            node.last_seen = now
        try:
            header = self._decode(frames, 3)
        except MeshError as err:
            self.counters["malformed"] += 1
            out = [(Side.NODE, ident, [b"", *self._error_frames(err, now, None)])]
            key = self._key_of_bad_reply(link, frames)
            if key is not None:
                # The node is done with it: free its slot and answer the client now,
                # instead of leaving it to time out on a reply it cannot get.
                self._settle(link, ident, key)
                cmd = self.commands.get(key)
                if cmd is not None and cmd.state is CommandState.DISPATCHED and _ran_on(cmd, ident):
                    if not isinstance(err, MessageTooLargeError):
                        err = InternalError(f"the node sent an unusable reply: {err.message}")
                    out.append(self._fail(cmd, err, now, CommandEvent.FAIL))
                if node is not None:
                    out.extend(self._drain_queues(node))
            return out
        link.last_message_id = header["id"]
        mtype = header["type"]
        envelope = frames[0]
        if not envelope:
            if mtype == "command" and header["service"] == SYSTEM_SERVICE:
                identity = None
                if self.security is not None and header["action"] not in _NODE_ACTIONS:
                    # Anything but the node protocol is checked as on the client port: a
                    # node key alone opens no more than a client key does.
                    try:
                        identity = self.security.gate.admit_command(header, peer, now)
                    except MeshError as err:
                        return [(Side.NODE, ident, [b"", *self._error_frames(err, now, header["id"])])]
                out = self._system(ident, frames[1], frames[2], now, Side.NODE, identity=identity, peer=peer)
                out.extend(self._after_registry_change(ident, now))
                return out
            if mtype == "event":
                if self.security is not None:
                    try:
                        self.security.gate.admit_node_event(header, peer, now)
                    except MeshError as err:
                        return [self._event_refused(Side.NODE, ident, header, err, now)]
                return self._publish(Side.NODE, ident, header, frames[2], now, peer.user)
            if mtype in _REPLY_TYPES:
                return []  # a node acknowledging something the broker sent it
            self.counters["malformed"] += 1
            err = HandlerNotFoundError(
                "nodes may only send replies, events and mesh.* commands", details={"field": "type"}
            )
            return [(Side.NODE, ident, [b"", *self._error_frames(err, now, header["id"])])]
        correlation_id = header.get("correlation_id")
        if mtype not in _REPLY_TYPES or correlation_id is None:
            if mtype == "progress":
                return self._progress(link, ident, envelope, correlation_id, frames)
            self.counters["malformed"] += 1
            err = BadFormatError("a reply must be a response or error with a correlation_id")
            return [(Side.NODE, ident, [b"", *self._error_frames(err, now, header["id"])])]
        key = (envelope, correlation_id)
        if key not in link.pending_commands:
            # A reply this node does not owe (a duplicate, or for someone else's command):
            # in a cluster, maybe its copy of an exactly-once reply sent to every broker.
            if self.once is not None and self._once_copy(node, correlation_id, header, [frames[1], frames[2]], now):
                return []
            self.counters["unexpected_replies"] += 1
            return []
        self._settle(link, ident, key)
        cmd = self.commands.get(key)
        out: list[Outgoing] = []
        if self.once is not None and key in self.once.running:
            out.extend(self._once_reply(key, cmd, ident, header, [frames[1], frames[2]], now))
        elif cmd is None or cmd.state is not CommandState.DISPATCHED or not _ran_on(cmd, ident):
            # It timed out, its client left, or it was resent elsewhere: only the slot frees.
            self.counters["late_replies"] += 1
        else:
            if node is not None:
                node.completed += 1
            answer = [frames[1], frames[2]]
            if mtype == "response":
                self._finish(cmd, CommandEvent.RESPOND)
                self.recent.put(key, answer, now)
            else:
                self._finish(cmd, CommandEvent.FAIL)
                code = header["error"]["code"] if "error" in header else 0
                self._command_failed(cmd.id, cmd.service, cmd.action, code, now)
                if code not in _NEVER_STARTED:
                    self.recent.put(key, answer, now)
            out.append((Side.CLIENT, envelope, answer))
        if node is not None:
            out.extend(self._drain_queues(node))
        return out

    def _progress(
        self, link: ConnectionState, ident: bytes, envelope: bytes, cid: str, frames: Sequence[bytes]
    ) -> list[Outgoing]:
        """A node's progress report on a command it runs: passed to the client as it is."""
        key = (envelope, cid)
        cmd = self.commands.get(key)
        if key not in link.pending_commands or cmd is None or not _ran_on(cmd, ident):
            self.counters["stray_progress"] += 1
            return []
        self.counters["progress"] += 1
        return [(Side.CLIENT, envelope, [frames[1], frames[2]])]

    def _settle(self, link: ConnectionState, ident: bytes, key: tuple[bytes, str]) -> None:
        """The node no longer owes `key`: its slot is free."""
        link.pending_commands.discard(key)
        if self._owed_by.get(key) == ident:
            del self._owed_by[key]

    def _key_of_bad_reply(self, link: ConnectionState, frames: Sequence[bytes]) -> tuple[bytes, str] | None:
        """The owed command a node's unusable reply was meant for, if it can still be told."""
        if len(frames) != 3 or not frames[0]:
            return None
        cid = peek_header(frames[1], "correlation_id")
        key = (frames[0], cid)
        return key if isinstance(cid, str) and key in link.pending_commands else None

    def _drain_queues(self, node: NodeInfo) -> list[Outgoing]:
        """Give a node with free slots the oldest queued commands it can run."""
        out: list[Outgoing] = []
        while self.queued and node.in_flight < node.capacity:
            best: deque[Command] | None = None
            for key in self.registry.actions_of(node):
                q = self.queues.get(key)
                if q and (best is None or q[0].received_at < best[0].received_at):
                    best = q
            if best is None:
                break
            cmd = best.popleft()
            self.queued -= 1
            out.append(self._dispatch(cmd, node))
        return out

    # ------------------------------------------------------------------ system

    def _system(
        self,
        ident: bytes,
        header_frame: bytes,
        payload: bytes,
        now: float,
        side: Side,
        *,
        identity: Any = None,
        peer: Peer = _NOBODY,
    ) -> list[Outgoing]:
        prefix: list[bytes] = [b""] if side is Side.NODE else []
        header = decode_header(header_frame)
        conn = (self.clients if side is Side.CLIENT else self.node_links).get(ident)
        try:
            payload = _take_ack(conn, payload)
            if header.action == "policy":
                if side is not Side.CLIENT or (self.security is not None and identity is None):
                    raise AccessDeniedError("mesh.policy is for clients whose role allows it", details={"action": "policy"})
                return self._propose_policy(ident, header, payload, now, side)
            result = self._system_result(ident, header, payload, now, side, identity, peer)
            body = encode_payload(result)
            # The whole registry in one answer is a map of service names: no room for a
            # nonce, so it is not counted (it is bounded by half a message; pages are).
            if (
                len(body) > LARGE_ANSWER_BYTES and conn is not None and isinstance(result, dict)
                and (header.action != "services" or "next" in result)
            ):
                body = self._large_answer(conn, result, body)
        except MeshError as err:
            self.counters["failed"] += 1
            self.counters[f"error_{int(err.code)}"] += 1
            return [(side, ident, [*prefix, *self._error_frames(err, now, header.id)])]
        self.counters["completed"] += 1
        return [(side, ident, [*prefix, encode_header(response_to(header, now=now)), body])]

    def _large_answer(self, conn: ConnectionState, result: dict[str, Any], body: bytes) -> bytes:
        """A system answer over LARGE_ANSWER_BYTES, sent only while the peer has read the
        earlier ones: it carries an `ack` nonce the peer shows in a later `mesh.*` request
        (the SDK does), and at most MAX_UNREAD_ANSWERS of them may wait unshown.

        A peer that asks without reading would otherwise grow the broker's send queue by
        half a megabyte per small request; this way it grows by at most a few answers.

        Raises:
            ResourceExhaustedError: MAX_UNREAD_ANSWERS large answers wait already.
        """
        if len(conn.unread) >= MAX_UNREAD_ANSWERS:
            self.counters["unread_answers_refused"] += 1
            raise ResourceExhaustedError(
                f"{MAX_UNREAD_ANSWERS} large answers to this connection were not acknowledged yet: read them, "
                "and show the last one's `ack` in the next mesh.* request",
                details={"reason": "unread answers", "limit": MAX_UNREAD_ANSWERS},
            )
        nonce = new_id()
        conn.unread.append(nonce)
        return encode_payload({**result, "ack": nonce})

    def _system_result(
        self, ident: bytes, header: Header, payload: bytes, now: float, side: Side, identity: Any, peer: Peer
    ) -> Any:
        action = header.action
        if action == "ping":
            return {"pong": True, "broker": self.config.name, "time": now, "events": self.events_endpoint,
                    "instance": self.events.epoch}
        if action == "services":
            return self._services(payload, identity, peer)
        if action == "stats":
            return self.stats()
        if action == "replay":
            request = decode_payload(payload)
            if self.security is not None:
                self._check_replay_access(request, identity, peer, now)
            # Half the message limit leaves room for the MessagePack around the events.
            return self.events.replay(request, self.config.max_message_bytes // 2)
        if action in ("renew", "revoke") and self.security is not None and identity is not None:
            return self._token_action(action, identity, decode_payload(payload), now)
        if side is Side.NODE and action == "register":
            owed = self.node_links[ident].pending_commands
            before = self.registry.nodes.get(ident)
            offered = set(before.services) if before is not None else set()
            registration = decode_payload(payload)
            if self.security is not None:
                services = registration.get("services") if isinstance(registration, dict) else None
                # Only names can be admitted; other keys are refused by the registry below.
                names = sorted(s for s in services if isinstance(s, str)) if isinstance(services, dict) else []
                self.security.gate.admit_registration(names, peer, now)
            node = self.registry.register(ident, registration, now, owed, peer.user)
            self.counters["registrations"] += 1
            if before is None:
                self._emit("mesh.node.up", _node_view(node), now)
            self._services_changed(node, offered, set(node.services), now)
            return {
                "registered": sorted(node.services),
                "broker": self.config.name,
                "max_message_bytes": self.config.max_message_bytes,
            }
        if side is Side.NODE and action == "unregister":
            self._forget_node(ident, "unregistered", now)
            if not self.node_links[ident].pending_commands:
                del self.node_links[ident]
            return {"unregistered": True}
        if side is Side.NODE and action == "heartbeat":
            node = self.registry.nodes.get(ident)
            if node is not None:
                self._take_load(node, payload)
            return {"known": node is not None}
        if action in _NODE_ACTIONS:
            raise AccessDeniedError(f"mesh.{action} is for handler nodes", details={"action": action})
        raise HandlerNotFoundError(
            f"the broker has no action mesh.{action}",
            details={"service": SYSTEM_SERVICE, "action": action},
        )

    def _check_replay_access(self, request: Any, identity: Any, peer: Peer, now: float) -> None:
        """`mesh.replay` follows the subscription rule: the caller's roles must cover the
        whole prefix it replays, as they must for a live subscription to it."""
        assert self.security is not None
        prefix = request.get("prefix", "") if isinstance(request, dict) else ""
        if identity is None or not isinstance(prefix, str):
            return  # a malformed request: the event bus refuses it, naming the field
        err = self.security.gate.may_subscribe(identity, prefix, peer, now)
        if err is not None:
            raise err

    def _services(self, payload: bytes, identity: Any, peer: Peer) -> dict[str, Any]:
        """The registry, or one page of it; with `{"callable": true}`, only the actions the
        caller may run (the MCP bridge lists as tools exactly what its role may call;
        without security every caller may call everything).

        An answer fits half of the smaller of the broker's and the protocol's message
        limits, so every client can receive it: a request with `after` (or `limit`) gets
        `{"services": <a page>, "next": "service.action" or null}`; one without gets the
        whole registry as before, or MESSAGE_TOO_LARGE when it no longer fits one answer.

        Raises:
            ValidationFailedError: a bad `after` or `limit`.
            MessageTooLargeError: the whole registry was asked for and does not fit.
        """
        try:
            request = decode_payload(payload)
        except MeshError:
            request = None
        if not isinstance(request, dict):
            request = {}
        allowed = None
        if request.get("callable") is True and self.security is not None and identity is not None:
            policy = self.security.gate.policy

            def allowed(svc: str, act: str) -> bool:
                return policy.decide(identity.roles, svc, act, peer.address).allowed

        budget = min(self.config.max_message_bytes, MAX_MESSAGE_BYTES) // 2
        paged = "after" in request or "limit" in request
        after, limit = parse_page_request(request) if paged else (None, None)
        services, last = self.registry.page(after, max_bytes=budget, limit=limit, allowed=allowed)
        if paged:
            return {"services": services, "next": ".".join(last) if last else None}
        if last is not None:
            raise MessageTooLargeError(
                f"the registry is larger than one answer may be ({budget} bytes): "
                'ask for it in pages, {"after": null} first (`Client.services()` does)',
                details={"limit": budget},
            )
        return services

    def _propose_policy(self, ident: bytes, header: Header, payload: bytes, now: float, side: Side) -> list[Outgoing]:
        """`mesh.policy`: a new access policy for every broker of the cluster, answered once
        committed. The gate has already checked that the caller's role may call it."""
        if self.security is None:
            raise InvalidStateError("security is off: there is no access policy to change", details={"action": "policy"})
        if self.once is None:
            raise InvalidStateError(
                "mesh.policy changes a cluster's policy; a single broker reads policy.toml from its state directory at start",
                details={"action": "policy"},
            )
        request = decode_payload(payload)
        text = request.get("policy") if isinstance(request, dict) else None
        if not isinstance(text, str):
            raise ValidationFailedError("policy: the new policy, as TOML text", details={"field": "policy"})
        try:
            policy_from_text(text, "mesh.policy")
        except PolicyError as exc:
            raise ValidationFailedError(
                f"policy: {len(exc.problems)} problem(s): " + "; ".join(str(p) for p in exc.problems),
                details={"field": "policy", "problems": [str(p) for p in exc.problems]},
            ) from None
        if sum(len(v) for v in self._policy_acks.values()) >= MAX_POLICY_CHANGES:
            raise UnavailableError("policy changes wait for the cluster to commit them (is a majority of brokers up?)")
        change = f"{self.config.name}:{header.id}"  # one change, however often it is proposed
        self._policy_acks.setdefault(change, []).append((side, ident, header))
        self.once.propose_policy(change, policy_record(text, change=change), now)
        self.counters["policy_proposed"] += 1
        return []

    def _token_action(self, action: str, identity: Any, request: Any, now: float) -> Any:
        """`mesh.renew` (a fresh token for the caller) and `mesh.revoke` (by jti, persisted).

        The gate has already checked that the caller's role may call the action.
        """
        assert self.security is not None
        sec = self.security
        if action == "renew":
            if sec.issuer is None:
                raise HandlerNotFoundError("this broker does not issue tokens", details={"action": action})
            token = sec.issuer.renew(identity, now, sec.renew_ttl)
            self.counters["tokens_renewed"] += 1
            return {"token": token, "expires": now + sec.renew_ttl}
        if sec.revocations is None:
            raise HandlerNotFoundError("this broker keeps no revocations", details={"action": action})
        if not isinstance(request, dict) or not isinstance(request.get("jti"), str):
            raise ValidationFailedError("jti: the token id to revoke", details={"field": "jti"})
        expires = request.get("expires", now + 365 * 86400)
        if isinstance(expires, bool) or not isinstance(expires, (int, float)):
            raise ValidationFailedError("expires: when the revoked token would expire (epoch seconds)", details={"field": "expires"})
        sec.revocations.revoke(request["jti"], float(expires), now)
        if self.once is not None:
            self.once.propose_revoke(request["jti"], float(expires), now)
        self.counters["tokens_revoked"] += 1
        return {"revoked": request["jti"]}

    def _take_load(self, node: NodeInfo, payload: bytes) -> None:
        """Keep the valid part of a heartbeat's load report; count a bad one, never refuse it."""
        try:
            load, bad = parse_load(decode_payload(payload))
        except MeshError:
            load, bad = {}, ["payload"]
        if bad:
            self.counters["bad_load_reports"] += 1
        if load:
            node.report_load(load)

    def _after_registry_change(self, ident: bytes, now: float) -> list[Outgoing]:
        """After a node (re)registers or leaves: feed it queued work, fail what nobody offers."""
        node = self.registry.nodes.get(ident)
        out = self._drain_queues(node) if node is not None else []
        out.extend(self._route_queued(now))
        return out

    # ---------------------------------------------------------- time and loss

    def tick(self, now: float) -> list[Outgoing]:
        """Expire commands past their deadline and nodes past their liveness window.

        Also forgets clients, links of unregistered nodes and subscribers' reports, long
        gone quiet.
        """
        if now >= self._next_sweep:
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
        self.recent.expire(now)
        out: list[Outgoing] = []
        if self.once is not None:
            out.extend(self._once_overdue(now))
            self.once.forget_done(self.commands)
        paused = self.registry.turn(now)
        if paused:  # this broker was paused: its nodes get a whole window from now (registry.py)
            self.counters["self_pauses"] += 1
            self._emit("mesh.broker.resumed", {"broker": self.config.name, "paused_s": round(paused, 3)}, now)
        for ident in self._check_health(now):
            self.counters["nodes_expired"] += 1
            out.extend(self._lose_node(ident, set(), now, "silent"))
        expired = [c for c in self.commands.values() if c.deadline <= now]
        for cmd in expired:
            if cmd.state is CommandState.QUEUED:
                self.queues[(cmd.service, cmd.action)].remove(cmd)
                self.queued -= 1
            # A dispatched command keeps its node slot until the node answers (or is
            # lost), so the node's capacity is never exceeded by a replacement.
            out.append(
                self._fail(
                    cmd,
                    DeadlineExceededError(
                        f"{cmd.service}.{cmd.action} did not answer in time",
                        details={"state": cmd.state.value},
                    ),
                    now,
                    CommandEvent.EXPIRE,
                )
            )
        return out

    def _check_health(self, now: float) -> list[bytes]:
        """Mark nodes silent past 1.5 intervals suspect; return those past their liveness window.

        A node that goes from up to dead in one tick (the loop was held up) is announced
        down only, not suspect first.
        """
        dead: list[bytes] = []
        for node in self.registry.nodes.values():
            silence = node.silence(now)
            event = silence_event(silence, node.interval)
            if event is PeerEvent.SILENT:
                node.observe(event)
                dead.append(node.identity)
            elif event is PeerEvent.QUIET and not node.suspect:
                node.observe(event)
                self.counters["nodes_suspected"] += 1
                self._emit("mesh.node.suspect", {**_health_view(node), "silent_s": round(silence, 3)}, now)
        return dead

    def _node_recovered(self, node: NodeInfo, now: float) -> None:
        """A suspect node spoke again: it is up, and routing treats it as any other."""
        node.observe(PeerEvent.HEARD)
        self.counters["nodes_recovered"] += 1
        self._emit("mesh.node.recovered", {**_health_view(node), "silent_s": round(now - node.last_seen, 3)}, now)

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
                    self._abandon(ident, cid)
            return []
        unsent = {(f[0], _correlation(f)) for f in (frames, *more) if len(f) == 3 and f[0]}
        return self._lose_node(ident, unsent, now)

    def _forget_node(self, ident: bytes, reason: str, now: float) -> None:
        """Take a node out of routing and tell subscribers."""
        node = self.registry.remove(ident)
        if node is not None:
            self._services_changed(node, set(node.services), set(), now)
            self._emit("mesh.node.down", {**_node_view(node), "reason": reason}, now)

    def _services_changed(self, node: NodeInfo, before: set[str], after: set[str], now: float) -> None:
        for topic, services in (("mesh.service.unregistered", before - after), ("mesh.service.registered", after - before)):
            for service in sorted(services):
                body = {"service": service, "node": node.name, "id": node.identity.hex(),
                        "nodes": self.registry.count(service)}
                self._emit(topic, body, now)

    def _lose_node(
        self, ident: bytes, unsent: set[tuple[bytes, str]], now: float, reason: str = "unreachable"
    ) -> list[Outgoing]:
        """Forget a node that is gone and settle what it owed.

        Commands that never reached it, and those of idempotent actions, are routed again;
        the others it was running are answered NODE_LOST (they may or may not have run).
        """
        link = self.node_links.pop(ident, None)
        self._forget_node(ident, reason, now)
        owed = link.pending_commands if link is not None else set()
        out: list[Outgoing] = []
        requeue: list[Command] = []
        for key in owed:
            if self._owed_by.get(key) == ident:
                del self._owed_by[key]
            if self.once is not None:
                self.once.running.pop(key, None)
            cmd = self.commands.get(key)
            if cmd is None or cmd.state is not CommandState.DISPATCHED or not _ran_on(cmd, ident):
                continue
            spec = cmd.node.services.get(cmd.service, {}).get(cmd.action) if cmd.node else None
            cmd.node = None
            if cmd.once is None and (key in unsent or (spec is not None and spec.idempotent)):
                requeue.append(cmd)
            else:
                out.append(
                    self._fail(
                        cmd,
                        NodeLostError(
                            f"the node running {cmd.service}.{cmd.action} is gone",
                            details={"exactly_once": True} if cmd.once is not None else None,
                        ),
                        now,
                        CommandEvent.FAIL,
                    )
                )
        # Route them again, oldest first, ahead of newer ones.
        self.counters["redispatched"] += len(requeue)
        for cmd in sorted(requeue, key=lambda c: c.received_at, reverse=True):
            cmd.state = advance(cmd.state, CommandEvent.REQUEUE)
            self._enqueue(cmd, front=True)
        out.extend(self._route_queued(now))
        return out

    def _abandon(self, client: bytes, cid: str) -> None:
        """Retire a command whose client is gone; a node running it frees its slot on reply."""
        cmd = self.commands.get((client, cid))
        if cmd is None:
            return
        if cmd.state is CommandState.QUEUED:
            self.queues[(cmd.service, cmd.action)].remove(cmd)
            self.queued -= 1
        cmd.state = advance(cmd.state, CommandEvent.FAIL)
        del self.commands[(client, cid)]
        self.counters["abandoned"] += 1

    def _route_queued(self, now: float) -> list[Outgoing]:
        """Dispatch queued commands to any node with room; fail those nobody offers now."""
        out: list[Outgoing] = []
        for key, q in list(self.queues.items()):
            while q:
                if not self.registry.offers(*key):
                    cmd = q.popleft()
                    self.queued -= 1
                    out.append(
                        self._fail(
                            cmd,
                            NodeLostError(f"no node offers {key[0]}.{key[1]} any more"),
                            now,
                            CommandEvent.FAIL,
                        )
                    )
                    continue
                node = self.registry.pick(*key)
                if node is None:
                    break
                cmd = q.popleft()
                self.queued -= 1
                out.append(self._dispatch(cmd, node))
        return out

    # ---------------------------------------------------------------- shutdown

    def subscriber_message(self, frame: bytes, now: float, peer: Peer = _NOBODY, aligned: bool = True) -> list[Apply]:
        """A message from the XPUB socket: a subscriber's (un)subscription or drop report.

        `aligned`: whether libzmq would apply a filter to the link that sent this message
        (`Subscribers.upstream`).

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
            raise BadFormatError(
                f"expected {count} frames, got {len(frames)}", details={"frames": len(frames)}
            )
        check_size(frames, self.config.max_message_bytes)
        return unpack_header(frames[-2])

    @staticmethod
    def _error_frames(err: MeshError, now: float, correlation_id: str | None) -> list[bytes]:
        return [encode_header(error_header(err, now=now, correlation_id=correlation_id)), b"\xc0"]

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
                       "filters": self.subscribers.stats()},
            **({"security": self.security.gate.stats()} if self.security is not None else {}),
            **({"exactly_once": self.once.stats(), "keyring": self.once.shared.keyring} if self.once is not None else {}),
        }


def _take_ack(conn: ConnectionState | None, payload: bytes) -> bytes:
    """A `mesh.*` request's payload without its `ack`; the answers it acknowledges (that
    one and every earlier one) no longer count as unread."""
    if b"ack" not in payload:
        return payload
    request = decode_payload(payload)
    if not isinstance(request, dict) or "ack" not in request:
        return payload
    nonce = request.pop("ack")
    if conn is not None and nonce in conn.unread:
        while conn.unread.popleft() != nonce:
            pass
    return encode_payload(request)


def _readable_id(frames: Sequence[bytes]) -> str | None:
    """The id of a message that failed validation, if it is a valid id itself."""
    if not frames:
        return None
    value = peek_header(frames[0], "id")
    return value if isinstance(value, str) and ID_MATCH(value) else None


def _node_view(node: NodeInfo) -> dict[str, Any]:
    """What lifecycle events say about a node: names and numbers, nothing secret."""
    return {"node": node.name, "id": node.identity.hex(), "capacity": node.capacity, "services": sorted(node.services)}


def _health_view(node: NodeInfo) -> dict[str, Any]:
    """What health events say about a node: its name, id and heartbeat interval."""
    return {"node": node.name, "id": node.identity.hex(), "interval": node.interval}


def _claimed_node_gone(cmd: Command) -> NodeLostError:
    return NodeLostError(
        f"the node claimed to run {cmd.service}.{cmd.action} is gone; the command may have run",
        details={"exactly_once": True},
    )


def _forgotten(cmd: Command) -> InvalidStateError:
    return InvalidStateError(
        f"{cmd.service}.{cmd.action} with this id ran already; its outcome is no longer kept",
        details={"exactly_once": True, "outcome": "forgotten"},
    )


def _ran_on(cmd: Command, ident: bytes) -> bool:
    return cmd.node is not None and cmd.node.identity == ident


def _correlation(frames: Sequence[bytes]) -> str:
    """The command id inside a dispatch we built ourselves (so it decodes)."""
    try:
        return str(unpack_header(frames[1])["id"])
    except MeshError:
        return ""

