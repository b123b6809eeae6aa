"""The node's thin loop: one DEALER per broker, driven by asyncio, and the sends.

Only this module of the node touches sockets, threads and clocks: it reads the time,
hands messages to the sans-IO pieces of `mesh.node.core` and sends what they return,
and runs handlers (`Node.execute`, `Node.execute_async`) on its loop or its thread pool.
The rules it keeps are the package's (`mesh.node`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Final

import zmq

from ..aio import AsyncSocket
from ..link.health import PeerState
from ..protocol import (
    Header,
    MeshError,
    NodeLostError,
    ResourceExhaustedError,
    decode_header,
    unpack_header,
)
from ..security.credentials import Credentials
from ..sockets import dealer
from .core import (
    BrokerPeer,
    CommandDedupe,
    Seen,
    Work,
    command_key,
    load_report,
    mean_latency,
)

if TYPE_CHECKING:
    from .api import Node

__all__ = ["NodeLoop"]

log = logging.getLogger("mesh.node")

# How often async handlers past their command's deadline are looked for (one timer for all).
EXPIRY_S: Final = 0.05


class _Link(BrokerPeer):
    """One broker this node serves: what the node knows of it (`BrokerPeer`), and its socket."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint, time.monotonic())
        self.conn: AsyncSocket

    def send(self, frames: list[bytes]) -> None:
        self.conn.send(frames)


class NodeLoop:
    """The socket loop of one running node (see the module rules)."""

    def __init__(
        self, node: Node, brokers: list[str], drain_timeout: float, credentials: Credentials | None = None
    ) -> None:
        self.node = node
        self.links = [_Link(endpoint) for endpoint in brokers]
        self.credentials = credentials
        self.drain_timeout = drain_timeout
        self.stopping = False
        self.running: set[Work] = set()  # commands taken and not yet answered
        self.dedupe = CommandDedupe(enabled=node.dedupe)
        # running async handlers: their task and deadline
        self.deadlines: dict[Work, tuple[asyncio.Task[None], float]] = {}

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
        node = self.node
        load = load_report(self.running, node.in_flight, node.capacity, node.latency_ms)
        for link in self.links:
            link.watch(now, node.heartbeat_interval)
            link.send(link.heartbeat(load, time.time()))
        self.loop.call_later(self.node.heartbeat_interval, self._heartbeat)

    def _register(self, link: _Link) -> None:
        frames = link.register(self.node.registration(), time.time())
        if frames is not None:
            link.send(frames)

    def _begin_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for link in self.links:
            link.send(link.control("unregister", {}, time.time())[1])
        self.loop.call_later(self.drain_timeout, self.done.set)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.stopping and not self.running:
            # Let the unregister and the last replies leave before closing.
            self.loop.call_later(0.05, self.done.set)

    def _reply(self, work: Work, frames: list[bytes]) -> None:
        if work not in self.running:
            return  # already answered when the node stopped
        self.running.discard(work)
        node = self.node
        node.in_flight = len(self.running)
        ran = work.started is not None
        if work.started is not None:
            node.latency_ms = mean_latency(node.latency_ms, (time.perf_counter() - work.started) * 1000.0)
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
        link.heard(now)
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
        key = command_key(header)
        seen, stored = self.dedupe.admit(key, (link, envelope), now)
        if seen is Seen.DONE:
            assert stored is not None
            log.debug("command %s ran already: answered with its stored reply", key[0])
            link.send([envelope, *stored[1:]])
            return
        if seen is Seen.RUNNING:
            log.debug("command %s is running: the resend gets its reply", key[0])
            return
        work = Work(
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
            fut.add_done_callback(functools.partial(self._reply_when_run, work))
        else:  # an action this node does not have: answer at once
            self._reply(work, node.execute(work))

    def _reply_when_run(self, work: Work, fut: asyncio.Future[list[bytes]]) -> None:
        """Send the reply of a handler run on the worker pool, unless it was cancelled."""
        if not fut.cancelled():
            self._reply(work, fut.result())

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

    async def _run_async(self, work: Work) -> None:
        try:
            self._reply(work, await self.node.execute_async(work))
        finally:
            self.deadlines.pop(work, None)
            # The task's context holds the Work (the handler's running command), so a Work
            # still holding its finished task would be a reference cycle per command, left
            # to the garbage collector: its young collections of them were the node's
            # longest pauses (tens of ms, the latency tail; docs/performance.md, "The tail").
            work.task = None

    def _expire(self) -> None:
        """Cancel async handlers running past their command's deadline (one timer for all)."""
        now = time.time()
        for task, deadline in list(self.deadlines.values()):
            if deadline <= now:
                task.cancel()
        self.expiry = self.loop.call_later(EXPIRY_S, self._expire)

    def _on_control(self, link: _Link, header: Header, payload: bytes) -> None:
        """Act on the broker's answer to one of the node's `mesh.*` commands."""
        node = self.node
        answer = link.answer(header, payload)
        if answer.action is None:
            # The broker acknowledging an event this node published.
            if header.error is not None:
                log.warning("broker refused an event: %d %s", header.error.code, header.error.message)
        elif answer.refused:
            assert header.error is not None
            log.error("broker %s refused mesh.%s: %s", link.endpoint, answer.action, header.error.message)
            if answer.action == "register":
                node.stop()
        elif answer.action == "register":
            if answer.limit is not None:
                # The smallest limit of the brokers: a reply must fit through any of them.
                others = node.max_message_bytes if any(k.registered for k in self.links if k is not link) else answer.limit
                node.max_message_bytes = min(answer.limit, others)
            node.registered.set()
            log.info("registered %s with %s", ", ".join(sorted({s for s, _ in node.actions})), link.endpoint)
        elif answer.forgotten:
            log.warning("broker %s forgot this node; registering again", link.endpoint)
            if not any(k.registered for k in self.links):
                node.registered.clear()
            self._register(link)
