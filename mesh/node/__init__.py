"""The handler-node SDK: declare actions with a decorator, then `run()` against a broker.

Rules of this module:

* `run()` drives one DEALER per broker from an asyncio loop on the calling thread, and
  only that loop touches them. A node of a cluster connects to every broker and serves
  each: it registers and heartbeats on every link, and answers a command on the link
  it came in on. Async handlers run on that loop (no thread hop: the fast
  choice for non-blocking work); sync handlers run on a pool of `capacity` threads.
* A payload is validated against its action's schema before the handler sees it; a
  refused payload is answered `validation failed` naming the field.
* A handler that raises is answered `internal` (with the exception type, never its
  message or the payload, which may hold secrets) and the node keeps serving.
* The node registers on start, heartbeats every `heartbeat_interval` whatever the
  broker's state (never faster, so a returning broker is not met by a burst), and
  registers again when the broker says it does not know the node (a restarted broker).
  Each heartbeat carries the node's load: in-flight commands, capacity, work waiting for
  a pool thread, and an exponentially weighted mean of handler time.
* The node watches its broker with the table every role uses (`mesh.link.health`) and
  the broker's own thresholds (`silence_event`): any message from the broker counts,
  silence past 1.5 intervals makes it suspect, past 3 dead; each change is logged.
* A command runs at most once while the node remembers its id (`CommandDedupe`: the
  last `RECENT_COMMANDS` ids, up to `RECENT_COMMAND_S`), whichever broker it comes
  through: a resend of a finished command gets the stored reply with its new envelope,
  and a resend of a running one gets the first copy's reply when it finishes. Only outcomes of commands whose handler started
  are stored; refusals (capacity, bad payload, no such action) are not, so a resend of
  those is judged again. Ids are unique but not secret (`new_id`), so a stored reply is
  given only to a resend of the same action carrying the same token.
* With credentials (security on) the link is CURVE; encrypted commands are decrypted
  before validation, and their replies are encrypted with the same key ring.
* Every command that claims level 3 has its signature checked before validation, with
  the trust store's key of the sender the broker names in a fourth frame (with or
  without credentials: a node that knows no signer refuses every such claim); a
  refused command is answered SIGNATURE_INVALID with `details.reason`, never run.
* A `cancel` from the broker (the caller gave up) cancels an async handler's task, which
  is answered CANCELLED; a sync handler cannot be stopped, so it finishes and the
  broker drops its reply. Handlers report progress with `report_progress()`, which
  finds its command through a context variable.
* `publish()` may be called from any thread (handlers included); the event leaves on the
  first link whose broker is up, in order with the replies on that link. Nobody waits for the broker's
  acknowledgement, so a refusal is logged.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Final

import zmq

from .protocol import (
    MAX_ACTIONS,
    MAX_MESSAGE_BYTES,
    MAX_REGISTRATION_BYTES,
    CancelledError,
    DeadlineExceededError,
    HandlerNotFoundError,
    Header,
    InternalError,
    MeshError,
    MessageTooLargeError,
    MessageType,
    NodeLostError,
    PayloadValidator,
    ResourceExhaustedError,
    SecurityLevel,
    UnavailableError,
    ValidationFailedError,
    check_name,
    check_size,
    command,
    compile_schema,
    decode_header,
    decode_payload,
    encode_event_header,
    encode_header,
    encode_payload,
    encode_progress_header,
    encode_response_header,
    error_header,
    new_id,
    transition,
    unpack_header,
)
from .aio import AsyncSocket
from .link.replies import RecentReplies
from .link.heartbeat import silence_event
from .protocol.registration import MAX_DESCRIPTION, check_hints
from .link.health import TRANSITIONS, PeerEvent, PeerState
from .security.credentials import Credentials
from .security.envelope import Opener, Sealer
from .sockets import dealer

__all__ = ["Node", "Action", "Handler", "CommandDedupe", "Seen", "report_progress"]

log = logging.getLogger("mesh.node")

Handler = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]
EXPIRY_S: Final = 0.05
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
class _Work:
    """One command for this node: `header` is its validated wire map (see `unpack_header`)."""

    envelope: bytes
    header: dict[str, Any]
    payload: bytes
    action: Action | None = None
    sender: str | None = None  # the client's name, as the broker says (security on)
    # perf_counter when the handler was called (set by the worker thread); None before.
    started: float | None = None
    link: _Link | None = None  # the broker link it came on, where its reply goes
    task: asyncio.Task[None] | None = None  # an async handler's task
    cancelled: bool = False  # the caller sent a cancel

    @property
    def name(self) -> str:
        return f"{self.header['service']}.{self.header['action']}"

    @property
    def key(self) -> tuple[str, str, str, Any]:
        """What names this command for `CommandDedupe`: its id, action and caller's token."""
        return _command_key(self.header)


