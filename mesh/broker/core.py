"""The broker's routing decisions, without sockets or clocks.

Rules of this module:

* The loop feeds whole ZeroMQ messages in (`client_message`, `node_message`), calls
  `tick` now and then, and reports sends that failed (`undeliverable`). Each returns the
  messages to send as `(side, identity, frames)` tuples. Time comes in as `now`.
* Only header frames are decoded. Payload frames are forwarded as the same bytes objects.
* Every accepted command is answered exactly once: by its node, or by the broker with an
  error (no handler, deadline, capacity, node lost, shutting down).
* Bad input is answered with an error when the sender is known, and counted otherwise;
  it never raises out of this module.

Wire shapes (docs/protocol.md has the byte-level spec):
  client -> broker   [header, payload]
  broker -> node     [envelope, header, payload]   envelope = the client's identity
  node -> broker     [envelope, header, payload]   envelope = b"" for the node's own commands
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from ..protocol import (
    MAX_MESSAGE_BYTES,
    BadFormatError,
    CommandEvent,
    CommandState,
    DeadlineExceededError,
    HandlerNotFoundError,
    Header,
    InvalidStateError,
    MeshError,
    NodeLostError,
    ResourceExhaustedError,
    UnavailableError,
    advance,
    check_size,
    decode_header,
    peek_header,
    unpack_header,
    decode_payload,
    encode_header,
    encode_payload,
    error_header,
    response_to,
)
from ..protocol.names import ID_MATCH
from .registry import NodeInfo, Registry

__all__ = ["Side", "Outgoing", "BrokerConfig", "Broker", "Command", "ConnectionState"]

SYSTEM_SERVICE: Final = "mesh"
_REPLY_TYPES: Final = frozenset({"response", "error"})


class Side(IntEnum):
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


@dataclass(slots=True)
class ConnectionState:
    """The seed's ProtocolState, kept per connected client and node."""

    is_connected: bool = True
    last_message_id: str | None = None
    pending_commands: set[str] = field(default_factory=set)
    message_count: int = 0
    last_activity: float = 0.0


@dataclass(slots=True)
class Command:
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


