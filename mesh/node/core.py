"""The sans-IO node protocol: what a node decides, with time passed in as `now`.

Nothing here touches a socket, a thread or a clock (see the package rules in
`mesh.node`): the registration payload, the node's view of each broker (liveness, the
control commands it awaits and what their answers mean), the heartbeat's load report,
and `CommandDedupe`, which keeps a resent command from running twice. The loop
(`mesh.node.loop`) feeds it messages and the time, and sends what it returns.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..link.health import TRANSITIONS, PeerEvent, PeerState
from ..link.heartbeat import silence_event
from ..link.replies import RecentReplies
from ..protocol import (
    Header,
    MeshError,
    MessageType,
    PayloadValidator,
    command,
    decode_payload,
    encode_header,
    encode_payload,
    transition,
)

__all__ = [
    "Action",
    "BrokerPeer",
    "CommandDedupe",
    "ControlAnswer",
    "Handler",
    "Seen",
    "Work",
    "command_key",
    "load_report",
    "mean_latency",
    "registration_payload",
]

log = logging.getLogger("mesh.node")

Handler = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]
# How much of each new handler time goes into the reported mean (the rest is history).
LATENCY_WEIGHT: Final = 0.2
# Finished commands remembered for resends: this many, this long, this many reply bytes.
RECENT_COMMANDS: Final = 10_000
RECENT_COMMAND_S: Final = 300.0
RECENT_COMMAND_BYTES: Final = 64 * 1024 * 1024


class Seen(enum.Enum):
    """What a node knows of a command id when the command arrives."""

    NEW = "new"  # run it
    RUNNING = "running"  # a copy runs now; this one gets its reply
    DONE = "done"  # finished recently; answer with the stored reply


class CommandDedupe:
    """Recent command ids of one node, so that a resent command never runs twice.

    Sans-IO: the loop passes `now` (a monotonic clock) and sends what it is given.
    Replies are stored without their envelope (the broker's name for the client), which
    a resend through another broker, or another connection, does not share.

    Args:
        max_entries, max_age, max_bytes: the bounds of the stored replies, oldest out first.
        enabled: False admits every arrival as NEW and remembers nothing. Only tests turn it
            off, to show that exactly-once is carried by the brokers' replicated log and
            not by this table, which is its second line.
    """

    def __init__(
        self,
        max_entries: int = RECENT_COMMANDS,
        max_age: float = RECENT_COMMAND_S,
        max_bytes: int = RECENT_COMMAND_BYTES,
        *,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.replies = RecentReplies(max_entries, max_age, max_bytes)
        self.running: dict[Hashable, list[Any]] = {}  # key -> envelopes of resends waiting on it

    def admit(self, cid: Hashable, envelope: Any, now: float) -> tuple[Seen, list[Any] | None]:
        """What to do with command `cid` (its id, or a key naming it) that arrived with `envelope`.

        `envelope` says where a reply goes; the dedupe only hands it back, so the loop
        may pass the link it came on with it.

        Returns:
            (NEW, None): run it, after `start`; (RUNNING, None): nothing now, its reply
            comes from `finish`; (DONE, frames): send `frames`, the stored reply.
        """
        if not self.enabled:
            return Seen.NEW, None
        waiting = self.running.get(cid)
        if waiting is not None:
            waiting.append(envelope)
            return Seen.RUNNING, None
        stored = self.replies.get(cid, now)
        if stored is not None:
            return Seen.DONE, [envelope, *stored]
        return Seen.NEW, None

    def start(self, cid: Hashable) -> None:
        """Command `cid` (admitted NEW) is running."""
        if self.enabled:
            self.running[cid] = []

    def finish(self, cid: Hashable, reply: list[Any], now: float, *, remember: bool) -> list[list[Any]]:
        """Command `cid` ended with `reply` ([envelope, header, payload]).

        Args:
            remember: store the reply for resends (its handler started, so running it
                again could repeat what it did).

        Returns:
            The same reply addressed to each resend that waited for it.
        """
        waiting = self.running.pop(cid, ())
        body = reply[1:]
        if remember and self.enabled:
            self.replies.put(cid, body, now)
        return [[envelope, *body] for envelope in waiting]

    def expire(self, now: float) -> None:
        """Forget stored replies past their age."""
        self.replies.expire(now)


@dataclass(frozen=True, slots=True)
class Action:
    service: str
    name: str
    handler: Handler
    description: str
    schema: Mapping[str, Any]
    validate: PayloadValidator
    is_async: bool
    idempotent: bool
    exactly_once: bool = False
    # The declared `read_only` / `destructive` / `open_world` hints (mesh.protocol.registration.HINTS).
    hints: Mapping[str, bool] = field(default_factory=dict)
    # The JSON Schema of the handler's result, and its validator (None: not declared).
    result_schema: Mapping[str, Any] | None = None
    check_result: PayloadValidator | None = None


@dataclass(slots=True, eq=False)  # hashed by identity: a key of the running handlers
class Work:
    """One command for this node: `header` is its validated wire map (see `unpack_header`)."""

    envelope: bytes
    header: dict[str, Any]
    payload: bytes
    action: Action | None = None
    sender: str | None = None  # the client's name, as the broker says (security on)
    # perf_counter when the handler was called (set by the worker thread); None before.
    started: float | None = None
    link: Any = None  # the loop's link to the broker it came on, where its reply goes
    task: Any = None  # an async handler's asyncio task (the loop sets it)
    cancelled: bool = False  # the caller sent a cancel

    @property
    def name(self) -> str:
        return f"{self.header['service']}.{self.header['action']}"

    @property
    def key(self) -> tuple[str, str, str, Any]:
        """What names this command for `CommandDedupe`: its id, action and caller's token."""
        return command_key(self.header)


def command_key(header: dict[str, Any]) -> tuple[str, str, str, Any]:
    """Id, service, action and token (None without security) of a command header."""
    security = header.get("security")
    token = security.get("token") if isinstance(security, dict) else None
    return header["id"], header["service"], header["action"], token if isinstance(token, str) else None




def registration_payload(
    name: str, instance: str, capacity: int, heartbeat_interval: float, actions: Mapping[tuple[str, str], Action]
) -> dict[str, Any]:
    """The `mesh.register` payload describing every declared action (sorted, so stable)."""
    services: dict[str, Any] = {}
    for (svc, act), spec in sorted(actions.items()):
        services.setdefault(svc, {"actions": {}})["actions"][act] = {
            "description": spec.description,
            "schema": dict(spec.schema),
            "idempotent": spec.idempotent,
            "exactly_once": spec.exactly_once,
            **spec.hints,
        }
        if spec.result_schema is not None:
            services[svc]["actions"][act]["result_schema"] = dict(spec.result_schema)
    return {
        "name": name,
        "instance": instance,
        "capacity": capacity,
        "heartbeat_interval": heartbeat_interval,
        "services": services,
    }


def load_report(running: Iterable[Work], in_flight: int, capacity: int, latency_ms: float | None) -> dict[str, Any]:
    """The heartbeat's load report (the broker checks each field)."""
    # Sync commands taken but whose handler has not started: waiting for a thread.
    queued = sum(1 for w in running if w.started is None and w.action is not None and not w.action.is_async)
    load: dict[str, Any] = {"in_flight": in_flight, "capacity": capacity, "queued": queued}
    if latency_ms is not None:
        load["latency_ms"] = round(latency_ms, 3)
    return load


def mean_latency(mean: float | None, ms: float) -> float:
    """The reported handler time after one more handler took `ms` (an exponential mean)."""
    return ms if mean is None else mean + LATENCY_WEIGHT * (ms - mean)


@dataclass(frozen=True, slots=True)
class ControlAnswer:
    """What a broker's answer to one of the node's `mesh.*` commands means for the node.

    `action` is the command answered (None: not one the node awaits, e.g. the
    acknowledgement of a published event). `refused`: the broker answered an error.
    `limit`: on registration, the broker's largest message. `forgotten`: a heartbeat
    answer saying the broker does not know this node (register again).
    """

    action: str | None
    refused: bool = False
    limit: int | None = None
    forgotten: bool = False


class BrokerPeer:
    """What a node knows of one broker it serves, and the control protocol with it.

    Only the newest heartbeat is awaited, and one registration at a time, so an outage
    does not leave answers to match (and re-registrations) piling up.

    Args:
        endpoint: the broker's node endpoint (names it in logs).
        now: the monotonic time the link was made (counts as hearing from it).
    """

    def __init__(self, endpoint: str, now: float) -> None:
        self.endpoint = endpoint
        self.pending_control: dict[str, str] = {}  # command id -> mesh action
        self.beat: str | None = None  # id of the heartbeat not answered yet
        self.registering = False
        self.registered = False
        self.state = PeerState.UP
        self.heard_at = now  # the last message from the broker

    def heard(self, now: float) -> None:
        """A message came from the broker: any message, even one dropped later, shows it is there."""
        if self.state is not PeerState.UP:
            self.event(PeerEvent.HEARD, f"heard after {now - self.heard_at:.1f} s")
        self.heard_at = now

    def watch(self, now: float, heartbeat_interval: float) -> None:
        """Suspect or declare dead a broker silent too long (checked at each heartbeat)."""
        silence = now - self.heard_at
        event = silence_event(silence, heartbeat_interval)
        if event is not None:
            self.event(event, f"silent for {silence:.1f} s")

    def event(self, event: PeerEvent, why: str) -> None:
        """Move the broker's state by the shared health table; log a change."""
        before = self.state
        self.state = transition(TRANSITIONS, before, event, subject=f"broker {self.endpoint}")
        if self.state is not before:
            level = logging.INFO if self.state is PeerState.UP else logging.WARNING
            log.log(level, "broker %s is %s (was %s): %s", self.endpoint, self.state.value, before.value, why)

    def control(self, action: str, payload: Any, now: float) -> tuple[str, list[bytes]]:
        """A `mesh.<action>` command to the broker, awaited: (its id, its frames).

        Args:
            now: wall-clock time, for the command's header.
        """
        header = command("mesh", action, now=now)
        self.pending_control[header.id] = action
        return header.id, [b"", encode_header(header), encode_payload(payload)]

    def heartbeat(self, load: dict[str, Any], now: float) -> list[bytes]:
        """The next heartbeat's frames; an unanswered one before it is no longer awaited."""
        if self.beat is not None:
            self.pending_control.pop(self.beat, None)  # unanswered: its answer is ignored
        self.beat, frames = self.control("heartbeat", load, now)
        return frames

    def register(self, registration: dict[str, Any], now: float) -> list[bytes] | None:
        """The registration's frames, or None while one is already awaited."""
        if self.registering:
            return None
        self.registering = True
        return self.control("register", registration, now)[1]

    def answer(self, header: Header, payload: bytes) -> ControlAnswer:
        """Match the broker's answer (`header`, `payload`) to the command it answers."""
        action = self.pending_control.pop(header.correlation_id or "", None)
        if action is None:
            return ControlAnswer(None, refused=header.error is not None)
        if header.type is MessageType.ERROR:
            if action == "register":
                self.registering = False
            return ControlAnswer(action, refused=True)
        if action == "register":
            self.registering = False
            self.registered = True
            limit = _answer_field(payload, "max_message_bytes", None)
            return ControlAnswer(action, limit=limit if isinstance(limit, int) and limit > 0 else None)
        if action == "heartbeat":
            self.beat = None
            if not _answer_field(payload, "known", True) and not self.registering:
                self.registered = False
                return ControlAnswer(action, forgotten=True)
        return ControlAnswer(action)


def _answer_field(payload: bytes, name: str, default: Any) -> Any:
    """Field `name` of an answer's payload; `default` when it cannot be read."""
    try:
        return decode_payload(payload).get(name, default)
    except (MeshError, AttributeError):
        return default