def _command_key(header: dict[str, Any]) -> tuple[str, str, str, Any]:
    """Id, service, action and token (None without security) of a command header."""
    security = header.get("security")
    token = security.get("token") if isinstance(security, dict) else None
    return header["id"], header["service"], header["action"], token if isinstance(token, str) else None


class Node:
    """A handler node offering one or more services.

    Args:
        name: shown in the registry and logs.
        capacity: commands this node runs at once; the broker never sends more.
        heartbeat_interval: seconds between heartbeats to the broker.
        dedupe: keep the table of recent command ids that answers a resend without running
            it again (`CommandDedupe`); False only in tests of the brokers' exactly-once.
    """

    def __init__(self, name: str, *, capacity: int = 8, heartbeat_interval: float = 1.0, dedupe: bool = True) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.name = name
        self.capacity = capacity
        self.heartbeat_interval = heartbeat_interval
        self.dedupe = dedupe
        self.instance = new_id()  # this process's own id, the same on every broker it serves
        self.actions: dict[tuple[str, str], Action] = {}
        self._stop = threading.Event()
        self.registered = threading.Event()
        self.in_flight = 0
        self.latency_ms: float | None = None  # mean handler time, for the heartbeat's load report
        self._wake: Callable[[], None] | None = None
        self._send: Callable[..., None] | None = None  # set while run() runs
        self._opener = Opener()  # run() with credentials sets the key ring and trust store
        self._sealer: Sealer | None = None
        self.max_message_bytes = MAX_MESSAGE_BYTES  # the broker tells its own on registration

    def action(
        self,
        service: str,
        name: str | None = None,
        *,
        schema: Mapping[str, Any] | None = None,
        description: str | None = None,
        idempotent: bool = False,
        exactly_once: bool = False,
        read_only: bool | None = None,
        destructive: bool | None = None,
        open_world: bool | None = None,
        result_schema: Mapping[str, Any] | None = None,
    ) -> Callable[[Handler], Handler]:
        """Declare a handler for `service.name` (the function's name when `name` is None).

        The description defaults to the handler's docstring; `schema` is the JSON Schema
        of the payload (anything is accepted without one). `idempotent` lets a broker
        run a command again on another node when this one is lost; `exactly_once` asks a
        broker cluster to commit each outcome to its replicated log before the reply,
        so a command resent after any failover gets that outcome instead of a second run
        (a plain broker treats it as an ordinary action).

        `read_only` (changes nothing), `destructive` (may delete or overwrite what was
        there) and `open_world` (reaches beyond the node's own state) tell callers, and
        the MCP bridge's clients, what the action does; None leaves it undeclared
        (unknown). A read-only action is not destructive, so `read_only=True` declares
        `destructive=False` unless it is given.

        `result_schema` is the JSON Schema of the handler's result (the same rules as
        `schema`): callers and MCP clients rely on it, so the node checks every result
        against it before replying, and a result that breaks it is logged as an error
        here and answered `internal` (3003), never sent.

        What a broker would refuse at registration is refused here, when the action is
        declared, so a node is never turned away at start (nor sends a frame too large
        for its link): see the registration limits in docs/protocol.md.

        Raises:
            ValueError: both `idempotent` and `exactly_once`.
            ValidationFailedError: a bad service or action name, a description
                longer than MAX_DESCRIPTION characters, a hint that is not a boolean,
                or `read_only` with `destructive`.
            ConfigurationError: the schema or result schema is not one the mesh accepts
                (`check_schema`).
            MessageTooLargeError: the schema or result schema, or the node's whole registration with this
                action, is over its limit; or the node would declare more than MAX_ACTIONS.
        """
        if idempotent and exactly_once:
            raise ValueError("an action is idempotent (may run again) or exactly-once, not both")
        if read_only and destructive is None:
            destructive = False
        declared = {"read_only": read_only, "destructive": destructive, "open_world": open_world}

        def register(fn: Handler) -> Handler:
            act_name = name or fn.__name__
            check_name(service, "service")
            check_name(act_name, "action")
            where = f"services.{service}.actions.{act_name}"
            text = description if description is not None else inspect.getdoc(fn) or ""
            if len(text) > MAX_DESCRIPTION:
                raise ValidationFailedError(f"{where}.description: longer than {MAX_DESCRIPTION} characters",
                                            details={"field": f"{where}.description"})
            hints = check_hints(declared, where)
            key = (service, act_name)
            if key not in self.actions and len(self.actions) >= MAX_ACTIONS:
                raise MessageTooLargeError(f"{where}: a node declares at most {MAX_ACTIONS} actions",
                                           details={"field": "services", "limit": MAX_ACTIONS})
            sch = dict(schema or {})
            result_sch = None if result_schema is None else dict(result_schema)
            action = Action(
                service=service,
                name=act_name,
                handler=fn,
                description=text,
                schema=sch,
                validate=compile_schema(sch, f"{where}.schema"),
                is_async=inspect.iscoroutinefunction(fn),
                idempotent=idempotent,
                exactly_once=exactly_once,
                hints=hints,
                result_schema=result_sch,
                check_result=None if result_sch is None else compile_schema(result_sch, f"{where}.result_schema"),
            )
            before = self.actions.get(key)
            self.actions[key] = action
            size = len(encode_payload(self.registration()))
            if size > MAX_REGISTRATION_BYTES:
                if before is None:
                    del self.actions[key]
                else:
                    self.actions[key] = before
                raise MessageTooLargeError(
                    f"{where}: the node's registration would be {size} bytes encoded, limit {MAX_REGISTRATION_BYTES}",
                    details={"field": "payload", "limit": MAX_REGISTRATION_BYTES, "size": size},
                )
            return fn

        return register

    def registration(self) -> dict[str, Any]:
        """The `mesh.register` payload describing every declared action."""
        services: dict[str, Any] = {}
        for (svc, act), spec in sorted(self.actions.items()):
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
            "name": self.name,
            "instance": self.instance,
            "capacity": self.capacity,
            "heartbeat_interval": self.heartbeat_interval,
            "services": services,
        }

    def publish(self, topic: str, payload: Any = None, *, metadata: Mapping[str, Any] | None = None) -> None:
        """Publish an event on `topic` from this node (thread-safe; handlers may call it).

        Raises:
            ValidationFailedError: a bad topic, or a payload MessagePack cannot carry.
            MessageTooLargeError: the event is larger than the broker accepts.
            UnavailableError: the node is not running.
        """
        frames = [encode_event_header(topic, id=new_id(), now=time.time(), metadata=metadata), encode_payload(payload)]
        check_size(frames, self.max_message_bytes)
        send = self._send
        if send is None:
            raise UnavailableError("the node is not running, so it cannot publish")
        send([b"", *frames])

    def stop(self) -> None:
        """Ask `run()` to unregister, finish running commands and return (thread-safe)."""
        self._stop.set()
        wake = self._wake
        if wake is not None:
            wake()

    # ------------------------------------------------------------ execution

    def execute(self, work: _Work) -> list[bytes]:
        """Run one command to its reply frames (on a worker thread)."""
        try:
            action = self._check(work)
            payload = _decode_checked(action, self._open(work))
            work.started = time.perf_counter()
            token = _RUNNING.set((self, work))
            try:
                result = action.handler(payload)
            finally:
                _RUNNING.reset(token)
            return self._reply(work, result)
        except BaseException as exc:  # the node keeps serving whatever a handler does
            return self._failure(work, exc)

    async def execute_async(self, work: _Work) -> list[bytes]:
        """Run one async command to its reply frames (on the node's loop).

        The loop cancels the task at the command's deadline; that becomes a
        `deadline exceeded` reply.
        """
        try:
            action = self._check(work)
            payload = _decode_checked(action, self._open(work))
            work.started = time.perf_counter()
            _RUNNING.set((self, work))  # this task's own context: no reset needed
            result = await action.handler(payload)  # type: ignore[misc]
            return self._reply(work, result)
        except asyncio.CancelledError:
            if work.cancelled:
                return self._error(work, CancelledError(f"{work.name} was cancelled by its caller"))
            return self._error(work, DeadlineExceededError(f"{work.name} ran past its deadline"))
        except BaseException as exc:  # the node keeps serving whatever a handler does
            return self._failure(work, exc)

    def _failure(self, work: _Work, exc: BaseException) -> list[bytes]:
        """The reply for a command whose handling raised `exc`."""
        if isinstance(exc, MeshError):
            return self._error(work, exc)
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        return self._crash(work, exc)

    def _check(self, work: _Work) -> Action:
        if work.action is None:
            h = work.header
            raise HandlerNotFoundError(
                f"this node has no action {work.name}",
                details={"service": h["service"], "action": h["action"]},
            )
        deadline = work.header.get("deadline")
        if deadline is not None and deadline <= time.time():
            raise DeadlineExceededError("deadline passed before the handler started")
        return work.action

    def _open(self, work: _Work) -> bytes:
        """The command's plain payload frame (signature checked, decrypted, as its header says)."""
        return self._opener.open(work.header, work.payload, time.time(), work.sender)

    def _reply(self, work: _Work, result: Any) -> list[bytes]:
        check = work.action.check_result if work.action is not None else None
        if check is not None:
            try:
                check(result)
            except ValidationFailedError as err:
                # The handler's bug: its callers were promised the declared shape. Only the
                # schema's field and rule are logged and sent, never the result's values.
                log.error("handler %s returned a result that breaks its result_schema: %s (command %s)",
                          work.name, err.message, work.header["id"])
                raise InternalError(
                    f"handler {work.name} returned a result that breaks its result_schema",
                    details={"result_field": err.details.get("field"), "rule": err.details.get("rule")},
                ) from None
        try:
            body = encode_payload(result)
        except ValidationFailedError:
            # The handler's bug, not the caller's: its result is not MessagePack.
            raise InternalError(
                f"handler {work.name} returned {type(result).__name__}, which cannot be sent",
                details={"result_type": type(result).__name__},
            ) from None
        now = time.time()
        frames = [work.envelope, encode_response_header(work.header, now), body]
        if self._sealer is not None and "encryption" in (work.header.get("security") or {}):
            # Encrypted commands get encrypted answers, whatever the node's own level.
            frames[1], frames[2] = self._sealer.seal(unpack_header(frames[1]), body, now, level=SecurityLevel.ENCRYPTED)
        size = len(frames[1]) + len(frames[2])
        if size > self.max_message_bytes:
            return self._error(
                work,
                MessageTooLargeError(
                    f"the result is {size} bytes, the broker's limit is {self.max_message_bytes}",
                    details={"limit": self.max_message_bytes},
                ),
            )
        return frames

    def _error(self, work: _Work, err: MeshError) -> list[bytes]:
        header = error_header(err, now=time.time(), correlation_id=work.header["id"])
        return [work.envelope, encode_header(header), b"\xc0"]

    def _crash(self, work: _Work, exc: BaseException) -> list[bytes]:
        name = type(exc).__name__
        log.error("handler %s raised %s (command %s)", work.name, name, work.header["id"])
        return self._error(
            work, InternalError(f"handler {work.name} failed: {name}", details={"exception": name})
        )

    # ------------------------------------------------------------- the loop

    def run(
        self, broker: str | Sequence[str], *, drain_timeout: float = 10.0, credentials: Credentials | None = None
    ) -> None:
        """Serve commands from `broker` (or every broker of a cluster) until `stop()`; blocks.

        Args:
            broker: the broker's node endpoint, or the node endpoints of every broker.
            drain_timeout: seconds to finish running commands once stopping.
            credentials: this node's keys when the mesh runs with security on.

        Raises:
            ConfigurationError: the endpoint is malformed, or the credentials' files are.
        """
        if credentials is not None:
            # Replies to encrypted commands are encrypted whatever this node's own level.
            sealer = credentials.sealer()
            self._opener = credentials.opener()
            self._sealer = replace(sealer, level=max(sealer.level, SecurityLevel.ENCRYPTED))
        brokers = [broker] if isinstance(broker, str) else list(dict.fromkeys(broker))
        if not brokers:
            raise ValueError("a node needs at least one broker")
        _NodeLoop(self, brokers, drain_timeout, credentials).run()


