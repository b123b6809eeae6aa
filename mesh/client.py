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
* `publish` sends an event the same way and returns the sequence number the broker
  gave it; `subscribe` opens a subscription (see `subscription.py`) on the broker's
  event endpoint, which the broker names in its `mesh.ping` answer.
* `Client` runs an `AsyncClient` on a private event-loop thread: one implementation,
  and calls from many threads share one connection.
* With `credentials` (security on) the link is CURVE, every message carries the token
  and is encrypted and signed as the credentials' level says, and replies are
  decrypted. A broker that refuses the CURVE handshake fails every waiting call with
  `AuthenticationFailedError` at once (the handshake watch), instead of a timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import zmq

from .aio import AsyncSocket
from .protocol import (
    BadFormatError,
    DeadlineExceededError,
    ErrorCode,
    MeshError,
    UnavailableError,
    check_topic,
    decode_payload,
    encode_command_header,
    encode_event_header,
    encode_payload,
    error_from_wire,
    new_id,
    unpack_header,
)
from .security.credentials import Credentials
from .security.curve import HandshakeWatch
from .security.envelope import Opener, Sealer
from .sockets import Secure, dealer
from .subscription import DEFAULT_HWM, AsyncSubscription, Event, Gap

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
        credentials: keys and token when the mesh runs with security on.
    """

    def __init__(
        self,
        broker: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        credentials: Credentials | None = None,
    ) -> None:
        self.broker = broker
        self.timeout = timeout
        self.retries = retries
        self.credentials = credentials
        self._watch: HandshakeWatch | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._secure: Secure | None = None
        if credentials is not None:
            self._token = credentials.token
            self._sealer = credentials.sealer(lambda: self._token)
            self._opener = credentials.opener()
            self._secure = credentials.secure
        self._ctx = zmq.Context()
        self._sock = dealer(self._ctx, broker, secure=self._watched)
        self._conn: AsyncSocket | None = None
        # command id -> (future of the reply, when to stop waiting for it)
        self._waiting: dict[str, tuple[asyncio.Future[tuple[dict[str, Any], bytes]], float]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.unmatched = 0  # replies for calls that were no longer waiting
        self._events: str | None = None
        self._subscriptions: weakref.WeakSet[AsyncSubscription] = weakref.WeakSet()  # closed with the client

    def _watched(self, sock: zmq.Socket) -> None:
        if self._secure is not None:
            self._secure(sock)
        # Before connect, to see the first handshake: a plain client of a secure broker
        # (or the other way round) learns it at once instead of waiting for a timeout.
        self._watch = HandshakeWatch(sock)

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
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        cid = new_id()
        return await self._request(
            cid,
            lambda now: encode_command_header(service, action, id=cid, now=now, deadline=deadline, metadata=metadata),
            encode_payload(payload),
            deadline,
            retries,
        )

    async def renew(self) -> float:
        """Swap this client's token for a fresh one (`mesh.renew`); returns its expiry.

        Raises:
            AccessDeniedError: the policy does not let this client's role renew.
        """
        result = await self.call("mesh", "renew")
        self._token = result["token"]
        return float(result["expires"])

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Publish an event on `topic`; return the sequence number the broker gave it.

        Raises:
            ValidationFailedError: a bad topic, or a payload MessagePack cannot carry.
            AccessDeniedError: `topic` is one of the broker's own `mesh.*` topics.
            ResourceExhaustedError: the broker tracks as many topics as it may.
            DeadlineExceededError: the broker did not acknowledge it within `timeout`.
        """
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        eid = new_id()
        ack = await self._request(
            eid, lambda now: encode_event_header(topic, id=eid, now=now, metadata=metadata), encode_payload(payload), deadline, None
        )
        return int(ack["seq"])

    async def subscribe(
        self, prefix: str = "", from_seq: int | Mapping[str, int] | None = None, *, hwm: int = DEFAULT_HWM
    ) -> AsyncSubscription:
        """Subscribe to the events of `prefix` ('' for all) and every topic below it.

        Without `from_seq` the subscription starts with what is published once this
        returns. With it, it first replays the retained events after `from_seq` (one
        number for every topic, or a map of topic to last seen number such as another
        subscription's `positions`), then continues live with no duplicate and no hole.

        Raises:
            ValidationFailedError: `prefix` is not a topic.
            MeshError: the broker could not be asked for its event endpoint or history.
        """
        if prefix:
            check_topic(prefix, "prefix")
        endpoint = await self._events_endpoint()
        sub = AsyncSubscription(endpoint, prefix, from_seq, ctx=self._ctx, hwm=hwm, replay=self._replay, secure=self._secure)
        self._subscriptions.add(sub)
        try:
            await sub.start(self.timeout)
        except BaseException:
            await sub.close()
            raise
        return sub

    async def _replay(self, request: dict[str, Any]) -> Any:
        return await self.call("mesh", "replay", request)

    async def _events_endpoint(self) -> str:
        if self._events is None:
            advertised = (await self.call("mesh", "ping"))["events"]
            self._events = reachable(advertised, self.broker)
        return self._events

    async def _request(
        self,
        cid: str,
        make_header: Callable[[float], bytes],
        payload_frame: bytes,
        deadline: float,
        retries: int | None,
    ) -> Any:
        attempts = 1 + (self.retries if retries is None else retries)
        pause = RETRY_PAUSE
        for attempt in range(attempts):
            now = time.time()
            header, body = make_header(now), payload_frame
            if self._sealer is not None:
                header, body = self._sealer.seal(unpack_header(header), body, now)
            try:
                return await self._once(cid, header, body, deadline)
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
        if self._watch is not None:
            self._watch.check()  # a refused handshake fails the call now
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
        if self._opener is not None:
            body = self._opener.open(reply, body, time.time())
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
        """Fail the calls whose broker stayed silent past their deadline (one timer for all),
        or all of them when the broker refused the handshake."""
        now = time.time()
        refused: MeshError | None = None
        if self._watch is not None:
            try:
                self._watch.check()
            except MeshError as err:
                refused = err
        for fut, expires in list(self._waiting.values()):
            if refused is not None and not fut.done():
                fut.set_exception(refused)
            elif now >= expires and not fut.done():
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
        for sub in list(self._subscriptions):
            await sub.close()
        if self._watch is not None:
            self._watch.close()
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
        credentials: keys and token when the mesh runs with security on.
    """

    def __init__(
        self,
        broker: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        credentials: Credentials | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mesh-client", daemon=True)
        self._thread.start()
        try:
            self._inner: AsyncClient = self._run(self._make(broker, timeout, retries, credentials))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
            raise

    @staticmethod
    async def _make(broker: str, timeout: float, retries: int, credentials: Credentials | None) -> AsyncClient:
        return AsyncClient(broker, timeout=timeout, retries=retries, credentials=credentials)

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

    def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Blocking `AsyncClient.publish`; same arguments, result and errors."""
        return self._run(self._inner.publish(topic, payload, metadata=metadata, timeout=timeout))

    def renew(self) -> float:
        """Blocking `AsyncClient.renew`."""
        return self._run(self._inner.renew())

    def subscribe(
        self, prefix: str = "", from_seq: int | Mapping[str, int] | None = None, *, hwm: int = DEFAULT_HWM
    ) -> Subscription:
        """Blocking `AsyncClient.subscribe`; iterate over the result for events and gaps."""
        return Subscription(self, self._run(self._inner.subscribe(prefix, from_seq, hwm=hwm)))

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        if self._loop.is_closed():
            return
        self._run(self._inner.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


class Subscription:
    """A blocking view of an `AsyncSubscription` that runs on its `Client`'s thread.

    Iterating yields `Event`s and `Gap`s forever; `get(timeout)` returns None when
    nothing came in time. Close it (or use `with`) to stop.
    """

    def __init__(self, client: Client, inner: AsyncSubscription) -> None:
        self._client = client
        self._inner = inner

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Event | Gap]:
        while True:
            item = self.get()
            if item is not None:
                yield item

    def get(self, timeout: float | None = None) -> Event | Gap | None:
        """The next event or gap, or None after `timeout` seconds (None: wait for ever)."""
        return self._client._run(self._inner.get(timeout))

    @property
    def positions(self) -> dict[str, int]:
        return self._inner.positions

    @property
    def received(self) -> int:
        return self._inner.received

    @property
    def missed(self) -> int:
        return self._inner.missed

    def close(self) -> None:
        if not self._client._loop.is_closed():
            self._client._run(self._inner.close())


def reachable(advertised: str, via: str) -> str:
    """The broker's advertised endpoint, with a wildcard host replaced by the one in `via`.

    A broker bound to `tcp://0.0.0.0:5557` is reached at the address its clients use.
    """
    adv = urlsplit(advertised)
    if adv.scheme == "tcp" and adv.hostname in ("0.0.0.0", "::", "*"):
        host = urlsplit(via).hostname
        if host:
            return f"tcp://{host}:{adv.port}"
    return advertised