class Broker:
    """Routing core: commands in, dispatches and replies out."""

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config = config or BrokerConfig()
        self.registry = Registry()
        self.commands: dict[tuple[bytes, str], Command] = {}
        self.queues: dict[tuple[str, str], deque[Command]] = {}
        self.queued = 0
        self.clients: dict[bytes, ConnectionState] = {}
        self.node_links: dict[bytes, ConnectionState] = {}
        self.counters: Counter[str] = Counter()
        self.draining = False

    # ----------------------------------------------------------------- clients

    def client_message(self, ident: bytes, frames: Sequence[bytes], now: float) -> list[Outgoing]:
        """A message from a client's DEALER."""
        conn = self.clients.get(ident)
        if conn is None:
            conn = self.clients[ident] = ConnectionState()
        conn.is_connected = True
        conn.message_count += 1
        conn.last_activity = now
        self.counters["messages_in"] += 1
        try:
            header = self._decode(frames, 2)
        except MeshError as err:
            self.counters["malformed"] += 1
            # Name the command when its id is readable, so the client can match the error.
            return [(Side.CLIENT, ident, self._error_frames(err, now, _readable_id(frames)))]
        cid: str = header["id"]
        conn.last_message_id = cid
        if header["type"] != "command":
            self.counters["malformed"] += 1
            err = InvalidStateError(
                f"clients send commands; got {header['type']}", details={"field": "type"}
            )
            return [(Side.CLIENT, ident, self._error_frames(err, now, cid))]
        self.counters["commands_received"] += 1
        service: str = header["service"]
        action: str = header["action"]
        if service == SYSTEM_SERVICE:
            return self._system(ident, frames[0], frames[1], now, Side.CLIENT)
        key = (ident, cid)
        if key in self.commands:
            # The client resent a command still in flight: the first copy will answer.
            self.counters["duplicates"] += 1
            return []
        if self.draining:
            return self._refuse(ident, cid, UnavailableError("broker is shutting down"), now)
        deadline = header.get("deadline")
        if deadline is None:
            deadline = now + self.config.default_timeout
        elif deadline <= now:
            return self._refuse(ident, cid, DeadlineExceededError("deadline passed before routing"), now)
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
            )
        cmd = Command(ident, cid, service, action, frames[0], frames[1], deadline, now)
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
                )
            self._track(cmd, conn)
            cmd.state = advance(cmd.state, CommandEvent.ENQUEUE)
            self._enqueue(cmd)
            return []
        self._track(cmd, conn)
        return [self._dispatch(cmd, node)]

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
        node.in_flight += 1
        self.counters["dispatched"] += 1
        return (Side.NODE, node.identity, [cmd.client, cmd.header, cmd.payload])

    def _finish(self, cmd: Command, event: CommandEvent) -> None:
        cmd.state = advance(cmd.state, event)
        del self.commands[(cmd.client, cmd.id)]
        conn = self.clients.get(cmd.client)
        if conn is not None:
            conn.pending_commands.discard(cmd.id)
        self.counters[cmd.state.value] += 1

    def _refuse(self, ident: bytes, cid: str, err: MeshError, now: float) -> list[Outgoing]:
        """Answer a command the broker will not route (it was never tracked)."""
        self.counters["failed"] += 1
        self.counters[f"error_{int(err.code)}"] += 1
        return [(Side.CLIENT, ident, self._error_frames(err, now, cid))]

    def _fail(self, cmd: Command, err: MeshError, now: float, event: CommandEvent) -> Outgoing:
        """Answer a tracked command with an error and retire it."""
        self._finish(cmd, event)
        self.counters[f"error_{int(err.code)}"] += 1
        return (Side.CLIENT, cmd.client, self._error_frames(err, now, cmd.id))

    # ------------------------------------------------------------------- nodes

    def node_message(self, ident: bytes, frames: Sequence[bytes], now: float) -> list[Outgoing]:
        """A message from a handler node's DEALER."""
        link = self.node_links.get(ident)
        if link is None:
            link = self.node_links[ident] = ConnectionState()
        link.is_connected = True
        link.message_count += 1
        link.last_activity = now
        self.counters["messages_in"] += 1
        node = self.registry.nodes.get(ident)
        if node is not None:
            node.last_seen = now
        try:
            header = self._decode(frames, 3)
        except MeshError as err:
            self.counters["malformed"] += 1
            out = [(Side.NODE, ident, [b"", *self._error_frames(err, now, None)])]
            cmd = self._command_of_bad_reply(ident, frames)
            if cmd is not None:
                # Answer the client instead of leaving it to time out on a reply it cannot get.
                holder = node if node is not None else cmd.node
                assert holder is not None
                holder.in_flight -= 1
                out.append(self._fail(cmd, err, now, CommandEvent.FAIL))
                if node is not None:
                    out.extend(self._drain_queues(node))
            return out
        link.last_message_id = header["id"]
        mtype = header["type"]
        envelope = frames[0]
        if not envelope:
            if mtype == "command" and header["service"] == SYSTEM_SERVICE:
                return self._system(ident, frames[1], frames[2], now, Side.NODE)
            if mtype in _REPLY_TYPES:
                return []  # a node acknowledging something the broker sent it
            self.counters["malformed"] += 1
            err = HandlerNotFoundError(
                "nodes may only send replies and mesh.* commands", details={"field": "type"}
            )
            return [(Side.NODE, ident, [b"", *self._error_frames(err, now, header["id"])])]
        correlation_id = header.get("correlation_id")
        if mtype not in _REPLY_TYPES or correlation_id is None:
            self.counters["malformed"] += 1
            err = BadFormatError("a reply must be a response or error with a correlation_id")
            return [(Side.NODE, ident, [b"", *self._error_frames(err, now, header["id"])])]
        cmd = self.commands.get((envelope, correlation_id))
        if cmd is None or cmd.state is not CommandState.DISPATCHED or not _ran_on(cmd, ident):
            self.counters["late_replies"] += 1
            out: list[Outgoing] = []
            if node is not None and cmd is None:
                # The command timed out or was failed while the node worked on it; the
                # node's slot is free again now.
                node.in_flight = max(0, node.in_flight - 1)
                out.extend(self._drain_queues(node))
            return out
        # A node that unregistered (it is draining) still answers what it was given.
        holder = node if node is not None else cmd.node
        assert holder is not None
        holder.in_flight -= 1
        holder.completed += 1
        self._finish(cmd, CommandEvent.RESPOND if mtype == "response" else CommandEvent.FAIL)
        out = [(Side.CLIENT, envelope, [frames[1], frames[2]])]
        if node is not None:
            out.extend(self._drain_queues(node))
        return out

    def _command_of_bad_reply(self, ident: bytes, frames: Sequence[bytes]) -> Command | None:
        """The command a node's unusable reply was meant for, if it can still be told."""
        if len(frames) != 3 or not frames[0]:
            return None
        cid = peek_header(frames[1], "correlation_id")
        cmd = self.commands.get((frames[0], cid)) if isinstance(cid, str) else None
        if cmd is None or cmd.state is not CommandState.DISPATCHED or not _ran_on(cmd, ident):
            return None
        return cmd

    def _drain_queues(self, node: NodeInfo) -> list[Outgoing]:
        """Give a node with free slots the oldest queued commands it can run."""
        out: list[Outgoing] = []
        if not self.queued:
            return out
        while node.in_flight < node.capacity and self.queued:
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
        self, ident: bytes, header_frame: bytes, payload: bytes, now: float, side: Side
    ) -> list[Outgoing]:
        prefix: list[bytes] = [b""] if side is Side.NODE else []
        header = decode_header(header_frame)
        try:
            result = self._system_result(ident, header, payload, now, side)
        except MeshError as err:
            self.counters[f"error_{int(err.code)}"] += 1
            return [(side, ident, [*prefix, *self._error_frames(err, now, header.id)])]
        frames = [encode_header(response_to(header, now=now)), encode_payload(result)]
        return [(side, ident, [*prefix, *frames])]

    def _system_result(
        self, ident: bytes, header: Header, payload: bytes, now: float, side: Side
    ) -> Any:
        action = header.action
        if action == "ping":
            return {"pong": True, "broker": self.config.name, "time": now}
        if action == "services":
            return self.registry.describe()
        if action == "stats":
            return self.stats()
        if side is Side.NODE and action == "register":
            node = self.registry.register(ident, decode_payload(payload), now)
            self.counters["registrations"] += 1
            return {
                "registered": sorted(node.services),
                "broker": self.config.name,
                "max_message_bytes": self.config.max_message_bytes,
            }
        if side is Side.NODE and action == "unregister":
            self.registry.remove(ident)
            return {"unregistered": True}
        if side is Side.NODE and action == "heartbeat":
            return {"known": ident in self.registry.nodes}
        raise HandlerNotFoundError(
            f"the broker has no action mesh.{action}",
            details={"service": SYSTEM_SERVICE, "action": action},
        )

    # ---------------------------------------------------------- time and loss

    def tick(self, now: float) -> list[Outgoing]:
        """Expire commands whose deadline passed."""
        out: list[Outgoing] = []
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

    def undeliverable(self, side: Side, ident: bytes, frames: Sequence[bytes], now: float) -> list[Outgoing]:
        """The loop could not send `frames` to `ident`: that peer is gone."""
        self.counters["undeliverable"] += 1
        if side is Side.CLIENT:
            conn = self.clients.pop(ident, None)
            if conn is not None:
                for cid in list(conn.pending_commands):
                    self._abandon(ident, cid)
            return []
        self.node_links.pop(ident, None)
        node = self.registry.remove(ident)
        out: list[Outgoing] = []
        lost = [c for c in self.commands.values() if c.node is node and node is not None]
        unsent = self.commands.get((frames[0], _correlation(frames))) if len(frames) == 3 else None
        for cmd in lost:
            cmd.node = None
            if cmd is unsent:
                # It never reached the node: route it again as if it had just arrived.
                cmd.state = advance(cmd.state, CommandEvent.REQUEUE)
                self._enqueue(cmd, front=True)
            else:
                out.append(
                    self._fail(
                        cmd,
                        NodeLostError(f"the node running {cmd.service}.{cmd.action} is gone"),
                        now,
                        CommandEvent.FAIL,
                    )
                )
        out.extend(self._route_queued(now))
        return out

    def _abandon(self, client: bytes, cid: str) -> None:
        """Forget a command whose client is gone; its node slot frees when the node answers."""
        cmd = self.commands.pop((client, cid), None)
        if cmd is not None and cmd.state is CommandState.QUEUED:
            self.queues[(cmd.service, cmd.action)].remove(cmd)
            self.queued -= 1
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

    def begin_drain(self) -> None:
        """Stop accepting commands; those already accepted still complete."""
        self.draining = True

    @property
    def drained(self) -> bool:
        return self.draining and not self.commands

    # ----------------------------------------------------------------- helpers

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
            "clients": len(self.clients),
        }


def _readable_id(frames: Sequence[bytes]) -> str | None:
    """The id of a message that failed validation, if it is a valid id itself."""
    if not frames:
        return None
    value = peek_header(frames[0], "id")
    return value if isinstance(value, str) and ID_MATCH(value) else None


def _ran_on(cmd: Command, ident: bytes) -> bool:
    return cmd.node is not None and cmd.node.identity == ident


def _correlation(frames: Sequence[bytes]) -> str:
    """The command id inside a dispatch we built ourselves (so it decodes)."""
    try:
        return str(unpack_header(frames[1])["id"])
    except MeshError:
        return ""

