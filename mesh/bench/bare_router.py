"""The floors `mesh bench --scale` measures the broker against: a bare libzmq ROUTER.

Rules of this module:

* The same number of connections as the broker's clients, from the same number of
  spawned processes (one ZeroMQ context each), to one pyzmq ROUTER in a spawned process
  of its own, bound with the broker's listen backlog and, with security on, as a CURVE
  server with a ZAP handler (pyzmq's own, admitting any key): CURVE without one admits
  anyone, so a secure broker has one, and libzmq holds about 10 KB more per connection
  with it (39.4 against 29.7 KB measured with 2,000). Each connection is a DEALER that
  sends one frame and receives it back, so that every link has carried a message both
  ways, as each broker client's first call does.
* The ROUTER's resident memory is read after one warm-up connection (the first costs it
  about 0.65 MB once) and once every other one has been answered; the difference per
  connection is what libzmq itself holds for a connected peer, which no code above it
  can give back.
* With a call `rate`, an echo process (one DEALER, the node's place) sits behind a
  second ROUTER of the same process, every frame goes through it, and after the first
  round every DEALER sends one 64-byte frame `rate` times a second at its own phase:
  the ROUTER process's CPU over `seconds` is what a forwarder that only moves frames
  costs at that rate, in a plain `Poller` loop as the broker's.
* It makes a second round of the connections' handshakes, so it lengthens each run by
  about as long as the broker's clients take to connect (and `seconds` with a rate). A
  hard limit of descriptors too low for the connections is said before anything starts.
* It runs before the broker is started, never beside it, and every process is stopped
  at the end.
"""

from __future__ import annotations

import heapq
import math
import multiprocessing as mp
import os
import queue
import random
import resource
import time
from typing import Any, Final

from ..broker.settings import BACKLOG
from .common import STARTUP_S, cpu_over, raise_fd_limit, rss_mb, set_event, stop_all

__all__ = ["bare_router_floor"]

CONNECT_S: Final = 90.0  # as long as the broker's clients are given
FDS_SPARE: Final = 64  # descriptors a ROUTER process needs besides one per connection


def _bound_router(ctx: Any, secret: bytes | None) -> tuple[Any, int]:
    import zmq

    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.BACKLOG, BACKLOG)
    if secret is not None:
        sock.curve_server = True
        sock.curve_secretkey = secret
    return sock, sock.bind_to_random_port("tcp://127.0.0.1")


def _serve(clients: Any, echo: tuple[Any, bytes] | None, count: int | None, until: float, stop: Any) -> int:
    """Answer `count` frames (None: until `stop`), straight back or through the echo
    process when there is one; how many were answered."""
    import zmq

    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    if echo is not None:
        poller.register(echo[0], zmq.POLLIN)
    answered, look = 0, time.monotonic()
    while (count is None or answered < count) and time.monotonic() < until:
        for sock, _ in poller.poll(100):
            if sock is clients:
                frames = clients.recv_multipart()
                if echo is None:
                    clients.send_multipart(frames)
                    answered += 1
                else:
                    echo[0].send_multipart([echo[1], *frames])
            else:
                clients.send_multipart(sock.recv_multipart()[1:])
                answered += 1
        if count is None and time.monotonic() >= look:
            look = time.monotonic() + 0.1
            if stop.is_set():
                break
    return answered


def _router(secret: bytes | None, total: int, rate: float, out: Any, stop: Any) -> None:
    """Bind and say where; answer the warm-up frame and say the memory; answer `total`
    more and say the memory again; with a `rate`, go on forwarding until `stop`."""
    import zmq

    raise_fd_limit()
    ctx = zmq.Context(1)
    auth = None
    if secret is not None:
        from zmq.auth import CURVE_ALLOW_ANY
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=CURVE_ALLOW_ANY)
    clients, port = _bound_router(ctx, secret)
    echo = None
    if rate:
        echo_sock, echo_port = _bound_router(ctx, secret)
        out.put((port, echo_port))
        if echo_sock.poll(int(STARTUP_S * 1000)):
            echo = (echo_sock, echo_sock.recv_multipart()[0])  # its hello says who it is
    else:
        out.put((port, None))
    until = time.monotonic() + STARTUP_S + CONNECT_S
    for count in (1, total):
        out.put((_serve(clients, echo, count, until, stop), rss_mb(os.getpid())))
    if echo is not None:
        _serve(clients, echo, None, float("inf"), stop)
    stop.wait()
    if auth is not None:
        auth.stop()
    ctx.destroy(linger=0)


def _dealer(ctx: Any, port: int, server_public: bytes | None, keys: tuple[bytes, bytes]) -> Any:
    import zmq

    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if server_public is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, *keys
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def _echo(port: int, server_public: bytes | None, stop: Any) -> None:
    """The node's place: one DEALER sending a hello, then every frame back until `stop`."""
    import zmq

    ctx = zmq.Context(1)
    sock = _dealer(ctx, port, server_public, zmq.curve_keypair())
    sock.send(b"hello")
    while not stop.is_set():
        if sock.poll(100):
            sock.send_multipart(sock.recv_multipart())
    ctx.destroy(linger=0)


