"""`AsyncClient`: the thin asyncio loop of the client SDK. It owns the socket and the timers
and acts on what `core.py` decides (retries, failover order, rejoining nodes).

Rules of this module:

* One DEALER per client at a time (a new one replaces it on failover); any number of
  calls in flight on it, matched to their replies by correlation id.
* `timeout` is the whole budget of a call, retries included; it travels to the broker as
  the command's deadline, so the mesh gives up when the caller does.
* Errors that prove the command never started are retried with the same command id
  (`core.Retry` decides when and after how long).
* An `error` reply raises the `MeshError` subclass for its code.
* A call whose awaiting task is cancelled sends a `cancel` for its command id, so the
  mesh stops the work too; `progress` messages for a waiting call go to its
  `on_progress` hook.
* `publish` sends an event the same way and returns the sequence number the broker
  gave it; `subscribe` opens a subscription (see `subscription.py`) on the broker's
  event endpoint, which the broker names in its `mesh.ping` answer.
* Heartbeats (`liveness.py` decides, this loop acts): any message from the broker
  proves it alive. While calls wait, one interval of silence makes the link suspect and
  sends one `mesh.ping` (never a second while the first is unanswered); `liveness`
  intervals make it dead. An idle client sends nothing and runs no timer (its 10 Hz
  sweep stops with its last waiting call): thousands of idle tools keep neither a broker
  nor their process busy, and the next call finds a dead broker within the same window
  (a link still in its handshake with a client's only broker gets a longer grace, see
  `mesh.liveness`). `on_state(endpoint, old, new)` and the log report every change.
* A connection the transport reports closed while calls wait (the broker's process
  died and its kernel closed the socket) makes the link dead at once, without waiting
  out the heartbeat window; a silent broker (frozen, or a cut network) still takes the
  window.
* Failover: a dead link is closed (linger 0, its queued messages die with it) and a new
  DEALER opens to the next endpoint of the list, round robin (the same one again when
  there is one: a new socket is what reaches a restarted broker). The first pass
  through the list is immediate; after that attempts back off, doubling from 0.1 s to
  2 s, +-20 % jitter. Every call still waiting is resent on the new link with the SAME
  command id, resealed with a fresh timestamp, and keeps its deadline; calls made while
  no link is open wait for the next one. A command may so run on two brokers (the one
  that died may have passed it on): at-least-once, like every retry; each call still
  returns exactly one answer, and replies for calls no longer waiting are counted in
  `unmatched`. A published event resent this way may be published twice.
* A broker the client just moved to (failover, or a restart seen by its instance id)
  may not know its nodes yet: `HANDLER_NOT_FOUND` is retried for a while (`core.Rejoin`).
* Subscriptions stay on the event endpoint of the broker the client first asked for
  it; they do not fail over.
* With `credentials` (security on) the link is CURVE, every message carries the token
  and is encrypted and signed as the credentials' level says, and replies are
  decrypted. With or without credentials, a reply or event that claims level 3 must
  verify with its sender's key (nodes do not sign replies, so such a reply is refused
  with SIGNATURE_INVALID; see subscription.py for events). A broker that refuses the CURVE handshake fails every waiting call with
  `AuthenticationFailedError` at once (the handshake watch), instead of a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import zmq

from ..aio import AsyncSocket
from ..link.health import PeerState
from ..liveness import (
    DEFAULT_INTERVAL,
    DEFAULT_LIVENESS,
    Liveness,
    Transition,
)
from ..protocol import (
    BadFormatError,
    ConfigurationError,
    DeadlineExceededError,
    MeshError,
    UnavailableError,
    check_topic,
    decode_payload,
    encode_cancel_header,
    encode_command_header,
    encode_event_header,
    encode_payload,
    error_from_wire,
    new_id,
    unpack_header,
)
from ..security.credentials import Credentials
from ..security.curve import HandshakeWatch
from ..security.envelope import Opener, Sealer
from ..sockets import Secure, dealer, shared_context
from ..subscription import DEFAULT_HWM, AsyncSubscription
from .core import (
    DEFAULT_TIMEOUT,
    GRACE,
    SWEEP_S,
    Endpoints,
    Rejoin,
    Retry,
    merge_services_page,
    reachable,
)

__all__ = ["AsyncClient", "ProgressHook", "StateHook"]

log = logging.getLogger("mesh.client")

_REPLIES: Final = frozenset({"response", "error"})

# Called on the client's loop with (endpoint, old state, new state) at each change.
StateHook = Callable[[str, PeerState, PeerState], None]
Reply = tuple[dict[str, Any], bytes]
# Called on the client's loop with (progress, total or None, message or None).
ProgressHook = Callable[[float, float | None, str | None], None]


@dataclass(slots=True)
class _Call:
    """A call waiting for its reply; `frames(now)` builds (and seals) its message, so a
    resend after failover carries a fresh timestamp and passes the broker's replay check."""

    fut: asyncio.Future[Reply]
    expires: float  # when to stop waiting: the deadline plus GRACE
    frames: Callable[[float], list[bytes]]
    on_progress: ProgressHook | None = None


