"""The handler-node SDK: declare actions with a decorator, then `run()` against a broker.

Rules of this module:

* The main thread owns the DEALER to the broker and nothing else touches it. Handlers run
  on a pool of `capacity` worker threads (sync handlers) or on one asyncio loop thread
  (async handlers); each sends its reply frames back over its own inproc socket.
* A payload is validated against its action's schema before the handler sees it; a
  refused payload is answered `validation failed` naming the field.
* A handler that raises is answered `internal` (with the exception type, never its
  message or the payload, which may hold secrets) and the node keeps serving.
* The node registers on start, heartbeats every `heartbeat_interval`, and registers again
  when the broker says it does not know the node (a restarted broker).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import zmq

from .protocol import (
    DeadlineExceededError,
    HandlerNotFoundError,
    Header,
    InternalError,
    MeshError,
    MessageType,
    PayloadValidator,
    ResourceExhaustedError,
    check_name,
    command,
    compile_schema,
    decode_header,
    decode_payload,
    encode_header,
    encode_payload,
    error_to,
    response_to,
)
from .sockets import dealer

__all__ = ["Node", "Action", "Handler"]

log = logging.getLogger("mesh.node")

Handler = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]
BATCH: Final = 256
_RESULTS: Final = "inproc://mesh-node-results-{}"


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


@dataclass(slots=True)
class _Work:
    envelope: bytes
    header: Header
    payload: bytes
    action: Action | None = None


class Node:
    """A handler node offering one or more services.

    Args:
        name: shown in the registry and logs.
        capacity: commands this node runs at once; the broker never sends more.
        heartbeat_interval: seconds between heartbeats to the broker.
    """

    def __init__(self, name: str, *, capacity: int = 8, heartbeat_interval: float = 1.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.name = name
        self.capacity = capacity
        self.heartbeat_interval = heartbeat_interval
        self.actions: dict[tuple[str, str], Action] = {}
        self._stop = threading.Event()
        self.registered = threading.Event()
        self.in_flight = 0

    def action(
        self,
        service: str,
        name: str | None = None,
        *,
        schema: Mapping[str, Any] | None = None,
        description: str | None = None,
        idempotent: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Declare a handler for `service.name` (the function's name when `name` is None).

        The description defaults to the handler's docstring; `schema` is the JSON Schema
        of the payload (anything is accepted without one).
        """

        def register(fn: Handler) -> Handler:
            act_name = name or fn.__name__
            check_name(service, "service")
            check_name(act_name, "action")
            sch = dict(schema or {})
            self.actions[(service, act_name)] = Action(
                service=service,
                name=act_name,
                handler=fn,
                description=description if description is not None else inspect.getdoc(fn) or "",
                schema=sch,
                validate=compile_schema(sch),
                is_async=inspect.iscoroutinefunction(fn),
                idempotent=idempotent,
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
            }
        return {"name": self.name, "capacity": self.capacity, "services": services}

    def stop(self) -> None:
        """Ask `run()` to unregister, finish running commands and return."""
        self._stop.set()

    # ------------------------------------------------------------ execution

    def execute(self, work: _Work) -> list[bytes]:
        """Run one command to its reply frames (on a worker thread)."""
        header = work.header
        try:
            action = self._check(work)
            result = action.handler(decode_payload_checked(action, work.payload))
            return self._reply(work, result)
        except MeshError as err:
            return self._error(work, err)
        except Exception as exc:  # the node keeps serving whatever a handler does
            return self._crash(header, work, exc)

    async def execute_async(self, work: _Work) -> list[bytes]:
        """Run one async command to its reply frames, cancelled at its deadline."""
        header = work.header
        try:
            action = self._check(work)
            coro = action.handler(decode_payload_checked(action, work.payload))
            remaining = None if header.deadline is None else max(0.0, header.deadline - time.time())
            try:
                result = await asyncio.wait_for(coro, remaining)  # type: ignore[arg-type]
            except TimeoutError:
                raise DeadlineExceededError(f"{header.service}.{header.action} ran past its deadline") from None
            return self._reply(work, result)
        except MeshError as err:
            return self._error(work, err)
        except Exception as exc:  # the node keeps serving whatever a handler does
            return self._crash(header, work, exc)

    def _check(self, work: _Work) -> Action:
        if work.action is None:
            h = work.header
            raise HandlerNotFoundError(
                f"this node has no action {h.service}.{h.action}",
                details={"service": h.service, "action": h.action},
            )
        if work.header.deadline is not None and work.header.deadline <= time.time():
            raise DeadlineExceededError("deadline passed before the handler started")
        return work.action

    def _reply(self, work: _Work, result: Any) -> list[bytes]:
        return [work.envelope, encode_header(response_to(work.header, now=time.time())), encode_payload(result)]

    def _error(self, work: _Work, err: MeshError) -> list[bytes]:
        return [work.envelope, encode_header(error_to(work.header, err, now=time.time())), b"\xc0"]

    def _crash(self, header: Header, work: _Work, exc: Exception) -> list[bytes]:
        log.error(
            "handler %s.%s raised %s (command %s)",
            header.service, header.action, type(exc).__name__, header.id,
        )
        err = InternalError(
            f"handler {header.service}.{header.action} failed: {type(exc).__name__}",
            details={"exception": type(exc).__name__},
        )
        return self._error(work, err)

    # ------------------------------------------------------------- the loop

    def run(self, broker: str, *, drain_timeout: float = 10.0) -> None:
        """Serve commands from `broker` until `stop()`; blocks.

        Raises:
            ConfigurationError: the endpoint is malformed.
        """
        _NodeLoop(self, broker, drain_timeout).run()


