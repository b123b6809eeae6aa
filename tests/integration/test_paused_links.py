"""A paused process that resumes to a flooded link its peer closed survives, and loses nothing.

libzmq 4.3.5 aborts (`Assertion failed: !_io_error`, stream_engine_base.cpp) when a ZMTP
heartbeat is written on a connection whose input stopped at the high-water mark and whose
peer closed it: the process's own PING timer (`ZMQ_HEARTBEAT_IVL` on its socket), or a
PING from the peer answered while the connection drains (`ZMQ_HEARTBEAT_IVL` on the
peer's socket). A broker meets exactly this when it resumes after SIGSTOP: its peers
flooded it during the pause and closed their end. The sockets of `mesh.sockets` must not
let either end do it (docs/operations.md, "A paused broker").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from mesh.sockets import peer_dealer

HERE = Path(__file__).parent
HWM = 10
BURSTS = 3
PER_BURST = 5 * HWM  # past the high-water mark: the resumed router's input stops at once
BURST_GAP_S = 1.05  # longer than the 1 s ZMTP heartbeat interval the sockets once had


def _flooder(ctx: zmq.Context, kind: str, endpoint: str) -> zmq.Socket:
    if kind == "mesh":
        return peer_dealer(ctx, endpoint, b"flooder", 1 << 20, HWM * 100)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"flooder")
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.sndhwm = HWM * 100
    sock.connect(endpoint)
    return sock


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("router", "dealer"),
    [("mesh", "mesh"), ("mesh", "plain"), ("plain", "mesh")],
    ids=["both-mesh", "mesh-router", "mesh-dealer"],
)
def test_a_resumed_router_survives_a_flooded_link_its_peer_closed(router: str, dealer: str) -> None:
    """Invariant: the router process exits 0 (libzmq did not abort it) and reads every
    message the peer sent, whichever end is a `mesh.sockets` socket.

    The router is SIGSTOPped, the dealer sends it bursts past its high-water mark a
    heartbeat interval apart, closes, and the router is resumed and reads slowly.
    """
    victim = subprocess.Popen(
        [sys.executable, str(HERE / "pausedrouter.py"), router, str(HWM), str(1 + BURSTS * PER_BURST)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    ctx = zmq.Context()
    try:
        endpoint = victim.stdout.readline().strip()  # type: ignore[union-attr]
        sock = _flooder(ctx, dealer, endpoint)
        while True:  # IMMEDIATE: the first send succeeds once the handshake is done
            try:
                sock.send(b"hello", zmq.NOBLOCK)
                break
            except zmq.Again:
                time.sleep(0.01)
        os.kill(victim.pid, signal.SIGSTOP)
        for burst in range(BURSTS):
            if burst:
                time.sleep(BURST_GAP_S)
            for _ in range(PER_BURST):
                sock.send(b"x" * 100, zmq.NOBLOCK)
        sock.close(linger=2000)  # written to the paused router's kernel, then closed
        victim.stdin.write("resumed\n")  # type: ignore[union-attr]
        victim.stdin.flush()  # type: ignore[union-attr]
        os.kill(victim.pid, signal.SIGCONT)
        out, _ = victim.communicate(timeout=30)
    finally:
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGCONT)
            victim.kill()
            victim.wait()
        ctx.destroy(linger=0)
    assert victim.returncode == 0, f"the resumed router exited {victim.returncode} (-6: libzmq aborted it)"
    assert int(out.strip()) == 1 + BURSTS * PER_BURST