def _dealers(port: int, count: int, server_public: bytes | None, rate: float, go: Any, stop: Any) -> None:
    """`count` DEALERs in this process: connect, one frame each way, then, with a `rate`,
    once `go` is set (every connection answered and the memory read), one frame that
    often each until `stop`."""
    import zmq

    raise_fd_limit()
    ctx = zmq.Context(1)
    ctx.max_sockets = count + 16  # libzmq's default is 1,023 per context
    keys = zmq.curve_keypair()
    socks = [_dealer(ctx, port, server_public, keys) for _ in range(count)]
    for sock in socks:
        sock.send(b"x")
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    waiting, deadline = len(socks), time.monotonic() + STARTUP_S + CONNECT_S
    while waiting and time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            sock.recv()
            waiting -= 1
    if rate and _either(go, stop):
        _call_at(socks, poller, rate, stop)
    stop.wait()
    ctx.destroy(linger=0)


def _either(go: Any, stop: Any) -> bool:
    """Wait until `go` or `stop` is set; whether it was `go`."""
    while not stop.is_set():
        if go.wait(0.1):
            return True
    return False


def _call_at(socks: list[Any], poller: Any, rate: float, stop: Any) -> None:
    """Each socket sends one frame every 1/`rate` s at its own phase; replies are read."""
    period = 1.0 / rate
    now = look = time.monotonic()
    due = [(now + random.uniform(0, period), i) for i in range(len(socks))]
    heapq.heapify(due)
    while True:
        now = time.monotonic()
        while due[0][0] <= now:
            at, i = heapq.heappop(due)
            socks[i].send(b"x" * 64)
            heapq.heappush(due, (at + period, i))
        for sock, _ in poller.poll(max(0, min(100, math.ceil((due[0][0] - now) * 1000)))):  # rounded down, it spins
            sock.recv()
        if now >= look:
            look = now + 0.1
            if stop.is_set():
                return


def _report(out: Any, procs: list[Any], wait: float) -> Any:
    """The ROUTER's next report; a process that died instead is an error at once."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=0.5)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a process of the bare ROUTER's run failed (exit code {dead[0]})") from None
    raise RuntimeError("the bare ROUTER's process did not report")


def _warm_up(port: int, server_public: bytes | None) -> None:
    """One connection and frame each way before the memory is first read: the first
    one costs the ROUTER about 0.65 MB once (its ZAP handler's first request), which
    would otherwise be spread over the connections measured (680 KB each with one)."""
    import zmq

    ctx = zmq.Context(1)
    try:
        sock = _dealer(ctx, port, server_public, zmq.curve_keypair())
        sock.send(b"x")
        if not sock.poll(int(STARTUP_S * 1000)):
            raise RuntimeError("the bare ROUTER did not answer its first connection")
        sock.recv()
    finally:
        ctx.destroy(linger=0)


def bare_router_floor(
    connections: int, processes: int, secure: bool, rate: float = 0.0, seconds: float = 0.0
) -> dict[str, Any]:
    """A bare ROUTER's resident memory with `connections` connected DEALERs and, with a
    `rate`, its CPU over `seconds` forwarding their frames (module rules).

    Raises:
        RuntimeError: not every connection was answered within `CONNECT_S`, a process of
            the run failed, or the descriptors allowed are too few for `connections`.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if connections + FDS_SPARE > hard:
        raise RuntimeError(
            f"{connections} connections need about {connections + FDS_SPARE} file descriptors in one process "
            f"(the ROUTER's, as the broker's); the hard limit is {hard} (ulimit -Hn)"
        )
    import zmq

    ctx = mp.get_context("spawn")
    out, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    public, secret = zmq.curve_keypair() if secure else (None, None)
    procs: list[Any] = []
    busy = None
    try:
        procs.append(ctx.Process(target=_router, args=(secret, connections, rate, out, stop), daemon=True))
        procs[0].start()
        port, echo_port = _report(out, procs, STARTUP_S)
        if echo_port is not None:
            procs.append(ctx.Process(target=_echo, args=(echo_port, public, stop), daemon=True))
            procs[-1].start()
        _warm_up(port, public)
        _, before = _report(out, procs, STARTUP_S)
        for i in range(processes):
            count = connections // processes + (i < connections % processes)
            procs.append(ctx.Process(target=_dealers, args=(port, count, public, rate, go, stop), daemon=True))
            procs[-1].start()
        echoed, with_them = _report(out, procs, CONNECT_S + STARTUP_S)
        if echoed < connections:
            raise RuntimeError(f"the bare ROUTER answered {echoed} of {connections} connections in {CONNECT_S:g} s")
        if rate:
            set_event(go)
            time.sleep(1.0)  # as the broker's window, from a second after the callers start
            busy, _ = cpu_over(procs[0].pid, [], seconds)
    finally:
        stop_all(stop, procs)
    return {"rss_mb": {"before": before, "connected": with_them},
            "kb_per_connection": (with_them - before) * 1024 / connections, "busy_cpu": busy}
