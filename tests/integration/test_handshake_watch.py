"""What a client's HandshakeWatch reports of a broker host that has not answered its connection yet."""

from __future__ import annotations

import socket
import time

import zmq

from mesh.security.curve import HandshakeWatch


def test_a_connection_the_broker_host_has_not_answered_yet_counts_as_handshaking():
    """Invariant: while a TCP connection is being made (a listener whose accept queue is
    full drops the SYN, as a broker under thousands of reconnecting clients does), the watch
    reports `handshaking`, so a client whose only broker that is waits instead of replacing
    the link, which would only start the connection again (broken once on purpose by not
    watching CONNECT_DELAYED: `handshaking` stayed False); a refused connection never is."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue: later SYNs are dropped, not refused
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        with HandshakeWatch(dealer) as watch:
            dealer.connect(f"tcp://127.0.0.1:{port}")
            deadline = time.monotonic() + 5
            while not watch.handshaking and time.monotonic() < deadline:
                watch.check()
                time.sleep(0.05)
            assert watch.handshaking
        dealer.close()
        # A port nobody listens on refuses at once: never handshaking.
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
        closed.close()
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        with HandshakeWatch(dealer) as watch:
            dealer.connect(f"tcp://127.0.0.1:{refused_port}")
            seen = []
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                watch.check()
                seen.append(watch.handshaking)
                time.sleep(0.02)
            assert not seen[-1]
        dealer.close()
    finally:
        for s in fillers:
            s.close()
        listener.close()
        ctx.destroy(linger=0)  # closes what an assertion left open
