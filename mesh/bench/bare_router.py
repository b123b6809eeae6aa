"""The floor `mesh bench --scale` measures the broker's memory against: a bare libzmq ROUTER.

Rules of this module:

* The same number of connections as the broker's clients, from the same number of
  spawned processes (one ZeroMQ context each), to one pyzmq ROUTER in a spawned process
  of its own, bound with the broker's listen backlog and, with security on, as a CURVE
  server with a ZAP handler (pyzmq's own, admitting any key): CURVE without one admits
  anyone, so a secure broker has one, and libzmq holds about 10 KB more per connection
  with it (39.4 against 29.7 KB measured with 2,000). Each connection is a
  DEALER that sends one frame and receives it back, so that every link has carried a
  message both ways, as each broker client's first call does.
* The ROUTER's resident memory is read after one warm-up connection (the first costs it
  about 0.65 MB once) and once every other one has been answered; the difference per
  connection is what libzmq itself holds for a connected peer, which no code above it
  can give back.
* It makes a second round of the connections' handshakes, so it lengthens each run by
  about as long as the broker's clients take to connect. A hard limit of descriptors
  too low for the connections is said before anything starts.
* It runs before the broker is started, never beside it, and every process is stopped
  at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import resource
import time
from typing import Any, Final

from ..broker.settings import BACKLOG
from .common import STARTUP_S, raise_fd_limit, rss_mb, stop_all

__all__ = ["bare_router_memory"]

CONNECT_S: Final = 90.0  # as long as the broker's clients are given
FDS_SPARE: Final = 64  # descriptors a ROUTER process needs besides one per connection


def _router(secret: bytes | None, total: int, out: Any, stop: Any) -> None:
    """Bind and say where; echo the warm-up frame and say the memory; echo `total` more
    frames and say the memory again."""
    import zmq

    raise_fd_limit()
    ctx = zmq.Context(1)
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.BACKLOG, BACKLOG)
    auth = None
    if secret is not None:
        from zmq.auth import CURVE_ALLOW_ANY
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=CURVE_ALLOW_ANY)
        sock.curve_server = True
        sock.curve_secretkey = secret
    out.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    deadline = time.monotonic() + STARTUP_S + CONNECT_S
    for count in (1, total):
        echoed = 0
        while echoed < count and time.monotonic() < deadline:
            if sock.poll(100):
                sock.send_multipart(sock.recv_multipart())
                echoed += 1
        out.put((echoed, rss_mb(os.getpid())))
    stop.wait()
    if auth is not None:
        auth.stop()
    ctx.destroy(linger=0)


def _dealers(port: int, count: int, server_public: bytes | None, stop: Any) -> None:
    """`count` DEALERs in this process: connect, one frame each way, then hold on until `stop`."""
    import zmq

    raise_fd_limit()
    ctx = zmq.Context(1)
    ctx.max_sockets = count + 16  # libzmq's default is 1,023 per context
    public, secret = zmq.curve_keypair()
    socks = []
    for _ in range(count):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if server_public is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
        sock.connect(f"tcp://127.0.0.1:{port}")
        socks.append(sock)
    for sock in socks:
        sock.send(b"x")
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    waiting, deadline = len(socks), time.monotonic() + STARTUP_S + CONNECT_S
    while waiting and time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            sock.recv()
            poller.unregister(sock)
            waiting -= 1
    stop.wait()
    ctx.destroy(linger=0)


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
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if server_public is not None:
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send(b"x")
        if not sock.poll(int(STARTUP_S * 1000)):
            raise RuntimeError("the bare ROUTER did not answer its first connection")
        sock.recv()
    finally:
        ctx.destroy(linger=0)


def bare_router_memory(connections: int, processes: int, secure: bool) -> dict[str, Any]:
    """A bare ROUTER's resident memory with `connections` connected DEALERs (module rules).

    Raises:
        RuntimeError: not every connection was answered within `CONNECT_S`, a process of
            the run failed, or the descriptors allowed are too few for `connections`.
    """
    need = connections + FDS_SPARE
    if need > resource.getrlimit(resource.RLIMIT_NOFILE)[1]:
        raise RuntimeError(
            f"{connections} connections need about {need} file descriptors in one process (the ROUTER's, "
            f"as the broker's); the hard limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[1]} (ulimit -Hn)"
        )
    import zmq

    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    public, secret = zmq.curve_keypair() if secure else (None, None)
    procs: list[Any] = []
    try:
        router = ctx.Process(target=_router, args=(secret, connections, out, stop), daemon=True)
        router.start()
        procs.append(router)
        port = _report(out, procs, STARTUP_S)
        _warm_up(port, public)
        _, before = _report(out, procs, STARTUP_S)
        per = [connections // processes + (i < connections % processes) for i in range(processes)]
        for count in per:
            p = ctx.Process(target=_dealers, args=(port, count, public, stop), daemon=True)
            p.start()
            procs.append(p)
        echoed, with_them = _report(out, procs, CONNECT_S + STARTUP_S)
        if echoed < connections:
            raise RuntimeError(f"the bare ROUTER answered {echoed} of {connections} connections in {CONNECT_S:g} s")
    finally:
        stop_all(stop, procs)
    return {"rss_mb": {"before": before, "connected": with_them},
            "kb_per_connection": (with_them - before) * 1024 / connections}