# The node and command a handler runs for, so that `report_progress` needs no arguments
# naming them (set on the worker thread, or in the async handler's task).
_RUNNING: contextvars.ContextVar[tuple[Node, _Work]] = contextvars.ContextVar("mesh_running")


def report_progress(progress: float, total: float | None = None, message: str | None = None) -> None:
    """Tell the caller of the running command how far it is (from inside a handler).

    The report travels node to broker to client as a `progress` message; a client that
    passed `on_progress` to `call` gets it, others drop it. Thread-safe, never blocks;
    outside a handler, or after the node stopped, it does nothing.

    Args:
        progress: how much is done; should grow with each report.
        total: how much there is to do, when known.
        message: a short sentence for a person.
    """
    running = _RUNNING.get(None)
    if running is None:
        return
    node, work = running
    send = node._send
    if send is None or work.cancelled:
        return
    body: dict[str, Any] = {"progress": progress}
    if total is not None:
        body["total"] = total
    if message is not None:
        body["message"] = message
    send([work.envelope, encode_progress_header(work.header["id"], now=time.time()), encode_payload(body)], work.link)


def _decode_checked(action: Action, frame: bytes) -> Any:
    """The payload of a command for `action`, validated against its schema."""
    payload = decode_payload(frame)
    action.validate(payload)
    return payload


