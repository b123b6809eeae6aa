"""What a handler node's author sees: `Node`, its `@node.action` decorator, `report_progress`.

The declarations are checked here as a broker would check them at registration, and a
command is run here to its reply frames (validated, decrypted, its result checked and
encoded); when and where those frames go is the loop's (`mesh.node.loop`). The rules
of the whole node are in the package's docstring (`mesh.node`).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..protocol import (
    MAX_ACTIONS,
    MAX_MESSAGE_BYTES,
    MAX_REGISTRATION_BYTES,
    CancelledError,
    DeadlineExceededError,
    HandlerNotFoundError,
    InternalError,
    MeshError,
    MessageTooLargeError,
    SecurityLevel,
    UnavailableError,
    ValidationFailedError,
    check_name,
    check_size,
    compile_schema,
    decode_payload,
    encode_event_header,
    encode_header,
    encode_payload,
    encode_progress_header,
    encode_response_header,
    error_header,
    new_id,
    unpack_header,
)
from ..protocol.registration import MAX_DESCRIPTION, check_hints
from ..security.credentials import Credentials
from ..security.envelope import Opener, Sealer
from .core import Action, Handler, Work, registration_payload
from .loop import NodeLoop

__all__ = ["Node", "report_progress"]

log = logging.getLogger("mesh.node")


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
        self._wake: Callable[[], object] | None = None
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
            self._declare(fn, service, name or fn.__name__, declared, description=description, schema=schema,
                          result_schema=result_schema, idempotent=idempotent, exactly_once=exactly_once)
            return fn

        return register

    def _declare(
        self,
        fn: Handler,
        service: str,
        act_name: str,
        declared: Mapping[str, bool | None],
        *,
        description: str | None,
        schema: Mapping[str, Any] | None,
        result_schema: Mapping[str, Any] | None,
        idempotent: bool,
        exactly_once: bool,
    ) -> None:
        """Check one action as a broker would at registration, then add it (see `action`)."""
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
        self._add(key, where, Action(
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
        ))

    def _add(self, key: tuple[str, str], where: str, action: Action) -> None:
        """Add `action` under `key` unless the registration would grow past its limit (then nothing changes)."""
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

    def registration(self) -> dict[str, Any]:
        """The `mesh.register` payload describing every declared action."""
        return registration_payload(self.name, self.instance, self.capacity, self.heartbeat_interval, self.actions)

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

    def execute(self, work: Work) -> list[bytes]:
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
        except BaseException as exc:  # noqa: BLE001 - the node keeps serving whatever a handler does
            return self._failure(work, exc)

    async def execute_async(self, work: Work) -> list[bytes]:
        """Run one async command to its reply frames (on the node's loop).

        The loop cancels the task at the command's deadline; that becomes a
        `deadline exceeded` reply.
        """
        try:
            action = self._check(work)
            payload = _decode_checked(action, self._open(work))
            work.started = time.perf_counter()
            _RUNNING.set((self, work))  # this task's own context: no reset needed
            result = await action.handler(payload)
            return self._reply(work, result)
        except asyncio.CancelledError:
            if work.cancelled:
                return self._error(work, CancelledError(f"{work.name} was cancelled by its caller"))
            return self._error(work, DeadlineExceededError(f"{work.name} ran past its deadline"))
        except BaseException as exc:  # noqa: BLE001 - the node keeps serving whatever a handler does
            return self._failure(work, exc)

    def _failure(self, work: Work, exc: BaseException) -> list[bytes]:
        """The reply for a command whose handling raised `exc`."""
        if isinstance(exc, MeshError):
            return self._error(work, exc)
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        return self._crash(work, exc)

    def _check(self, work: Work) -> Action:
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

    def _open(self, work: Work) -> bytes:
        """The command's plain payload frame (signature checked, decrypted, as its header says)."""
        return self._opener.open(work.header, work.payload, time.time(), work.sender)

    def _reply(self, work: Work, result: Any) -> list[bytes]:
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
                    details={"cause": "handler_result", "result_field": err.details.get("field"),
                             "rule": err.details.get("rule")},
                ) from None
        try:
            body = encode_payload(result)
        except ValidationFailedError:
            # The handler's bug, not the caller's: its result is not MessagePack.
            raise InternalError(
                f"handler {work.name} returned {type(result).__name__}, which cannot be sent",
                details={"cause": "handler_result", "result_type": type(result).__name__},
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

    def _error(self, work: Work, err: MeshError) -> list[bytes]:
        header = error_header(err, now=time.time(), correlation_id=work.header["id"])
        return [work.envelope, encode_header(header), b"\xc0"]

    def _crash(self, work: Work, exc: BaseException) -> list[bytes]:
        name = type(exc).__name__
        log.error("handler %s raised %s (command %s)", work.name, name, work.header["id"])
        return self._error(
            work, InternalError(f"handler {work.name} failed: {name}", details={"cause": "handler", "exception": name})
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
        NodeLoop(self, brokers, drain_timeout, credentials).run()


# The node and command a handler runs for, so that `report_progress` needs no arguments
# naming them (set on the worker thread, or in the async handler's task).
_RUNNING: contextvars.ContextVar[tuple[Node, Work]] = contextvars.ContextVar("mesh_running")


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