def decode_payload_checked(action: Action, frame: bytes) -> Any:
    payload = decode_payload(frame)
    action.validate(payload)
    return payload


class _NodeLoop:
    """The socket loop of one running node (see the module rules)."""

    def __init__(self, node: Node, broker: str, drain_timeout: float) -> None:
        self.node = node
        self.drain_timeout = drain_timeout
        self.ctx = zmq.Context()
        self.results_addr = _RESULTS.format(id(self))
        self.results = self.ctx.socket(zmq.PULL)
        self.results.bind(self.results_addr)
        self.sock = dealer(self.ctx, broker)
        self.local = threading.local()
        self.work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self.workers: list[threading.Thread] = []
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.pending_control: dict[str, str] = {}  # command id -> mesh action

    def _push(self) -> zmq.Socket:
        sock = getattr(self.local, "push", None)
        if sock is None:
            sock = self.local.push = self.ctx.socket(zmq.PUSH)
            sock.linger = 0
            sock.connect(self.results_addr)
        return sock

    def _worker(self) -> None:
        try:
            while (work := self.work.get()) is not None:
                self._push().send_multipart(self.node.execute(work))
        finally:
            self._close_push()

    def _close_push(self) -> None:
        sock = getattr(self.local, "push", None)
        if sock is not None:
            sock.close()

    async def _run_async(self, work: _Work) -> None:
        self._push().send_multipart(await self.node.execute_async(work))

    def _start_threads(self) -> None:
        node = self.node
        if any(not a.is_async for a in node.actions.values()):
            for i in range(node.capacity):
                t = threading.Thread(target=self._worker, name=f"mesh-worker-{i}", daemon=True)
                t.start()
                self.workers.append(t)
        if any(a.is_async for a in node.actions.values()):
            self.aloop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                assert self.aloop is not None
                asyncio.set_event_loop(self.aloop)
                self.aloop.call_soon(ready.set)
                try:
                    self.aloop.run_forever()
                finally:
                    self._close_push()

            t = threading.Thread(target=serve, name="mesh-async", daemon=True)
            t.start()
            ready.wait()
            self.workers.append(t)

    def _control(self, action: str, payload: Any) -> None:
        header = command("mesh", action, now=time.time())
        self.pending_control[header.id] = action
        self.sock.send_multipart([b"", encode_header(header), encode_payload(payload)])

    def _on_broker(self, frames: list[bytes]) -> None:
        node = self.node
        if len(frames) != 3:
            log.warning("dropped a message of %d frames from the broker", len(frames))
            return
        envelope, hframe, payload = frames
        try:
            header = decode_header(hframe)
        except MeshError as err:
            log.warning("dropped a malformed message from the broker: %s", err.message)
            return
        if not envelope:
            self._on_control(header, payload)
            return
        if header.type is not MessageType.COMMAND:
            return
        work = _Work(envelope, header, payload, node.actions.get((header.service or "", header.action or "")))
        if node.in_flight >= node.capacity:
            err = ResourceExhaustedError("node is at capacity")
            self.sock.send_multipart(node._error(work, err))
            return
        node.in_flight += 1
        if work.action is not None and work.action.is_async:
            assert self.aloop is not None
            asyncio.run_coroutine_threadsafe(self._run_async(work), self.aloop)
        elif self.workers:
            self.work.put(work)
        else:  # an action this node does not have; answer inline
            node.in_flight -= 1
            self.sock.send_multipart(node.execute(work))

    def _on_control(self, header: Header, payload: bytes) -> None:
        action = self.pending_control.pop(header.correlation_id or "", None)
        if header.type is MessageType.ERROR:
            assert header.error is not None
            log.error("broker refused mesh.%s: %s", action, header.error.message)
            if action == "register":
                self.node.stop()
            return
        if action == "register":
            self.node.registered.set()
            log.info("registered %s", ", ".join(sorted({s for s, _ in self.node.actions})))
        elif action == "heartbeat":
            try:
                known = decode_payload(payload).get("known", True)
            except (MeshError, AttributeError):
                known = True
            if not known:
                log.warning("broker forgot this node; registering again")
                self.node.registered.clear()
                self._control("register", self.node.registration())

    def run(self) -> None:
        node = self.node
        self._start_threads()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        self._control("register", node.registration())
        next_beat = time.monotonic() + node.heartbeat_interval
        drain_until: float | None = None
        try:
            while True:
                timeout = max(0.0, next_beat - time.monotonic())
                ready = dict(poller.poll(min(timeout, 0.1) * 1000))
                if self.results in ready:
                    for _ in range(BATCH):
                        try:
                            frames = self.results.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        node.in_flight -= 1
                        self.sock.send_multipart(frames)
                if self.sock in ready:
                    for _ in range(BATCH):
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_broker(frames)
                now = time.monotonic()
                if now >= next_beat and drain_until is None:
                    next_beat = now + node.heartbeat_interval
                    self._control("heartbeat", {"in_flight": node.in_flight})
                if node._stop.is_set() and drain_until is None:
                    self._control("unregister", {})
                    drain_until = now + self.drain_timeout
                if drain_until is not None and (node.in_flight == 0 or now >= drain_until):
                    break
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for _ in self.workers:
            self.work.put(None)
        if self.aloop is not None:
            self.aloop.call_soon_threadsafe(self.aloop.stop)
        for t in self.workers:
            t.join(timeout=2.0)
        self.sock.close(linger=200)
        self.results.close(linger=0)
        self.ctx.term()