class _Link:
    """One broker this node serves: its socket, and what the node knows of that broker."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.conn: AsyncSocket
        self.pending_control: dict[str, str] = {}  # command id -> mesh action
        # Only the newest heartbeat is awaited, and one registration at a time, so an
        # outage does not leave answers to match (and re-registrations) piling up.
        self.beat: str | None = None  # id of the heartbeat not answered yet
        self.registering = False
        self.registered = False
        self.state = PeerState.UP
        self.heard_at = time.monotonic()  # the last message from the broker

    def send(self, frames: list[bytes]) -> None:
        self.conn.send(frames)


class _NodeLoop:
    """The socket loop of one running node (see the module rules)."""

    def __init__(
        self, node: Node, brokers: list[str], drain_timeout: float, credentials: Credentials | None = None
    ) -> None:
        self.node = node
        self.links = [_Link(endpoint) for endpoint in brokers]
        self.credentials = credentials
        self.drain_timeout = drain_timeout
        self.stopping = False
        self.running: set[_Work] = set()  # commands taken and not yet answered
        self.dedupe = CommandDedupe(enabled=node.dedupe)
        # running async handlers: their task and deadline
        self.deadlines: dict[_Work, tuple[asyncio.Task[None], float]] = {}

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        node = self.node
        self.loop = loop = asyncio.get_running_loop()
        ctx = zmq.Context()
        secure = self.credentials.secure if self.credentials is not None else None
        for link in self.links:
            link.conn = AsyncSocket(
                loop, dealer(ctx, link.endpoint, secure=secure), functools.partial(self._on_broker, link)
            )
        sync_actions = any(not a.is_async for a in node.actions.values())
        self.pool = ThreadPoolExecutor(node.capacity, "mesh-worker") if sync_actions else None
        self.done = asyncio.Event()
        node._wake = lambda: loop.call_soon_threadsafe(self._begin_stop)
        loop_thread = threading.get_ident()

        def send(frames: list[bytes], link: _Link | None = None) -> None:
            # No link: an event, on whichever link publishes now.
            def out() -> None:
                (link or self._publish_link()).send(frames)

            if threading.get_ident() == loop_thread:
                out()
            else:
                loop.call_soon_threadsafe(out)

        node._send = send
        if node._stop.is_set():
            self._begin_stop()
        for link in self.links:
            self._register(link)
        beat = loop.call_later(node.heartbeat_interval, self._heartbeat)
        self.expiry = loop.call_later(EXPIRY_S, self._expire)
        try:
            await self.done.wait()
        finally:
            beat.cancel()
            self.expiry.cancel()
            node._wake = None
            node._send = None
            for work in list(self.running):
                # Still running at the end of the drain: the node cannot answer for it.
                self._reply(work, node._error(work, NodeLostError(f"the node stopped while running {work.name}")))
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
            for link in self.links:
                link.conn.close(linger_ms=500)
            ctx.term()

    def _publish_link(self) -> _Link:
        """Where events leave: the first link whose broker is up and knows this node."""
        for link in self.links:
            if link.registered and link.state is PeerState.UP:
                return link
        return self.links[0]

    def _heartbeat(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        self.dedupe.expire(now)
        load = self._load()
        for link in self.links:
            self._watch_broker(link, now)
            if link.beat is not None:
                link.pending_control.pop(link.beat, None)  # unanswered: its answer is ignored
            link.beat = self._control(link, "heartbeat", load)
        self.loop.call_later(self.node.heartbeat_interval, self._heartbeat)

    def _load(self) -> dict[str, Any]:
        """The heartbeat's load report (the broker checks each field)."""
        node = self.node
        # Sync commands taken but whose handler has not started: waiting for a thread.
        queued = sum(1 for w in self.running if w.started is None and w.action is not None and not w.action.is_async)
        load: dict[str, Any] = {"in_flight": node.in_flight, "capacity": node.capacity, "queued": queued}
        if node.latency_ms is not None:
            load["latency_ms"] = round(node.latency_ms, 3)
        return load

    def _watch_broker(self, link: _Link, now: float) -> None:
        """Suspect or declare dead a broker silent too long (checked at each heartbeat)."""
        silence = now - link.heard_at
        event = silence_event(silence, self.node.heartbeat_interval)
        if event is not None:
            self._broker_event(link, event, f"silent for {silence:.1f} s")

    def _broker_event(self, link: _Link, event: PeerEvent, why: str) -> None:
        before = link.state
        link.state = transition(TRANSITIONS, before, event, subject=f"broker {link.endpoint}")
        if link.state is not before:
            level = logging.INFO if link.state is PeerState.UP else logging.WARNING
            log.log(level, "broker %s is %s (was %s): %s", link.endpoint, link.state.value, before.value, why)

    def _register(self, link: _Link) -> None:
        if not link.registering:
            link.registering = True
            self._control(link, "register", self.node.registration())

    def _begin_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for link in self.links:
            self._control(link, "unregister", {})
        self.loop.call_later(self.drain_timeout, self.done.set)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.stopping and not self.running:
            # Let the unregister and the last replies leave before closing.
            self.loop.call_later(0.05, self.done.set)

    def _control(self, link: _Link, action: str, payload: Any) -> str:
        header = command("mesh", action, now=time.time())
        link.pending_control[header.id] = action
        link.send([b"", encode_header(header), encode_payload(payload)])
        return header.id

    def _reply(self, work: _Work, frames: list[bytes]) -> None:
        if work not in self.running:
            return  # already answered when the node stopped
        self.running.discard(work)
        node = self.node
        node.in_flight = len(self.running)
        ran = work.started is not None
        if ran:
            ms = (time.perf_counter() - work.started) * 1000.0
            mean = node.latency_ms
            node.latency_ms = ms if mean is None else mean + LATENCY_WEIGHT * (ms - mean)
        assert work.link is not None
        work.link.send(frames)
        if ran and work.action is not None and work.action.exactly_once:
            # Every broker gets the reply: if the one that sent the command dies before its
            # outcome is committed, another proposes it, and the caller's resend is answered.
            for link in self.links:
                if link is not work.link:
                    link.send(frames)
        for (link, envelope), *body in self.dedupe.finish(work.key, [(work.link, work.envelope), *frames[1:]],
                                                          time.monotonic(), remember=ran):
            link.send([envelope, *body])
        self._maybe_done()

    def _on_broker(self, link: _Link, frames: list[bytes]) -> None:
        node = self.node
        now = time.monotonic()
        if link.state is not PeerState.UP:
            self._broker_event(link, PeerEvent.HEARD, f"heard after {now - link.heard_at:.1f} s")
        link.heard_at = now  # any message, even one dropped below, shows the broker is there
        if len(frames) == 4:  # security on: the sender's name comes last
            sender: str | None = frames[3].decode("utf-8", "replace")
        elif len(frames) == 3:
            sender = None
        else:
            log.warning("dropped a message of %d frames from broker %s", len(frames), link.endpoint)
            return
        envelope, hframe, payload = frames[:3]
        try:
            header = unpack_header(hframe)
        except MeshError as err:
            log.warning("dropped a malformed message from broker %s: %s", link.endpoint, err.message)
            return
        if not envelope:
            self._on_control(link, decode_header(hframe), payload)
            return
        if header["type"] != "command":
            if header["type"] == "cancel":
                self._cancel(link, envelope, header["correlation_id"])
            return
        key = _command_key(header)
        seen, stored = self.dedupe.admit(key, (link, envelope), now)
        if seen is Seen.DONE:
            assert stored is not None
            log.debug("command %s ran already: answered with its stored reply", key[0])
            link.send([envelope, *stored[1:]])
            return
        if seen is Seen.RUNNING:
            log.debug("command %s is running: the resend gets its reply", key[0])
            return
        work = _Work(
            envelope, header, payload, node.actions.get((header["service"], header["action"])), sender, link=link
        )
        if node.in_flight >= node.capacity:
            link.send(node._error(work, ResourceExhaustedError("node is at capacity")))
            return
        self.dedupe.start(key)
        self.running.add(work)
        node.in_flight = len(self.running)
        if work.action is not None and work.action.is_async:
            work.task = task = self.loop.create_task(self._run_async(work))
            if "deadline" in header:
                self.deadlines[work] = (task, header["deadline"])
        elif self.pool is not None:
            fut = self.loop.run_in_executor(self.pool, node.execute, work)
            fut.add_done_callback(lambda f: f.cancelled() or self._reply(work, f.result()))
        else:  # an action this node does not have: answer at once
            self._reply(work, node.execute(work))

    def _cancel(self, link: _Link, envelope: bytes, cid: str) -> None:
        """The caller cancelled a command: stop its async handler; a sync one runs on.

        The broker has already answered the caller, so whatever reply the command still
        makes only frees its slot. Looked up by a scan of the running commands (at most
        `capacity`), so the command path keeps no index for this rare message.
        """
        for work in self.running:
            if work.link is link and work.envelope == envelope and work.header["id"] == cid:
                work.cancelled = True
                log.info("command %s (%s) cancelled by its caller", cid, work.name)
                if work.task is not None:
                    work.task.cancel()
                return

    async def _run_async(self, work: _Work) -> None:
        try:
            self._reply(work, await self.node.execute_async(work))
        finally:
            self.deadlines.pop(work, None)

    def _expire(self) -> None:
        """Cancel async handlers running past their command's deadline (one timer for all)."""
        now = time.time()
        for task, deadline in list(self.deadlines.values()):
            if deadline <= now:
                task.cancel()
        self.expiry = self.loop.call_later(EXPIRY_S, self._expire)

    def _on_control(self, link: _Link, header: Header, payload: bytes) -> None:
        action = link.pending_control.pop(header.correlation_id or "", None)
        if action is None:
            # The broker acknowledging an event this node published.
            if header.error is not None:
                log.warning("broker refused an event: %d %s", header.error.code, header.error.message)
            return
        if header.type is MessageType.ERROR:
            assert header.error is not None
            log.error("broker %s refused mesh.%s: %s", link.endpoint, action, header.error.message)
            if action == "register":
                link.registering = False
                self.node.stop()
            return
        if action == "register":
            link.registering = False
            link.registered = True
            try:
                limit = decode_payload(payload).get("max_message_bytes")
            except (MeshError, AttributeError):
                limit = None
            if isinstance(limit, int) and limit > 0:
                # The smallest limit of the brokers: a reply must fit through any of them.
                others = self.node.max_message_bytes if any(k.registered for k in self.links if k is not link) else limit
                self.node.max_message_bytes = min(limit, others)
            self.node.registered.set()
            log.info("registered %s with %s", ", ".join(sorted({s for s, _ in self.node.actions})), link.endpoint)
        elif action == "heartbeat":
            link.beat = None
            try:
                known = decode_payload(payload).get("known", True)
            except (MeshError, AttributeError):
                known = True
            if not known and not link.registering:
                log.warning("broker %s forgot this node; registering again", link.endpoint)
                link.registered = False
                if not any(k.registered for k in self.links):
                    self.node.registered.clear()
                self._register(link)
