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
* The ROUTER's resident memory is read before the connections and once every one has
  been answered; the difference per connection is what libzmq itself holds for a
  connected peer, which no code above it can give back.
* It runs before the broker is started, never beside it, and every process is stopped
  at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from typing import Any, Final

from ..broker.settings import BACKLOG
from .common import STARTUP_S, raise_fd_limit, rss_mb, stop_all

__all__ = ["bare_router_memory"]

CONNECT_S: Final = 90.0  # as long as the broker's clients are given


def _router(secret: bytes | None, total: int, out: Any, stop: Any) -> None:
    """Bind, say where and the memory before, echo `total` frames, then say the memory."""
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
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    out.put((port, rss_mb(os.getpid())))
    echoed, deadline = 0, time.monotonic() + CONNECT_S
    while echoed < total and time.monotonic() < deadline:
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
    stop.wait()
    ctx.destroy(linger=0)


def _report(out: Any, procs: list[Any]) -> tuple[int, float]:
    """The ROUTER's second report; a process that died instead is an error at once."""
    deadline = time.monotonic() + CONNECT_S + STARTUP_S
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=0.5)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a process of the bare ROUTER's run failed (exit code {dead[0]})") from None
    raise RuntimeError("the bare ROUTER's process did not report")


def bare_router_memory(connections: int, processes: int, secure: bool) -> dict[str, Any]:
    """A bare ROUTER's resident memory with `connections` connected DEALERs (module rules).

    Raises:
        RuntimeError: not every connection was answered within `CONNECT_S`.
    """
    import zmq

    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    public, secret = zmq.curve_keypair() if secure else (None, None)
    procs: list[Any] = []
    try:
        router = ctx.Process(target=_router, args=(secret, connections, out, stop), daemon=True)
        router.start()
        procs.append(router)
        port, before = out.get(timeout=STARTUP_S)
        per = [connections // processes + (i < connections % processes) for i in range(processes)]
        for count in per:
            p = ctx.Process(target=_dealers, args=(port, count, public, stop), daemon=True)
            p.start()
            procs.append(p)
        echoed, with_them = _report(out, procs)
        if echoed < connections:
            raise RuntimeError(f"the bare ROUTER answered {echoed} of {connections} connections in {CONNECT_S:g} s")
    finally:
        stop_all(stop, procs)
    return {"rss_mb": {"before": before, "connected": with_them},
            "kb_per_connection": (with_them - before) * 1024 / connections}