class AsyncClient:
    """An asyncio client of a broker, failing over between several when given a list.

    Args:
        broker: the broker's client endpoint, e.g. ``tcp://127.0.0.1:5555``, or a list
            of them to fail over between (in order, round robin).
        timeout: default budget of a call in seconds.
        retries: default number of automatic retries (of the errors in `AUTO_RETRY`).
        credentials: keys and token when the mesh runs with security on.
        heartbeat_interval: seconds of silence, while calls wait, before a heartbeat.
        liveness: intervals of silence before the broker counts as dead.
        on_state: called with (endpoint, old, new) when the broker's state changes.

    Raises:
        ConfigurationError: no endpoint, or the first one is malformed.
        ValueError: `heartbeat_interval` is not positive or `liveness` is below 2.
    """

    def __init__(
        self,
        broker: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        credentials: Credentials | None = None,
        heartbeat_interval: float = DEFAULT_INTERVAL,
        liveness: int = DEFAULT_LIVENESS,
        on_state: StateHook | None = None,
    ) -> None:
        self._endpoints = Endpoints(broker)
        self.brokers = self._endpoints.all
        self.broker = self._endpoints.current  # the endpoint of the current link
        self.timeout = timeout
        self.retries = retries
        self.credentials = credentials
        self.on_state = on_state
        self._liveness = Liveness(heartbeat_interval, liveness, now=time.monotonic(), elsewhere=len(self.brokers) > 1)
        self._rejoin = Rejoin(heartbeat_interval * liveness)  # on the monotonic clock
        self._watch: HandshakeWatch | None = None
        self._sealer: Sealer | None = None
        # Without credentials it still refuses a reply or event claiming a signature (it
        # knows no signer), rather than take an unchecked claim for a checked one.
        self._opener = Opener()
        self._secure: Secure | None = None
        self._token: str | None = None
        self._ack: str | None = None  # the last large mesh.* answer's nonce (docs/security.md, "Limits")
        if credentials is not None:
            self._token = credentials.token
            self._sealer = credentials.sealer(lambda: self._token)
            self._opener = credentials.opener()
            self._secure = credentials.secure
        self._ctx = shared_context()  # one per process: a context's threads are shared by its clients
        self._sock: zmq.Socket | None = dealer(self._ctx, self.broker, secure=self._watched)
        self._conn: AsyncSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, _Call] = {}  # by command id
        self._sweeper: asyncio.TimerHandle | None = None
        self._reconnect: asyncio.TimerHandle | None = None  # a pending failover, backing off
        self._ping_id: str | None = None  # the heartbeat in flight
        self.unmatched = 0  # replies for calls that were no longer waiting
        self.failovers = 0  # links opened in place of a dead one
        self._events: str | None = None
        self._subscriptions: weakref.WeakSet[AsyncSubscription] = weakref.WeakSet()  # closed with the client

    @property
    def broker_state(self) -> PeerState:
        """Whether the current broker answers: up, suspect or dead (while failing over)."""
        return self._liveness.state

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
        on_progress: ProgressHook | None = None,
        command_id: str | None = None,
    ) -> Any:
        """Run `service.action` with `payload` somewhere in the mesh; return its result.

        Cancelling the task that awaits the call sends the broker a `cancel`: the node
        running the command is told to stop it.

        Args:
            on_progress: called with (progress, total, message) for each progress report
                the node sends while the command runs (on the client's loop; keep it short).
            command_id: the command's id (a fresh one when None), so a caller can record
                it and find the command in the mesh's logs; never reuse one.

        Raises:
            MeshError: the subclass for the error code the mesh answered with, or
                `DeadlineExceededError` when no answer came within `timeout`.
        """
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        cid = new_id() if command_id is None else command_id
        system = service == "mesh" and (payload is None or isinstance(payload, dict))
        if system and self._ack is not None:
            payload = {**(payload or {}), "ack": self._ack}  # the large answers read so far
        result = await self._request(
            cid,
            lambda now: encode_command_header(service, action, id=cid, now=now, deadline=deadline, metadata=metadata),
            encode_payload(payload),
            deadline,
            retries,
            on_progress,
        )
        if system and isinstance(result, dict) and "ack" in result and (action != "services" or "next" in result):
            result = dict(result)
            self._ack = result.pop("ack")
        return result

    async def services(self, *, callable_only: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """The whole registry: every service with its actions, descriptions and schemas.

        Read page by page (`mesh.services` with `after`), so it arrives whatever the
        nodes registered; nodes that come or go meanwhile may or may not be shown.

        Args:
            callable_only: only the actions this client's roles may call (security on).
            timeout: the budget for all the pages together.

        Returns:
            service -> {"nodes": int, "actions": {action: {"description", "schema",
            "idempotent", "exactly_once", and those the node declared of "read_only",
            "destructive", "open_world", "result_schema"}}}, sorted by service and action.

        Raises:
            BadFormatError: a page that is not shaped as protocol.md says.
            MeshError: as `call`, for any page.
        """
        deadline = time.time() + (self.timeout if timeout is None else timeout)
        request: dict[str, Any] = {"after": None, "callable": True} if callable_only else {"after": None}
        out: dict[str, Any] = {}
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise DeadlineExceededError("the registry did not arrive in time", details={"timeout": timeout})
            page = await self.call("mesh", "services", request, timeout=left)
            after = merge_services_page(out, request["after"], page)
            if after is None:
                return out
            request["after"] = after

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
        sub = AsyncSubscription(
            endpoint, prefix, from_seq, ctx=self._ctx, hwm=hwm, replay=self._replay, secure=self._secure,
            opener=self._opener, token=lambda: self._token,
        )  # fmt: skip
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
        on_progress: ProgressHook | None = None,
    ) -> Any:
        retry = Retry(self.retries if retries is None else retries, deadline)
        while True:
            try:
                return await self._once(
                    cid, lambda now: self._sealed(make_header(now), payload_frame, now), deadline, on_progress
                )
            except MeshError as err:
                pause = retry.pause_after(err.code, time.time(), rejoining=self._rejoin.rejoining(time.monotonic()))
                if pause is None:
                    raise
            await asyncio.sleep(pause)

    def _sealed(self, header: bytes, body: bytes, now: float) -> list[bytes]:
        if self._sealer is not None:
            header, body = self._sealer.seal(unpack_header(header), body, now)
        return [header, body]

    async def _once(
        self, cid: str, frames: Callable[[float], list[bytes]], deadline: float, on_progress: ProgressHook | None = None
    ) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            assert self._sock is not None
            self._conn = AsyncSocket(loop, self._sock, self._on_reply)
            self._ping()  # learn which broker instance this is (see _check_instance)
        fut: asyncio.Future[Reply] = loop.create_future()
        self._waiting[cid] = _Call(fut, deadline + GRACE, frames, on_progress)
        if self._sweeper is None:  # sweep again; a drop or silence while idle counts for nothing
            if self._watch is not None:
                self._watch.drops = 0
            self._liveness.tick(time.monotonic(), busy=False)
            self._sweeper = loop.call_later(SWEEP_S, self._sweep)
        try:
            if self._conn is not None:  # None while failing over: the next link sends it
                self._conn.send(frames(time.time()))
            reply, body = await fut
        except asyncio.CancelledError:
            if self._conn is not None:  # tell the mesh the caller gave up (the broker ignores a cancel of nothing)
                self._conn.send([encode_cancel_header(cid, now=time.time()), b"\xc0"])
            raise
        finally:
            del self._waiting[cid]
        if reply["type"] == "error":
            e = reply["error"]
            raise error_from_wire(e["code"], e["message"], e["retryable"], e.get("details"))
        # Replies carry no sender (nodes do not sign them), so one claiming level 3 is refused.
        body = self._opener.open(reply, body, time.time())
        return decode_payload(body)

    def _on_reply(self, frames: list[bytes]) -> None:
        # Anything at all from the broker, even a malformed message, proves it alive.
        try:
            if len(frames) != 2:
                raise BadFormatError("a reply has two frames")
            header = unpack_header(frames[0])
        except MeshError:
            self._report(self._liveness.heard(time.monotonic()))
            self.unmatched += 1
            return
        cid = header.get("correlation_id", "")
        pong = self._ping_id is not None and cid == self._ping_id
        self._report(self._liveness.heard(time.monotonic(), pong=pong))
        if pong:
            self._ping_id = None
            self._check_instance(frames[1])
            return
        call = self._waiting.get(cid)
        if call is None or call.fut.done() or header["type"] not in _REPLIES:
            if call is not None and header["type"] == "progress":
                self._progress(call, frames[1])
                return
            self.unmatched += 1
            return
        call.fut.set_result((header, frames[1]))

    def _progress(self, call: _Call, body: bytes) -> None:
        """A node's progress report on a waiting call: to its hook, if it has one."""
        hook = call.on_progress
        if hook is None or call.fut.done():
            return
        try:
            report = decode_payload(body)
            progress = float(report["progress"])
            total = report.get("total")
            message = report.get("message")
            hook(progress, None if total is None else float(total), message if isinstance(message, str) else None)
        except (MeshError, KeyError, TypeError, ValueError, AttributeError):
            log.debug("dropped a malformed progress report")
        except Exception:  # a caller's hook must not stop the client's reader
            log.exception("the on_progress hook failed")

    def _check_instance(self, body: bytes) -> None:
        """A pong from another broker instance (restarted on the same endpoint, which
        libzmq reconnected to by itself): what the old one held is gone, so resend it."""
        try:
            instance = decode_payload(body).get("instance")
        except (MeshError, AttributeError):
            return
        if instance is None:
            return
        if self._rejoin.seen(instance) and self._conn is not None:
            log.warning("broker %s restarted; resending %d waiting call(s)", self.broker, len(self._waiting))
            self._rejoin.moved(time.monotonic())
            now = time.time()
            for call in self._waiting.values():
                if not call.fut.done():
                    self._conn.send(call.frames(now))

    def _sweep(self) -> None:
        """Every SWEEP_S while calls wait: fail the calls whose broker stayed silent past their
        deadline (one timer for all), or all of them when the broker refused the handshake;
        then tick the broker's liveness: heartbeat, or fail over."""
        assert self._loop is not None
        self._sweeper = self._loop.call_later(SWEEP_S, self._sweep)
        now = time.time()
        refused: MeshError | None = None
        if self._watch is not None:
            try:
                self._watch.check()
            except MeshError as err:
                refused = err
        for call in list(self._waiting.values()):
            if refused is not None and not call.fut.done():
                call.fut.set_exception(refused)
            elif now >= call.expires and not call.fut.done():
                call.fut.set_exception(
                    DeadlineExceededError(
                        f"no answer from the broker at {self.broker}", details={"broker": self.broker}
                    )
                )
        self._beat()
        if self._sweeper is not None and not any(not call.fut.done() for call in self._waiting.values()):
            self._sweeper.cancel()  # idle: no timer at all until the next call (`_once`)
            self._sweeper = None

    def _beat(self) -> None:
        busy = any(not call.fut.done() for call in self._waiting.values())
        if self._watch is not None and self._watch.drops:
            self._watch.drops = 0
            dropped = self._liveness.dropped(busy=busy)
            self._report(dropped)
            if dropped and dropped[-1].new is PeerState.DEAD:
                self._fail_over()  # the broker's process is gone: no window to wait out
                return
        tick = self._liveness.tick(time.monotonic(), busy=busy, handshaking=bool(self._watch and self._watch.handshaking))
        self._report(tick.transitions)
        if tick.transitions and tick.transitions[-1].new is PeerState.DEAD:
            self._fail_over()  # once per dead link; the sweeps while backing off wait
        elif tick.ping and self._conn is not None:
            self._ping()

    def _ping(self) -> None:
        assert self._conn is not None
        self._ping_id = pid = new_id()
        now = time.time()
        expiry = now + self._liveness.interval * self._liveness.liveness
        header = encode_command_header("mesh", "ping", id=pid, now=now, deadline=expiry)
        self._conn.send(self._sealed(header, encode_payload(None), now))

    def _report(self, transitions: list[Transition]) -> None:
        for old, new in transitions:
            level = logging.INFO if new is PeerState.UP else logging.WARNING
            log.log(level, "broker %s is %s (was %s)", self.broker, new, old)
            if self.on_state is not None:
                try:
                    self.on_state(self.broker, old, new)
                except Exception:  # a caller's hook must not stop the client's timer
                    log.exception("the on_state hook failed")

    def _close_link(self) -> None:
        """Close the current socket and its handshake watch; what it still queued is dropped."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._conn is not None:
            self._conn.close(linger_ms=0)
        elif self._sock is not None:
            self._sock.close(linger=0)
        self._conn = self._sock = None
        self._ping_id = None

    def _fail_over(self) -> None:
        assert self._loop is not None
        self._close_link()
        self._endpoints.advance()
        delay = self._liveness.retry_delay(len(self.brokers), random.random())
        if delay > 0:
            log.warning("no broker of %s answers; next try in %.2f s", list(self.brokers), delay)
            self._reconnect = self._loop.call_later(delay, self._open_link)
        else:
            self._open_link()

    def _open_link(self) -> None:
        """Connect to the current endpoint (or the next that opens) and resend every waiting call to it."""
        assert self._loop is not None
        self._reconnect = None
        for _ in self.brokers:
            endpoint = self._endpoints.current
            try:
                self._sock = dealer(self._ctx, endpoint, secure=self._watched)
                break
            except ConfigurationError as err:  # a malformed endpoint never works: skip it
                log.error("cannot fail over to %s: %s", endpoint, err.message)
                if self._watch is not None:  # made for the socket that did not connect
                    self._watch.close()
                    self._watch = None
                self._endpoints.advance()
        else:  # pragma: no cover - the first endpoint opened in __init__, so one is valid
            raise ConfigurationError("no broker endpoint can be opened")
        self.broker = endpoint
        self.failovers += 1
        self._rejoin.moved(time.monotonic())
        self._conn = conn = AsyncSocket(self._loop, self._sock, self._on_reply)
        self._report(self._liveness.connected(time.monotonic()))
        now = time.time()
        for call in self._waiting.values():
            if not call.fut.done():
                conn.send(call.frames(now))
        self._beat()  # the first heartbeat now: prove the new broker without waiting a tick

    async def close(self) -> None:
        """Fail calls still waiting and close the connection."""
        for timer in (self._sweeper, self._reconnect):
            if timer is not None:
                timer.cancel()
        for call in self._waiting.values():
            if not call.fut.done():
                call.fut.set_exception(UnavailableError("client closed"))
        for sub in list(self._subscriptions):
            await sub.close()
        self._close_link()
