"""The one place that opens ZeroMQ sockets, so every socket gets the same safe options.

Rules of this module:

* Every socket has a bounded linger, so a stuck peer cannot hang a process at exit.
* ROUTER sockets are mandatory-routing: a send to a vanished peer raises instead of
  vanishing (`zmq.ZMQError` with EHOSTUNREACH), and the loop reports it to its core.
* Oversized frames are cut off by libzmq itself (`MAXMSGSIZE`) before Python sees them.
* No socket runs ZMTP heartbeats (`ZMQ_HEARTBEAT_IVL`): libzmq 4.3.5 (and its master)
  aborts the process (`Assertion failed: !_io_error`, stream_engine_base.cpp) when a
  heartbeat is written on a connection whose input stopped at the high-water mark and
  whose peer then closed it, which is what a paused process meets when it resumes
  (libzmq issues 4364, 3937, 4767; docs/operations.md, "A paused broker"). Both ends
  must be quiet: a PING received while that connection drains is answered with a PONG
  written the same way. What the heartbeats did is done by TCP instead, which never
  writes from a timer in libzmq: keepalive probes (`ZMQ_TCP_KEEPALIVE_*`) drop an idle
  connection whose peer vanished without closing it (a pulled cable, a lost host), and
  `ZMQ_TCP_MAXRT` (Linux `TCP_USER_TIMEOUT`) drops one whose data stays unacknowledged
  that long. A DEALER then reconnects, a ROUTER forgets the peer, so the next send to it
  is undeliverable and the broker settles what that peer owed. A process that is only
  paused keeps its connections: its kernel still acknowledges. Whether the *process* at
  the other end works is what the application's own heartbeats (`mesh.heartbeat`,
  `mesh.ping`, Raft's) decide.
* `ZMQError` is turned into `NetworkError`/`ConfigurationError` here, at the boundary.
* The SDK's clients of one process share one context (`shared_context`): a context
  starts two threads and a few descriptors, which capped one process near 2,200
  clients when each had its own. A child made by `fork` makes its own on first use
  (a context does not survive a fork).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Final

import zmq

from .protocol import MAX_HEADER_BYTES, MAX_MESSAGE_BYTES, ConfigurationError
from .protocol.topics import MAX_UPSTREAM_BYTES

__all__ = [
    "router",
    "dealer",
    "publisher",
    "subscriber",
    "peer_router",
    "peer_dealer",
    "shared_context",
    "bound_endpoint",
    "send_frames",
    "recv_frames",
    "recv_frames_from",
    "frame_peer",
    "LINGER_MS",
    "Secure",
]

Secure = Callable[[zmq.Socket], None]  # sets CURVE options on a socket before it binds or connects

LINGER_MS: Final = 500
HWM: Final = 100_000
# Plain ints: pyzmq's flag enums make every `|` and `&` a Python-level call on the hot path.
_NOBLOCK: Final = int(zmq.NOBLOCK)
_MORE_NOBLOCK: Final = int(zmq.SNDMORE) | _NOBLOCK
# The compiled backend's send, without pyzmq's Python-level wrapper (which only adds the
# DRAFT `routing_id` and `group` arguments): 0.25 us less per frame, several frames a message.
_send: Final = zmq.backend.Socket.send
# TCP liveness of a connection (see the module rules): keepalive probes after this much
# idleness, one a second, the connection dropped after three unanswered; and a connection
# whose sent data stays unacknowledged this long is dropped.
KEEPALIVE_IDLE_S: Final = 10
KEEPALIVE_INTVL_S: Final = 1
KEEPALIVE_CNT: Final = 3
TCP_MAXRT_MS: Final = 6000


_shared: tuple[int, zmq.Context] | None = None  # (the pid that made it, the context)
_shared_lock = threading.Lock()


def shared_context() -> zmq.Context:
    """The one context of this process's SDK clients, made on first use (again in a forked child).

    It is never terminated: a client closes its own sockets, and the context's two
    threads serve the next client. It may hold as many sockets as libzmq allows (each
    client holds three: its DEALER and the two ends of its handshake monitor), not
    libzmq's default 1,023.

    Returns:
        The context; thread-safe, as every ZeroMQ context is.
    """
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid() or _shared[1].closed:
            ctx = zmq.Context()
            ctx.max_sockets = ctx.get(zmq.SOCKET_LIMIT)
            _shared = (os.getpid(), ctx)
        return _shared[1]


def recv_frames(sock: zmq.Socket) -> list[bytes]:
    """Receive one whole multipart message without blocking.

    Reading `Frame.more` is cheaper than `recv_multipart`'s socket-option call per frame.

    Raises:
        zmq.Again: nothing is waiting.
    """
    recv = sock.recv
    frame = recv(_NOBLOCK, copy=False)
    parts = [frame.bytes]
    while frame.more:
        frame = recv(_NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts


def recv_frames_from(sock: zmq.Socket) -> tuple[list[bytes], str | None, str | None]:
    """Like `recv_frames`, plus who sent it: the ZAP User-Id (the CURVE key's name) and IP.

    Raises:
        zmq.Again: nothing is waiting.
    """
    recv = sock.recv
    frame = recv(_NOBLOCK, copy=False)
    user, address = frame_peer(frame)
    parts = [frame.bytes]
    while frame.more:
        frame = recv(_NOBLOCK, copy=False)
        parts.append(frame.bytes)
    return parts, user, address


def frame_peer(frame: zmq.Frame) -> tuple[str | None, str | None]:
    """The (User-Id, Peer-Address) libzmq attached to a frame received with copy=False.

    Returns:
        The CURVE key's name given by the broker's ZAP handler (None on a plain link),
        and the peer's IP address (None on ipc:// and inproc://).
    """
    return _property(frame, "User-Id"), _property(frame, "Peer-Address")


def _property(frame: zmq.Frame, name: str) -> str | None:
    try:
        value = frame.get(name)
    except zmq.ZMQError:  # not set on this connection (no ZAP handler, or not TCP)
        return None
    return value if isinstance(value, str) and value else None


def send_frames(sock: zmq.Socket, frames: list[bytes], first: bytes | None = None) -> None:
    """Send one multipart message without blocking, `first` (a routing id) before `frames`.

    Raises:
        zmq.ZMQError: EAGAIN when the peer's queue is full, EHOSTUNREACH from a ROUTER
            when the peer is gone; the caller's loop decides what that means.
    """
    send = _send
    if first is not None:
        send(sock, first, _MORE_NOBLOCK)
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(sock, frame, _NOBLOCK if i == last else _MORE_NOBLOCK)


def _prepare_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        directory = os.path.dirname(endpoint[len("ipc://"):])
        if directory:
            os.makedirs(directory, exist_ok=True)


def _common(sock: zmq.Socket, max_message_bytes: int) -> None:
    sock.linger = LINGER_MS
    sock.sndhwm = HWM
    sock.rcvhwm = HWM
    # A backstop for memory: libzmq drops the link of a peer sending a frame past twice
    # the limit. Messages between the limit and that get a MESSAGE_TOO_LARGE answer.
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes + MAX_HEADER_BYTES)


def _tcp_liveness(sock: zmq.Socket) -> None:
    """Let the kernel drop a TCP connection whose peer vanished (see the module rules)."""
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
    sock.setsockopt(zmq.TCP_MAXRT, TCP_MAXRT_MS)


def _attach(
    sock: zmq.Socket, attach: Callable[[str], Any], endpoint: str, verb: str, secure: Secure | None = None
) -> zmq.Socket:
    """Secure (when asked), then bind or connect `sock`; on failure close it and say why."""
    try:
        if secure is not None:
            secure(sock)
        attach(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ConfigurationError(f"cannot {verb} {endpoint}: {exc.strerror}", details={"endpoint": endpoint}) from None
    return sock


def router(
    ctx: zmq.Context,
    endpoint: str,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    secure: Secure | None = None,
    backlog: int | None = None,
) -> zmq.Socket:
    """A bound ROUTER with mandatory routing and TCP liveness.

    Args:
        backlog: connections the kernel queues until libzmq accepts them (`ZMQ_BACKLOG`);
            None keeps libzmq's 100.

    Raises:
        ConfigurationError: the endpoint is malformed or already in use.
    """
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, max_message_bytes)
    if backlog is not None:
        sock.setsockopt(zmq.BACKLOG, backlog)
    _tcp_liveness(sock)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    _prepare_ipc(endpoint)
    return _attach(sock, sock.bind, endpoint, "listen on", secure)


def dealer(
    ctx: zmq.Context, endpoint: str, max_message_bytes: int = MAX_MESSAGE_BYTES, secure: Secure | None = None
) -> zmq.Socket:
    """A DEALER connected to a broker, with TCP liveness; libzmq reconnects it by itself.

    Raises:
        ConfigurationError: the endpoint is malformed.
    """
    sock = ctx.socket(zmq.DEALER)
    _common(sock, max_message_bytes)
    _tcp_liveness(sock)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    return _attach(sock, sock.connect, endpoint, "connect to", secure)


def publisher(
    ctx: zmq.Context, endpoint: str, hwm: int, secure: Secure | None = None, backlog: int | None = None
) -> zmq.Socket:
    """A bound XPUB for the broker's events: `hwm` messages queue per subscriber, then
    that subscriber misses events (it sees the gap); the others and the sender never wait.

    Every (un)subscription is passed up (XPUB_VERBOSER), so the broker sees each
    subscriber's sync request even when another asked for the same filter, and none
    takes effect by itself (XPUB_MANUAL): the broker applies the filters it allows with
    `setsockopt(SUBSCRIBE)` right after reading the message that asked for them.

    Args:
        backlog: as for `router`.

    Raises:
        ConfigurationError: the endpoint is malformed or already in use.
    """
    sock = ctx.socket(zmq.XPUB)
    _common(sock, MAX_MESSAGE_BYTES)
    if backlog is not None:
        sock.setsockopt(zmq.BACKLOG, backlog)
    sock.sndhwm = hwm
    sock.setsockopt(zmq.XPUB_VERBOSER, 1)
    sock.setsockopt(zmq.XPUB_MANUAL, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_UPSTREAM_BYTES)  # what subscribers send: filters, tokens, reports
    _prepare_ipc(endpoint)
    return _attach(sock, sock.bind, endpoint, "listen on", secure)


def subscriber(
    ctx: zmq.Context, endpoint: str, hwm: int, max_message_bytes: int = MAX_MESSAGE_BYTES, secure: Secure | None = None
) -> zmq.Socket:
    """An XSUB connected to a broker's events; it can also send reports upstream.

    Raises:
        ConfigurationError: the endpoint is malformed.
    """
    sock = ctx.socket(zmq.XSUB)
    _common(sock, max_message_bytes)
    sock.rcvhwm = hwm
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    return _attach(sock, sock.connect, endpoint, "connect to", secure)


def peer_router(ctx: zmq.Context, endpoint: str, max_message_bytes: int, hwm: int, secure: Secure | None = None) -> zmq.Socket:
    """The bound ROUTER on which a broker receives its cluster peers' messages.

    Like `router`, with a small queue (`hwm`) because the consensus core resends what
    is lost, and ROUTER_HANDOVER: a peer that restarts takes over its routing id at
    once instead of being refused until its old link times out.

    Raises:
        ConfigurationError: the endpoint is malformed or already in use.
    """
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, max_message_bytes)
    sock.sndhwm = sock.rcvhwm = hwm
    _tcp_liveness(sock)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    _prepare_ipc(endpoint)
    return _attach(sock, sock.bind, endpoint, "listen on", secure)


def peer_dealer(
    ctx: zmq.Context,
    endpoint: str,
    routing_id: bytes,
    max_message_bytes: int,
    hwm: int,
    secure: Secure | None = None,
) -> zmq.Socket:
    """A DEALER to one cluster peer's ROUTER, named `routing_id` (the sender's member id).

    IMMEDIATE: messages queue only on a link that is up (and, with CURVE, past its
    handshake), so a send to a peer that is down fails at once (EAGAIN) instead of
    queueing stale consensus messages for when it returns.

    Raises:
        ConfigurationError: the endpoint is malformed.
    """
    sock = ctx.socket(zmq.DEALER)
    _common(sock, max_message_bytes)
    sock.sndhwm = sock.rcvhwm = hwm
    _tcp_liveness(sock)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    return _attach(sock, sock.connect, endpoint, "connect to", secure)


def bound_endpoint(sock: zmq.Socket) -> str:
    """The address a socket really listens on (resolves `tcp://127.0.0.1:*`)."""
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)
