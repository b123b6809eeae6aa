"""The client SDK that AI tools use: `AsyncClient` for asyncio, `Client` for plain code.

Rules of this module:

* One DEALER per client; any number of calls in flight on it, matched to their replies
  by correlation id.
* `timeout` is the whole budget of a call, retries included; it travels to the broker as
  the command's deadline, so the mesh gives up when the caller does.
* Errors that prove the command never started (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`)
  are retried with the same command id after a short, growing pause, while the budget
  lasts. Other retryable errors (`NODE_LOST`, `DEADLINE_EXCEEDED`) may come after the
  command ran, so only the caller, who knows whether it is safe, retries them.
* An `error` reply raises the `MeshError` subclass for its code.
* `Client` runs an `AsyncClient` on a private event-loop thread: one implementation,
  and calls from many threads share one connection.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

import zmq

from .aio import AsyncSocket
from .protocol import (
    BadFormatError,
    DeadlineExceededError,
    ErrorCode,
    MeshError,
    UnavailableError,
    decode_payload,
    encode_command_header,
    encode_payload,
    error_from_wire,
    new_id,
    unpack_header,
)
from .sockets import dealer

__all__ = ["AsyncClient", "Client", "DEFAULT_TIMEOUT", "AUTO_RETRY"]

DEFAULT_TIMEOUT: Final = 30.0
RETRY_PAUSE: Final = 0.05
# The broker answers at the deadline; wait this much longer before giving up on it.
GRACE: Final = 0.5
SWEEP_S: Final = 0.1
# The codes that prove a command never started, so resending it cannot run it twice.
AUTO_RETRY: Final = frozenset({ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.UNAVAILABLE})
_REPLIES: Final = frozenset({"response", "error"})

T = TypeVar("T")


class AsyncClient:
    """An asyncio client of one broker.

    Args:
        broker: the broker's client endpoint, e.g. ``tcp://127.0.0.1:5555``.
        timeout: default budget of a call in seconds.
        retries: default number of automatic retries (of the errors in `AUTO_RETRY`).
    """

    def __init__(self, broker: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = 2) -> None:
        self.broker = broker
        self.timeout = timeout
        self.retries = retries
        self._ctx = zmq.Context()
        self._sock = dealer(self._ctx, broker)
        self._conn: AsyncSocket | None = None
        # command id -> (future of the reply, when to stop waiting for it)
        self._waiting: dict[str, tuple[asyncio.Future[tuple[dict[str, Any], bytes]], float]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.unmatched = 0  # replies for calls that were no longer waiting

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(
        self,
        service: str,
        action: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """Run `service.action` with `payload` somewhere in the mesh; return its result.

        Raises:
            MeshError: the subclass for the error code the mesh answered with, or
                `DeadlineExceededError` when no answer came within `timeout`.
        """
        budget = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if retries is None else retries)
        deadline = time.time() + budget
        cid = new_id()
        payload_frame = encode_payload(payload)
        pause = RETRY_PAUSE
        for attempt in range(attempts):
            header = encode_command_header(
                service, action, id=cid, now=time.time(), deadline=deadline, metadata=metadata
            )
            try:
                return await self._once(cid, header, payload_frame, deadline)
            except MeshError as err:
                left = deadline - time.time()
                if err.code not in AUTO_RETRY or attempt + 1 >= attempts or left <= pause:
                    raise
            await asyncio.sleep(pause)
            pause *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, cid: str, header: bytes, payload: bytes, deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None:
            conn = self._conn = AsyncSocket(loop, self._sock, self._on_reply)
            self._sweeper = loop.call_later(SWEEP_S, self._sweep)
        fut: asyncio.Future[tuple[dict[str, Any], bytes]] = loop.create_future()
        self._waiting[cid] = (fut, deadline + GRACE)
        try:
            conn.send([header, payload])
            reply, body = await fut
        finally:
            del self._waiting[cid]
        if reply["type"] == "error":
            e = reply["error"]
            raise error_from_wire(e["code"], e["message"], e["retryable"], e.get("details"))
        return decode_payload(body)

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 2:
                raise BadFormatError("a reply has two frames")
            header = unpack_header(frames[0])
        except MeshError:
            self.unmatched += 1
            return
        entry = self._waiting.get(header.get("correlation_id", ""))
        if entry is None or entry[0].done() or header["type"] not in _REPLIES:
            self.unmatched += 1
            return
        entry[0].set_result((header, frames[1]))

    def _sweep(self) -> None:
        """Fail the calls whose broker stayed silent past their deadline (one timer for all)."""
        now = time.time()
        for fut, expires in list(self._waiting.values()):
            if now >= expires and not fut.done():
                fut.set_exception(
                    DeadlineExceededError(
                        f"no answer from the broker at {self.broker}", details={"broker": self.broker}
                    )
                )
        assert self._conn is not None
        self._sweeper = self._conn.loop.call_later(SWEEP_S, self._sweep)

    async def close(self) -> None:
        """Fail calls still waiting and close the connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.set_exception(UnavailableError("client closed"))
        if self._conn is not None:
            self._conn.close()
        else:
            self._sock.close(linger=0)
        self._ctx.term()


class Client:
    """A blocking client of one broker; safe to share between threads.

    Args:
        broker: the broker's client endpoint, e.g. ``tcp://127.0.0.1:5555``.
        timeout: default budget of a call in seconds.
        retries: default number of automatic retries (of the errors in `AUTO_RETRY`).
    """

    def __init__(self, broker: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = 2) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mesh-client", daemon=True)
        self._thread.start()
        self._inner: AsyncClient = self._run(self._make(broker, timeout, retries))

    @staticmethod
    async def _make(broker: str, timeout: float, retries: int) -> AsyncClient:
        return AsyncClient(broker, timeout=timeout, retries=retries)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        service: str,
        action: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        """Blocking `AsyncClient.call`; same arguments, result and errors."""
        return self._run(
            self._inner.call(service, action, payload, timeout=timeout, retries=retries, metadata=metadata)
        )

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        if self._loop.is_closed():
            return
        self._run(self._inner.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
