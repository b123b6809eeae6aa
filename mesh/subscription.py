"""Subscribing to a broker's events: sequence checks, replay, and the seam between them.

Rules of this module:

* `SubscriptionState` is the sans-IO core: frames and replay answers in, `Event`s and
  `Gap`s out. `AsyncSubscription` is its thin loop around one XSUB socket.
* A subscription sets its prefix filter, then a control filter of its own. The broker
  answers the control filter with a sync marker; from then on everything published
  under the prefix reaches the subscription or shows up as a gap.
* Events of one topic carry consecutive sequence numbers. A jump is reported as a
  `Gap` before the event after it (the subscriber fell behind and the broker's queue
  for it overflowed, or the link broke); a number lower than the last one means the
  broker restarted and numbering began again.
* On a secure broker a subscription shows its token with an auth filter (`AUTH` +
  token, sent between the prefix filter and the control filter; the broker never
  publishes to it). The broker applies the prefix filter only if the token's roles may
  subscribe to it; a refusal comes back in the sync marker's `refused` list and
  `start()` raises it (ACCESS_DENIED and the others, by their codes).
* With `from_seq`, the retained events after it are fetched with `mesh.replay` once
  the marker has come, page by page; live events that the replay already delivered
  are skipped. Events that arrived before the marker are in the replay too, so they
  are dropped. No duplicate, no hole at the seam.
* Messages are read only when the application asks for the next item, so a slow
  application lets the queues (its own and the broker's, both bounded by `hwm`) fill
  and the broker drop for it alone: memory stays bounded and the drops become gaps.
* An event that claims level 3 is checked like a command at a node: its signature must
  verify with the trust store's key of the publisher the broker stamped in its header
  (`sender`). An event that fails (or an encrypted one that does not decrypt) is never
  delivered: it becomes a one-event `Gap` with reason "refused" and the error, counted
  in `refused`, and its number still counts as seen, so no "dropped" gap follows.
* Counts go upstream to the broker (received, missed) at most once a second while they
  change, and once more on close, so operators see each subscriber's drops.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import zmq

from .protocol import (
    DeadlineExceededError,
    ErrorCode,
    MeshError,
    UnavailableError,
    check_topic,
    decode_payload,
    error_from_wire,
    new_id,
    unpack_header,
)
from .protocol.topics import AUTH, CONTROL, REPORT, subscription_filter
from .security.envelope import Opener
from .sockets import recv_frames, send_frames, subscriber

__all__ = ["Event", "Gap", "SubscriptionState", "AsyncSubscription", "DEFAULT_HWM"]

DEFAULT_HWM: Final = 10_000
REPORT_S: Final = 1.0
RESYNC_S: Final = 1.0  # a sync request unanswered this long is sent again
WAIT_S: Final = 0.1  # longest sleep between reads: ZeroMQ's descriptor only signals edges
# What makes an event "refused" rather than malformed: it came whole but is not to be trusted.
_SECURITY_CODES: Final = frozenset({ErrorCode.SIGNATURE_INVALID, ErrorCode.ENCRYPTION_FAILED})


@dataclass(frozen=True, slots=True)
class Event:
    """One event as a subscriber receives it."""

    topic: str
    seq: int
    id: str
    timestamp: float
    payload: Any
    metadata: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Gap:
    """Events of `topic` numbered `first` to `last` that this subscriber will not see.

    `reason` is "dropped" (it fell behind, or the link broke), "expired" (a replay asked
    for events older than the broker still keeps; `last + 1` is the first one kept),
    "reset" (the broker restarted and numbering began again at `last + 1`) or
    "refused" (the event came but failed its signature or decryption: `error` says why,
    e.g. SIGNATURE_INVALID with `details["reason"]`).
    """

    topic: str
    first: int
    last: int
    reason: str
    error: MeshError | None = None

    @property
    def count(self) -> int:
        return max(0, self.last - self.first + 1)


Item = Event | Gap


class SubscriptionState:
    """The sans-IO core of one subscription (see the module rules).

    Args:
        prefix: the topic prefix ('' for every topic).
        from_seq: None to start live; else replay after this number (every topic) or
            after each topic's number in the map.
        opener: checks signatures and decrypts (default: no trust store, no key ring,
            so every event claiming a signature is refused).
    """

    def __init__(
        self, prefix: str, from_seq: int | Mapping[str, int] | None, opener: Opener | None = None
    ) -> None:
        if prefix:
            check_topic(prefix, "prefix")
        if isinstance(from_seq, Mapping):
            self._after, self.positions = 0, dict(from_seq)
        elif from_seq is not None:
            if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 0:
                raise ValueError("from_seq must be a sequence number (an integer >= 0) or a map of them")
            self._after, self.positions = from_seq, {}
        else:
            self._after, self.positions = 0, {}
        self.prefix = prefix
        self.id = new_id()
        # The sync filter's id is secret: new_id()'s first half is the process's, public in
        # every id it sends, and a prefix of a sync filter receives its markers.
        self.control = CONTROL + secrets.token_hex(16).encode()
        self.replaying = from_seq is not None
        self.synced = False
        self.denied: MeshError | None = None  # what the broker refused, told by its marker
        self.epoch: str | None = None
        self.received = 0
        self.missed = 0
        self.malformed = 0
        self.refused = 0
        self.opener = opener or Opener()
        # Per topic: the last number the replay delivered; live events up to it are repeats.
        self._seam: dict[str, int] = {}
        self._reported: tuple[int, int] = (0, 0)
        self._report_filter: bytes | None = None
        self._last_report = 0.0

    # ------------------------------------------------------------------ upstream

    def filters(self, token: str | None = None) -> list[bytes]:
        """What to send upstream first: subscribe to the prefix, show the token (on a
        secure broker), then subscribe to the control filter."""
        auth = [b"\x01" + AUTH + token.encode()] if token else []
        return [b"\x01" + subscription_filter(self.prefix), *auth, b"\x01" + self.control]

    def resync(self) -> None:
        """Forget the last sync, to subscribe again under a fresh control filter."""
        self.control = CONTROL + secrets.token_hex(16).encode()
        self.synced, self.denied = False, None

    def report(self, now: float, force: bool = False) -> list[bytes]:
        """A drop report for the broker, when the counts changed and one is due: the
        subscription of a `REPORT` filter carrying it, then the unsubscription of the one
        before (upstream messages other than (un)subscriptions are refused: they would
        shift which link libzmq applies the broker's decisions to)."""
        counts = (self.received, self.missed)
        if counts == self._reported or (not force and now - self._last_report < REPORT_S):
            return []
        self._reported, self._last_report = counts, now
        body = msgpack.packb({"sub": self.id, "prefix": self.prefix, "received": counts[0], "missed": counts[1]})
        out = [b"\x01" + REPORT + body]
        if self._report_filter is not None:
            out.append(b"\x00" + self._report_filter)
        self._report_filter = REPORT + body
        return out

    # ---------------------------------------------------------------- downstream

    def on_message(self, frames: list[bytes], now: float) -> tuple[list[Item], list[bytes]]:
        """A message from the broker: the items it yields and what to send upstream.

        Args:
            frames: the message.
            now: the Unix time (trust store and key ring reloads).
        """
        if len(frames) != 3:
            self.malformed += 1
            return [], []
        if frames[0].startswith(CONTROL):
            if frames[0] != self.control or self.synced:
                return [], []  # another subscriber's marker (a '' filter sees them all)
            self.synced = True
            try:
                body = decode_payload(frames[2])
                self.epoch = body.get("epoch")
                refused = body.get("refused") or []
                if refused:
                    first = refused[0]
                    self.denied = error_from_wire(
                        int(first["code"]), f"the broker refused the subscription to {self.prefix or '*'}: "
                        f"{first['reason']}", False, {"refused": refused},
                    )  # fmt: skip
            except (MeshError, AttributeError, KeyError, TypeError, ValueError):
                self.epoch = None
            return [], [b"\x00" + self.control]
        if self.replaying:
            return [], []  # the replay that follows the marker holds these as well
        return self._accept(frames[1], frames[2], now, live=True), []

    def replay_request(self) -> dict[str, Any]:
        """The payload of the next `mesh.replay` call."""
        return {"prefix": self.prefix, "after": self._after, "positions": self.positions}

    def on_replay(self, answer: Mapping[str, Any], now: float) -> tuple[list[Item], bool]:
        """A page of the replay: its items, and whether to ask for another page (`now`: the Unix time)."""
        items: list[Item] = []
        for gap in answer.get("gaps", ()):
            topic, after, first = gap["topic"], gap["after"], gap["first"]
            items.append(Gap(topic, after + 1, first - 1, "expired"))
            self.missed += first - 1 - after
            self.positions[topic] = first - 1
        for header, payload in answer.get("events", ()):
            items.extend(self._accept(header, payload, now, live=False))
        more = bool(answer.get("more"))
        if not more:
            self.replaying = False
            self._seam = dict(self.positions)
        return items, more

    def _accept(self, header_frame: bytes, payload_frame: bytes, now: float, *, live: bool) -> list[Item]:
        try:
            header = unpack_header(header_frame)
            topic, seq = header["topic"], header["seq"]
        except (MeshError, KeyError):
            self.malformed += 1
            return []
        items: list[Item] = []
        last = self.positions.get(topic)
        if last is None and not live:
            last = self._after
        if live and topic in self._seam:
            if seq <= self._seam[topic]:
                return []  # the replay delivered it already
            del self._seam[topic]
        if last is not None:
            if seq > last + 1:
                items.append(Gap(topic, last + 1, seq - 1, "dropped"))
                self.missed += seq - 1 - last
            elif seq <= last:
                items.append(Gap(topic, 1, seq - 1, "reset"))
        self.positions[topic] = seq
        try:
            payload = decode_payload(self.opener.open(header, payload_frame, now, header.get("sender")))
        except MeshError as err:
            if err.code in _SECURITY_CODES:
                self.refused += 1
                items.append(Gap(topic, seq, seq, "refused", err))
            else:
                self.malformed += 1
            return items
        self.received += 1
        items.append(Event(topic, seq, header["id"], header["ts"], payload, header.get("metadata", {})))
        return items


class AsyncSubscription:
    """A subscription on the running asyncio loop; `AsyncClient.subscribe` makes them.

    Iterate with `async for`, or `await get(timeout)`; `await close()` when done.
    """

    def __init__(
        self,
        endpoint: str,
        prefix: str,
        from_seq: int | Mapping[str, int] | None,
        *,
        ctx: zmq.Context[zmq.Socket[bytes]],
        hwm: int,
        replay: Callable[[dict[str, Any]], Awaitable[Any]],
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
        opener: Opener | None = None,
        token: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.state = SubscriptionState(prefix, from_seq, opener)
        self._token = token
        self._replay = replay
        self._sock = subscriber(ctx, endpoint, hwm, secure=secure)
        self._fd = self._sock.fileno()
        self._ready: deque[Item] = deque()

    async def start(self, timeout: float) -> None:
        """Wait for the broker's sync marker, then replay if asked to.

        Raises:
            DeadlineExceededError: no marker within `timeout` (is the broker there?).
            MeshError: the broker refused the subscription (ACCESS_DENIED: the role may not
                subscribe to the prefix; AUTHENTICATION_FAILED: no valid token), by its code.
        """
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.state.filters(self._token()):
                self._sock.send(frame)
            resend = min(deadline, time.monotonic() + RESYNC_S)
            while not self.state.synced and time.monotonic() < resend:
                await self._read(resend - time.monotonic())
            if not self.state.synced:
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError("the broker did not confirm the subscription in time")
                continue  # a sync request the broker could not apply: ask again
            denied = self.state.denied
            if denied is None:
                break
            if not isinstance(denied, UnavailableError) or time.monotonic() >= deadline:
                raise denied
            self.state.resync()  # the broker could not tell our link then: subscribe again
        more = self.state.replaying
        while more:
            items, more = self.state.on_replay(await self._replay(self.state.replay_request()), time.time())
            self._ready.extend(items)

    async def _read(self, timeout: float | None) -> bool:
        """Handle one message from the socket, waiting up to `timeout`; False if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                frames = recv_frames(self._sock)
            except zmq.Again:
                left = WAIT_S if deadline is None else min(WAIT_S, deadline - time.monotonic())
                if left <= 0:
                    return False
                await self._readable(left)
                continue
            items, upstream = self.state.on_message(frames, time.time())
            self._ready.extend(items)
            for frame in upstream:
                self._sock.send(frame)
            self._send_report(force=False)
            return True

    async def _readable(self, timeout: float) -> None:
        """Wait until the socket signals or `timeout` passes.

        One future woken by either, awaited directly: Python 3.11's `asyncio.wait_for`
        swallows a cancellation that arrives in the turn its inner future completes,
        which left a cancelled subscriber reading forever (and `mesh mcp` never exiting).
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(self._fd, wake)
        timer = loop.call_later(timeout, wake)
        try:
            await fut
        finally:
            timer.cancel()
            loop.remove_reader(self._fd)

    def _send_report(self, force: bool) -> None:
        for frame in self.state.report(time.monotonic(), force):
            try:
                send_frames(self._sock, [frame])
            except zmq.Again:
                pass  # the next report carries the same totals

    async def get(self, timeout: float | None = None) -> Item | None:
        """The next event or gap; None if nothing came within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            await self._read(left)
        return self._ready.popleft()

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Item:
        item = await self.get()
        assert item is not None  # no timeout: get() waits until there is one
        return item

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def positions(self) -> dict[str, int]:
        """Last sequence number seen per topic: pass it as `from_seq` to resume."""
        return dict(self.state.positions)

    @property
    def received(self) -> int:
        return self.state.received

    @property
    def missed(self) -> int:
        return self.state.missed

    @property
    def refused(self) -> int:
        """Events that came but failed their signature or decryption (each also a `Gap`)."""
        return self.state.refused

    async def close(self) -> None:
        """Tell the broker the final counts and close the socket."""
        if self._sock.closed:
            return
        self._send_report(force=True)
        self._sock.close(linger=100)
